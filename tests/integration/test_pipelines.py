"""Several pipelines in one repository and one Triton (`sd-triton export --name`): `tiny` (unnamed) and
`tiny-xl` (named `xl`: models xl_txt2img, xl_unet, ...) exported side by side, served together, requests
to both in flight at once each matching its own diffusers pipeline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from sd_triton import contract as c
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, triton_server
from tests.integration.test_parity import MAX_ABS_DIFF, max_abs_diff

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    repo = tmp_path_factory.mktemp("pipelines") / "model_repository"
    manifests = {
        "": run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR)),
        "xl": run_export(
            ExportOptions("tiny-xl", repo, settings=RepositorySettings(pipeline="xl"), work_dir=WORK_DIR)
        ),
    }
    with (
        triton_server(repo, repo.parent / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        yield {"client": client, "repo": repo, "manifests": manifests}


def test_each_pipeline_has_its_models_and_manifest(served: dict) -> None:
    repo, client = served["repo"], served["client"]
    models = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]}
    assert {c.model_name("xl", m) for m in c.MODELS} | set(c.MODELS) <= models
    assert json.loads((repo / "manifest.xl.json").read_text())["settings"]["pipeline"] == "xl"
    assert json.loads((repo / "manifest.json").read_text())["settings"]["architecture"] == "sd"
    steps = client.get_model_config("xl_txt2img", as_json=True)["config"]["ensemble_scheduling"]["step"]
    assert {s["model_name"] for s in steps} == {"xl_tokenizer", "xl_denoise"}  # the inline path's ensemble
    params = client.get_model_config("xl_txt2img", as_json=True)["config"]["parameters"]
    assert params["model"]["string_value"] == "xl" and params["architecture"]["string_value"] == "sdxl"


def test_requests_to_both_in_flight_together_match_their_own_diffusers(served: dict) -> None:
    sd_folder = served["manifests"][""]["source"]["path"]
    xl_folder = served["manifests"]["xl"]["source"]["path"]
    sd = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    xl = StableDiffusionXLPipeline.from_pretrained(xl_folder)
    requests = [("", seed) for seed in range(3)] + [("xl", seed) for seed in range(3)]
    common = dict(height=64, width=64, steps=8, guidance_scale=7.0, scheduler="ddim")

    def ours(pipeline: str, seed: int) -> np.ndarray:
        return txt2img(served["client"], PROMPT, pipeline=pipeline, seed=seed, **common).images

    with ThreadPoolExecutor(len(requests)) as pool:  # all in flight at once, both loops batching
        results = list(pool.map(lambda r: ours(*r), requests))
    for (pipeline, seed), images in zip(requests, results, strict=True):
        pipe = xl if pipeline else sd
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(
            PROMPT, height=64, width=64, num_inference_steps=8, guidance_scale=7.0, output_type="np",
            generator=[torch.Generator().manual_seed(seed)],
        ).images  # fmt: skip
        assert max_abs_diff(images, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF, (pipeline, seed)


def test_a_pipeline_name_is_checked() -> None:
    with pytest.raises(ValueError, match="pipeline name 'Bad Name'"):
        RepositorySettings(pipeline="Bad Name")


def test_the_tensorrt_check_covers_every_pipeline(served: dict, tmp_path: Path) -> None:
    """`sd-triton triton`'s check before it starts reads every pipeline's manifest: a named pipeline's
    unbuilt plan is named with its model."""
    from sd_triton.export.engines import tensorrt_problems
    from sd_triton.export.manifest import Manifest

    assert Manifest.pipelines(served["repo"]) == ["", "xl"]
    assert tensorrt_problems(served["repo"]) == []  # python-ort everywhere
    repo = tmp_path / "repo"
    engines = {**dict.fromkeys(c.ENGINE_MODELS, "python-ort"), "unet": "tensorrt"}
    settings = RepositorySettings(pipeline="xl", engines=engines)  # type: ignore[arg-type]
    run_export(ExportOptions("tiny-xl", repo, settings=settings, work_dir=WORK_DIR))
    (problem,) = tensorrt_problems(repo, target={"gpu": "none"})
    assert problem.startswith("xl_unet/1/model.plan") and "never built" in problem
