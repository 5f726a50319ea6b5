"""Several pipelines in one repository and one Triton (`sd-triton export --name`): `tiny` (unnamed) and
`tiny-xl` (named `xl`: models xl_txt2img, xl_unet, ...) exported side by side, served together, requests
to both in flight at once each matching its own diffusers pipeline."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from sd_triton.gateway.process import GatewayProcess
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, free_port, triton_server
from tests.gateway.test_playground import Playground, browser, decode  # noqa: F401 - browser: its fixture
from tests.integration.test_parity import MAX_ABS_DIFF, max_abs_diff
from tests.load import job_events

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    repo = tmp_path_factory.mktemp("pipelines") / "model_repository"
    manifests = {
        "": run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR)),
        "xl": run_export(
            ExportOptions("tiny-xl", repo, settings=RepositorySettings(pipeline="xl"), work_dir=WORK_DIR)
        ),
        # the refiner on the bls UNet path (the base's is inline): the hand-off crosses both
        "refiner": run_export(
            ExportOptions(
                "tiny-xl-refiner",
                repo,
                settings=RepositorySettings(pipeline="refiner", unet_path="bls"),
                work_dir=WORK_DIR,
            )
        ),
    }
    gateway = GatewayProcess("", port=free_port(), log_file=repo.parent / "gateway.log")
    with (
        triton_server(repo, repo.parent / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        gateway.triton_url = server.grpc_url
        gateway.start()
        try:
            with httpx.Client(base_url=gateway.url, timeout=120) as http:
                yield {
                    "client": client, "repo": repo, "manifests": manifests, "http": http,
                    "http_port": server.http_port,
                }  # fmt: skip
        finally:
            gateway.stop()


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


def test_the_gateway_lists_and_routes_to_each_pipeline(served: dict) -> None:
    """GET /v1/models lists both (the unnamed one the default); `model` routes a request, a job's stream
    and OpenAI's route, each giving what that pipeline gives directly; an unknown model is a 422 naming
    the ids."""
    http, client = served["http"], served["client"]
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert set(cards) == {"tiny", "xl", "refiner"} and cards["tiny"]["default"] and not cards["xl"]["default"]
    assert cards["xl"]["architecture"] == "sdxl" and cards["tiny"]["architecture"] == "sd"
    assert cards["xl"]["limits"]["max_steps"] >= 8
    body = {"prompt": PROMPT, "steps": 8, "seed": 3, "scheduler": "ddim", "width": 64, "height": 64}
    common = dict(height=64, width=64, steps=8, guidance_scale=7.5, scheduler="ddim", seed=3)
    for model, pipeline in (("xl", "xl"), ("tiny", ""), (None, "")):
        response = http.post("/v1/generate", json={**body, **({} if model is None else {"model": model})})
        assert response.status_code == 200, response.text
        assert response.json()["provenance"]["model"] == (model or "tiny")
        direct = txt2img(client, PROMPT, pipeline=pipeline, **common).images[0]
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["base64"]))))
        assert np.array_equal(image, direct), model
    job = http.post("/v1/jobs", json={**body, "model": "xl", "seed": 4}).json()  # not a cached one
    frames = [f["event"] for f in job_events(http, job["id"])]
    assert frames == ["queued"] + ["step"] * 8 + ["completed"], frames
    result = http.get(f"/v1/jobs/{job['id']}").json()["result"]
    assert result["provenance"]["model"] == "xl"
    unknown = http.post("/v1/generate", json={**body, "model": "sd-9"})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "model"
    assert "refiner, tiny, xl" in unknown.json()["error"]["message"]
    openai = http.post("/v1/images/generations", json={"prompt": PROMPT, "model": "xl", "size": "64x64"})
    assert openai.status_code == 200, openai.text
    assert http.get("/readyz").status_code == 200


def test_the_cli_generates_with_a_model(served: dict, tmp_path: Path) -> None:
    from sd_triton.cli import main

    out = tmp_path / "xl.png"
    args = ["--steps", "8", "--seed", "3", "--scheduler", "ddim", "--width", "64", "--height", "64"]
    assert (
        main(
            [
                "generate",
                PROMPT,
                "--model",
                "xl",
                "--gateway-url",
                str(served["http"].base_url),
                "-o",
                str(out),
                *args,
            ]
        )
        == 0
    )
    direct = txt2img(
        served["client"], PROMPT, pipeline="xl", height=64, width=64, steps=8, scheduler="ddim", seed=3
    )
    assert np.array_equal(np.asarray(Image.open(out)), direct.images[0])
    assert (
        main(
            [
                "generate",
                PROMPT,
                "--model",
                "nope",
                "--gateway-url",
                str(served["http"].base_url),
                "-o",
                str(out),
            ]
        )
        == 1
    )


def test_a_pipeline_name_is_checked() -> None:
    with pytest.raises(ValueError, match="pipeline name 'Bad Name'"):
        RepositorySettings(pipeline="Bad Name")


def test_the_tensorrt_check_covers_every_pipeline(served: dict, tmp_path: Path) -> None:
    """`sd-triton triton`'s check before it starts reads every pipeline's manifest: a named pipeline's
    unbuilt plan is named with its model."""
    from sd_triton.export.engines import tensorrt_problems
    from sd_triton.export.manifest import Manifest

    assert Manifest.pipelines(served["repo"]) == ["", "refiner", "xl"]
    assert tensorrt_problems(served["repo"]) == []  # python-ort everywhere
    repo = tmp_path / "repo"
    engines = {**dict.fromkeys(c.ENGINE_MODELS, "python-ort"), "unet": "tensorrt"}
    settings = RepositorySettings(pipeline="xl", engines=engines)  # type: ignore[arg-type]
    run_export(ExportOptions("tiny-xl", repo, settings=settings, work_dir=WORK_DIR))
    (problem,) = tensorrt_problems(repo, target={"gpu": "none"})
    assert problem.startswith("xl_unet/1/model.plan") and "never built" in problem


# (scheduler, hand-off fraction, guidance, num_images): the checkpoints' Euler, a multistep closed form, an
# ancestral one (its draws), a second-order one (a cut inside a pair of calls)
HANDOFFS = [
    ("default", 0.8, 7.5, 1),
    ("dpmpp_2m", 0.7, 5.0, 2),
    ("euler_a", 0.6, 6.0, 1),
    ("heun", 0.75, 7.5, 1),
]


def _diffusers_handoff(
    served: dict,
    scheduler: str,
    fraction: float,
    guidance: float,
    n: int,
    prompt: str = PROMPT,
    learned: dict[str, Any] | None = None,
) -> np.ndarray:
    """diffusers' StableDiffusionXLPipeline(denoising_end) -> StableDiffusionXLImg2ImgPipeline
    (denoising_start) on the exported checkpoints, each side's generators seeded from the seed. `learned`:
    {token, clip_l, clip_g}, a textual-inversion embedding loaded into each encoder of both."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from tests.integration.test_parity import reference_scheduler

    base = StableDiffusionXLPipeline.from_pretrained(served["manifests"]["xl"]["source"]["path"])
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        served["manifests"]["refiner"]["source"]["path"]
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
        own = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
        pipe.scheduler = reference_scheduler(scheduler, type(pipe.scheduler), own, 5, n)
    if learned is not None:
        loads = [(base, "clip_l", ""), (base, "clip_g", "_2"), (refiner, "clip_g", "_2")]
        for pipe, key, suffix in loads:
            encoder, tokenizer = getattr(pipe, f"text_encoder{suffix}"), getattr(pipe, f"tokenizer{suffix}")
            pipe.load_textual_inversion(learned[key], token=learned["token"], text_encoder=encoder,
                                        tokenizer=tokenizer)  # fmt: skip

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(5 + i) for i in range(n)]

    common = dict(num_inference_steps=10, guidance_scale=guidance, num_images_per_prompt=n)
    handed = base(prompt, height=64, width=64, denoising_end=fraction, output_type="latent",
                  generator=generators(), **common).images  # fmt: skip
    images = refiner(prompt, image=handed, denoising_start=fraction, output_type="np",
                     generator=generators(), **common).images  # fmt: skip
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize(("scheduler", "fraction", "guidance", "n"), HANDOFFS)
def test_base_and_refiner_hand_off_through_triton_as_diffusers(
    served: dict, scheduler: str, fraction: float, guidance: float, n: int
) -> None:
    """The base's txt2img with DENOISING_END answers LATENTS; the refiner's with DENOISING_START and those
    START_LATENTS finishes the images: diffusers' base -> refiner (base inline, refiner on the bls path)."""
    client = served["client"]
    common = dict(
        height=64, width=64, steps=10, guidance_scale=guidance, scheduler=scheduler, seed=5, num_images=n
    )
    base = txt2img(client, PROMPT, pipeline="xl", latents=True, denoising_end=fraction, **common)
    assert base.latents is not None and base.latents.shape == (n, 4, 8, 8)
    final = txt2img(
        client, PROMPT, pipeline="refiner", denoising_start=fraction, start_latents=base.latents, **common
    )
    expected = _diffusers_handoff(served, scheduler, fraction, guidance, n)
    assert max_abs_diff(final.images, expected) <= MAX_ABS_DIFF, scheduler
    alone = txt2img(client, PROMPT, pipeline="refiner", denoising_start=fraction,
                    start_latents=np.zeros_like(base.latents), **common)  # fmt: skip
    assert max_abs_diff(alone.images, expected) > MAX_ABS_DIFF  # the latents handed over are what counts


def test_the_gateway_runs_base_and_refiner_as_one_job(served: dict) -> None:
    """`refiner` on /v1/generate and /v1/jobs: the image the two Triton calls give, a job's steps counting
    over both UNets; bad hand-off inputs to Triton are INVALID_ARG naming the input."""
    http, client = served["http"], served["client"]
    body = {"prompt": PROMPT, "model": "xl", "refiner": "refiner", "steps": 10, "seed": 11,
            "scheduler": "euler", "width": 64, "height": 64, "denoising_end": 0.7}  # fmt: skip
    response = http.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    common = dict(height=64, width=64, steps=10, scheduler="euler", seed=11)
    base = txt2img(client, PROMPT, pipeline="xl", latents=True, denoising_end=0.7, **common)
    final = txt2img(
        client, PROMPT, pipeline="refiner", denoising_start=0.7, start_latents=base.latents, **common
    )
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["base64"]))))
    assert np.array_equal(image, final.images[0])
    provenance = response.json()["provenance"]
    assert (provenance["model"], provenance["refiner"], provenance["denoising_end"]) == ("xl", "refiner", 0.7)
    job = http.post("/v1/jobs", json={**body, "seed": 12}).json()
    frames = list(job_events(http, job["id"]))
    steps = [(f["data"]["step"], f["data"]["steps"]) for f in frames if f["event"] == "step"]
    assert steps == [(i, 10) for i in range(1, 11)], steps  # 7 base + 3 refiner steps (Euler: 0.7 of 10)
    assert frames[-1]["event"] == "completed"

    for params, name in (
        ({"denoising_end": 1.5}, "DENOISING_END"),
        ({"denoising_start": 0.5}, "DENOISING_START"),
        ({"denoising_start": 0.5, "start_latents": np.zeros((2, 4, 8, 8), np.float32)}, "START_LATENTS"),
    ):
        with pytest.raises(InferenceServerException, match=name) as caught:
            txt2img(client, PROMPT, pipeline="refiner", **common, **params)
        assert "INVALID_ARG" in str(caught.value.status()) or "INVALID" in str(caught.value.status())


def test_an_sdxl_adapter_joins_the_named_pipelines_library_while_triton_serves(
    served: dict, tmp_path: Path
) -> None:
    """`lora add --pipeline xl` checks an SDXL adapter (UNet and the second text encoder) against xl's
    checkpoint and files it under xl_denoise/loras, which Triton ignores: xl_denoise reloads and serves the
    same images; tiny's adapter is refused for xl (another base), naming a target. Requests naming one
    adapter, or two at different scales (between them the UNet and both text encoders), get diffusers'
    StableDiffusionXLPipeline images with load_lora_weights + set_adapters."""
    from safetensors.torch import save_file

    from sd_triton.export import lora
    from sd_triton.export.engine_swap import triton_load
    from tests.export.test_lora import write_adapter

    repo, client = served["repo"], served["client"]
    common = dict(height=64, width=64, steps=4, scheduler="ddim", seed=9)
    before = txt2img(client, PROMPT, pipeline="xl", **common).images
    xl = StableDiffusionXLPipeline.from_pretrained(served["manifests"]["xl"]["source"]["path"])
    # xl-style: the UNet's and the second text encoder's keys; xl-detail: the UNet's values and the first's
    for file, suffixes, encoder, seed in (
        ("xl.safetensors", ("to_k", "k_proj"), "text_encoder_2", 0),
        ("xl-detail.safetensors", ("to_v", "v_proj"), "text_encoder", 1),
    ):
        generator, tensors = torch.Generator().manual_seed(seed), {}
        for prefix, module in (("unet", xl.unet), (encoder, getattr(xl, encoder))):
            for name, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear) and name.endswith(suffixes):
                    down = torch.randn(2, layer.in_features, generator=generator)
                    up = torch.randn(layer.out_features, 2, generator=generator)
                    tensors[f"{prefix}.{name}.lora_A.weight"] = down * 0.3
                    tensors[f"{prefix}.{name}.lora_B.weight"] = up * 0.3
        save_file(tensors, str(tmp_path / file))
    record = lora.add(repo, tmp_path / "xl.safetensors", "xl-style", pipeline="xl")
    assert set(record.components) == {"unet", "text_encoder_2"} and record.architecture == "sdxl"
    assert (repo / "xl_denoise" / "loras" / "xl-style" / "lora.json").is_file()
    assert [r.name for r in lora.listed(repo, "xl")] == ["xl-style"] and lora.listed(repo) == []
    sd = StableDiffusionPipeline.from_pretrained(
        served["manifests"][""]["source"]["path"], safety_checker=None
    )
    with pytest.raises(lora.LoraError, match="another base"):
        lora.add(repo, write_adapter(tmp_path / "sd.safetensors", sd, seed=1), "sd-style", pipeline="xl")
    triton_load(f"localhost:{served['http_port']}", "xl_denoise")  # the library folder is no version
    assert np.array_equal(txt2img(client, PROMPT, pipeline="xl", **common).images, before)
    detail = lora.add(repo, tmp_path / "xl-detail.safetensors", "xl-detail", pipeline="xl")
    assert set(detail.components) == {"unet", "text_encoder"}
    # every target indexed in the live graphs (the first encoder's last layer too: the graph keeps every
    # layer's states for clip_skip)
    index = json.loads((repo / "xl_denoise" / "loras" / "index.json").read_text())
    indexed = {t for entry in index.values() for t in entry}
    assert set(lora.AdapterRecord.load(repo / "xl_denoise" / "loras" / "xl-detail").scales) <= indexed
    # served: diffusers' StableDiffusionXLPipeline with load_lora_weights + set_adapters gives the same
    # images, for one adapter and for two at different scales
    xl.load_lora_weights(str(tmp_path / "xl.safetensors"), adapter_name="xl-style")
    xl.load_lora_weights(str(tmp_path / "xl-detail.safetensors"), adapter_name="xl-detail")
    xl.scheduler = DDIMScheduler.from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    for sets in ([("xl-style", 0.8)], [("xl-style", 0.8), ("xl-detail", 1.2)]):
        loras = [{"name": n, "scale": s} for n, s in sets]
        ours = txt2img(client, PROMPT, pipeline="xl", loras=loras, **common).images
        xl.set_adapters([n for n, _ in sets], [s for _, s in sets])
        theirs = xl(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=7.5, output_type="np",
                    generator=[torch.Generator().manual_seed(9)]).images  # fmt: skip
        assert max_abs_diff(ours, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF, sets
        assert max_abs_diff(ours, before) > 10, f"{sets} hardly changes the image"
    with pytest.raises(InferenceServerException, match="no adapter 'xl-style'"):  # not the SD base's
        txt2img(client, PROMPT, loras=[{"name": "xl-style"}], **common)
    detail_only = txt2img(client, PROMPT, pipeline="xl", loras=[{"name": "xl-detail"}], **common).images
    assert max_abs_diff(detail_only, before) > 10  # the second adapter changes the image too
    lora.remove(repo, "xl-detail", pipeline="xl")
    lora.remove(repo, "xl-style", pipeline="xl")


def test_engine_set_list_and_rollback_act_on_the_named_pipeline(served: dict) -> None:
    """`engine set/rollback --pipeline xl` swap xl's text encoder (its own folder, config, manifest and
    Triton model, behind the gate on xl's weights) and leave the unnamed pipeline alone; `engine list`
    shows both pipelines. Requests to xl still match diffusers after the swap. Runs last: it rolls back."""
    from sd_triton.export.engine_swap import EngineSwapError, GateSettings, SwapOptions, rollback, set_engine
    from sd_triton.export.engines import engine_rows, loaded_versions

    repo, client = served["repo"], served["client"]
    triton_http = f"localhost:{served['http_port']}"
    before = {(r["pipeline"], r["component"]): r for r in engine_rows(repo, triton_http)}
    assert {p for p, _ in before} == {"", "refiner", "xl"} and before[("xl", "text_encoder")][
        "loaded_versions"
    ] == ["1"]
    options = SwapOptions("text_encoder", "python-torch", gate=GateSettings(steps=3), triton_http=triton_http)
    with pytest.raises(EngineSwapError, match="no pipeline 'nope'.*'', 'refiner', 'xl'"):
        set_engine(repo, dataclasses.replace(options, pipeline="nope"))
    result = set_engine(repo, dataclasses.replace(options, pipeline="xl"))
    assert result.switched and result.report is not None and result.report.max_abs <= 2, result.failures
    assert (repo / "xl_text_encoder" / "2" / "engine.json").is_file()
    assert not (repo / "text_encoder" / "2").exists()  # the unnamed pipeline untouched
    assert loaded_versions(triton_http)["xl_text_encoder"] == ["2"]
    assert loaded_versions(triton_http)["text_encoder"] == ["1"]
    rows = {(r["pipeline"], r["component"]): r for r in engine_rows(repo, triton_http, pipeline="xl")}
    assert set(rows) == {("xl", m) for m in c.ENGINE_MODELS}
    assert rows[("xl", "text_encoder")]["engine"] == "python-torch"
    assert rows[("xl", "text_encoder")]["artifact"].startswith("xl_text_encoder/2/")
    assert json.loads((repo / "manifest.xl.json").read_text())["live"]["text_encoder"] == [1, 2]
    assert json.loads((repo / "manifest.json").read_text())["live"]["text_encoder"] == [1]
    test_requests_to_both_in_flight_together_match_their_own_diffusers(served)
    assert rollback(repo, "text_encoder", triton_http, pipeline="xl").version == 1
    assert loaded_versions(triton_http)["xl_text_encoder"] == ["1"]
    assert txt2img(client, PROMPT, pipeline="xl", height=64, width=64, steps=2).images.shape == (1, 64, 64, 3)


def test_the_playground_picks_a_model(served: dict, browser: Any) -> None:  # noqa: F811 - the fixture
    """The page lists the served models (the default selected), builds its form from the chosen one's
    /v1/info, and its job runs on that model: the image shown is the one xl gives directly."""
    from selenium.webdriver.support.select import Select

    http = served["http"]
    page = Playground(browser, str(http.base_url).rstrip("/")).open()
    select = Select(page.el("model"))
    assert [o.get_attribute("value") for o in select.options] == ["tiny", "refiner", "xl"]
    assert select.first_selected_option.get_attribute("value") == "tiny"
    assert page.text("model-info").startswith("model tiny")
    select.select_by_value("xl")
    page.wait(lambda: page.text("model-info").startswith("model xl"), 10, "xl's /v1/info")
    page.fill(prompt=PROMPT, steps=8, seed=3)
    Select(page.el("scheduler")).select_by_value("ddim")
    page.el("generate").click()
    page.wait(lambda: page.driver.find_elements("css selector", "#images img.result"), 120, "the image")
    shown = decode(page.driver.find_element("css selector", "#images img.result").get_attribute("src"))
    direct = txt2img(
        served["client"], PROMPT, pipeline="xl", height=64, width=64, steps=8, scheduler="ddim", seed=3
    )
    np.testing.assert_array_equal(shown, direct.images[0])
    assert not [e for e in page.console() if e["level"] == "SEVERE"]


def test_sdxl_clip_skip_matches_diffusers(served: dict) -> None:
    """clip_skip 1 on tiny-xl: StableDiffusionXLPipeline's own clip_skip (each encoder's states a layer
    before its penultimate) within 2/255, changing the image."""
    client = served["client"]
    common = dict(height=64, width=64, steps=4, scheduler="ddim", seed=9)
    ours = txt2img(client, PROMPT, pipeline="xl", clip_skip=1, **common).images
    xl = StableDiffusionXLPipeline.from_pretrained(served["manifests"]["xl"]["source"]["path"])
    xl.scheduler = DDIMScheduler.from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    theirs = xl(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=7.5, clip_skip=1,
                output_type="np", generator=[torch.Generator().manual_seed(9)]).images  # fmt: skip
    assert max_abs_diff(ours, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF
    assert max_abs_diff(ours, txt2img(client, PROMPT, pipeline="xl", **common).images) > 5


def test_an_sdxl_embedding_matches_diffusers(served: dict, tmp_path: Path) -> None:
    """An SDXL textual-inversion file (clip_l and clip_g, 2 vectors each) in the xl and refiner pipelines'
    libraries: a prompt using it gives StableDiffusionXLPipeline's image with the file loaded into both
    encoders (diffusers' documented SDXL recipe) within 2/255, and changes the image; handed to the refiner
    (the bls UNet path: the ensemble's text_encoder step takes the vectors), diffusers' base -> refiner with
    it loaded into each encoder. GET /v1/models lists it for those two models."""
    from safetensors.torch import save_file

    from sd_triton.export import embeddings

    client, repo = served["client"], served["repo"]
    prompt = "a <xl-thing> on a blue background"
    common = dict(height=64, width=64, steps=4, scheduler="ddim", seed=9)
    before = txt2img(client, prompt, pipeline="xl", **common).images
    xl = StableDiffusionXLPipeline.from_pretrained(served["manifests"]["xl"]["source"]["path"])
    xl.scheduler = DDIMScheduler.from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(4)
    learned = {
        "token": "<xl-thing>",
        "clip_l": torch.randn(2, xl.text_encoder.config.hidden_size, generator=generator),
        "clip_g": torch.randn(2, xl.text_encoder_2.config.hidden_size, generator=generator),
    }
    save_file({k: learned[k] for k in ("clip_l", "clip_g")}, tmp_path / "xl.safetensors")
    for pipeline in ("xl", "refiner"):
        record = embeddings.add(repo, tmp_path / "xl.safetensors", "<xl-thing>", pipeline=pipeline)
        assert (record.format, record.vectors) == ("sdxl", 2)
    handoff = dict(height=64, width=64, steps=10, guidance_scale=7.5, scheduler="default", seed=5)
    try:
        ours = txt2img(client, prompt, pipeline="xl", **common).images
        handed = txt2img(client, prompt, pipeline="xl", latents=True, denoising_end=0.8, **handoff).latents
        final = txt2img(client, prompt, pipeline="refiner", denoising_start=0.8, start_latents=handed,
                        **handoff).images  # fmt: skip
        deadline = time.monotonic() + 15  # the gateway re-reads the libraries every served_model_refresh_s
        while True:
            cards = {m["id"]: m for m in served["http"].get("/v1/models").json()["data"]}
            if [(e["token"], e["vectors"]) for e in cards["xl"]["embeddings"]] == [("<xl-thing>", 2)]:
                break
            assert time.monotonic() < deadline, cards["xl"]["embeddings"]
            time.sleep(0.5)
        assert [e["token"] for e in cards["refiner"]["embeddings"]] == ["<xl-thing>"]  # read together
        assert cards["tiny"]["embeddings"] == []
    finally:
        for pipeline in ("xl", "refiner"):
            embeddings.remove(repo, "<xl-thing>", pipeline=pipeline)
    xl.load_textual_inversion(learned["clip_l"], token="<xl-thing>", text_encoder=xl.text_encoder,
                              tokenizer=xl.tokenizer)  # fmt: skip
    xl.load_textual_inversion(learned["clip_g"], token="<xl-thing>", text_encoder=xl.text_encoder_2,
                              tokenizer=xl.tokenizer_2)  # fmt: skip
    theirs = xl(prompt, height=64, width=64, num_inference_steps=4, guidance_scale=7.5, output_type="np",
                generator=[torch.Generator().manual_seed(9)]).images  # fmt: skip
    assert max_abs_diff(ours, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF
    assert max_abs_diff(ours, before) > 5
    expected = _diffusers_handoff(served, "default", 0.8, 7.5, 1, prompt, learned)
    assert max_abs_diff(final, expected) <= MAX_ABS_DIFF


def _reference_xl_embeds(
    xl: StableDiffusionXLPipeline, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, 77 x k, D1 + D2], [rows, P]): each text's reference chunks (tests/sd_triton/test_prompts.py)
    by each tokenizer, through its encoder (the penultimate layer's states), weighted per encoder and set
    side by side; the pooled embeddings the second encoder's for the first chunk. Rows padded to one chunk
    count with the empty prompt's chunk."""
    from tests.sd_triton.test_prompts import reference_chunks, reference_parse, reference_weighting

    pairs = ((xl.tokenizer, xl.text_encoder), (xl.tokenizer_2, xl.text_encoder_2))
    rows = [[reference_chunks(reference_parse(t), tok, 4)[:2] for tok, _ in pairs] for t in texts]
    count = max(len(ids) for row in rows for ids, _ in row)
    embeds, pooled = [], []
    with torch.no_grad():
        for row in rows:
            parts = []
            for (tokenizer, encoder), (ids, weights) in zip(pairs, row, strict=True):
                empty_ids, empty_weights, _ = reference_chunks([("", 1.0)], tokenizer, 1)
                ids = ids + empty_ids * (count - len(ids))
                weights = weights + empty_weights * (count - len(weights))
                chunks = []
                for chunk_ids, chunk_weights in zip(ids, weights, strict=True):
                    out = encoder(torch.tensor([chunk_ids]), output_hidden_states=True)
                    z, w = out.hidden_states[-2][0], torch.tensor(chunk_weights)
                    chunks.append(z if torch.all(w == 1) else reference_weighting(z, w))
                    if encoder is xl.text_encoder_2 and len(chunks) == 1:
                        pooled.append(out[0][0])
                parts.append(torch.cat(chunks))
            embeds.append(torch.cat(parts, dim=-1))
    return torch.stack(embeds), torch.stack(pooled)


def test_a_long_weighted_sdxl_prompt_gives_diffusers_images_from_the_reference_embeddings(
    served: dict,
) -> None:
    """The a1111 long prompt (weights, BREAK, past 77 tokens) on tiny-xl: StableDiffusionXLPipeline fed the
    reference embeddings (both encoders' chunks, each weighted on its own) within 2/255."""
    from tests.integration.test_prompts import LONG

    negative = "(blurry:1.2), lowres"
    common = dict(height=64, width=64, steps=4, scheduler="ddim", seed=9)
    ours = txt2img(
        served["client"], LONG, negative_prompt=negative, prompt_syntax="a1111", pipeline="xl", **common
    )
    xl = StableDiffusionXLPipeline.from_pretrained(served["manifests"]["xl"]["source"]["path"])
    xl.scheduler = DDIMScheduler.from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    embeds, pooled = _reference_xl_embeds(xl, [negative, LONG])
    assert embeds.shape[1] in (77 * 3, 77 * 4)
    theirs = xl(
        prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[1:],
        negative_pooled_prompt_embeds=pooled[:1], height=64, width=64, num_inference_steps=4,
        guidance_scale=7.5, output_type="np", generator=[torch.Generator().manual_seed(9)],
    ).images  # fmt: skip
    assert max_abs_diff(ours.images, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF
    assert ours.prompt_truncated_tokens == 0


def test_the_playground_reads_prompts_as_asked(served: dict, browser: Any, tmp_path: Path) -> None:  # noqa: F811
    """The page offers xl's embedding tokens (clicking one adds it to the prompt), the a1111 syntax and a
    clip skip up to xl's max; its job sends them: the image shown is the one Triton gives directly for the
    same prompt, syntax and clip skip."""
    from safetensors.torch import save_file
    from selenium.webdriver.support.select import Select

    from sd_triton.export import embeddings

    http, repo = served["http"], served["repo"]
    generator = torch.Generator().manual_seed(6)
    xl = StableDiffusionXLPipeline.from_pretrained(served["manifests"]["xl"]["source"]["path"])
    widths = (xl.text_encoder.config.hidden_size, xl.text_encoder_2.config.hidden_size)
    state = {
        key: torch.randn(1, width, generator=generator)
        for key, width in zip(("clip_l", "clip_g"), widths, strict=True)
    }
    save_file(state, tmp_path / "page.safetensors")
    embeddings.add(repo, tmp_path / "page.safetensors", "<page-thing>", pipeline="xl")
    try:
        deadline = time.monotonic() + 15  # the gateway re-reads the libraries every served_model_refresh_s
        card = _card(http, "xl")
        while [e["token"] for e in card["embeddings"]] != ["<page-thing>"]:  # (one removed may still show)
            assert time.monotonic() < deadline, card["embeddings"]
            time.sleep(0.5)
            card = _card(http, "xl")
        page = Playground(browser, str(http.base_url).rstrip("/")).open()
        Select(page.el("model")).select_by_value("xl")
        page.wait(lambda: page.el("embeddings").is_displayed(), 10, "xl's embeddings")
        assert page.el("clip_skip").get_attribute("max") == str(card["max_clip_skip"])
        page.fill(prompt="a (red:1.4) circle,", steps=6, seed=3, clip_skip=1)
        page.driver.find_element("css selector", "#embedding-list button.token").click()
        assert page.el("prompt").get_attribute("value") == "a (red:1.4) circle, <page-thing>"
        Select(page.el("prompt_syntax")).select_by_value("a1111")
        Select(page.el("scheduler")).select_by_value("ddim")
        page.el("generate").click()
        page.wait(lambda: page.driver.find_elements("css selector", "#images img.result"), 120, "the image")
        shown = decode(page.driver.find_element("css selector", "#images img.result").get_attribute("src"))
        direct = txt2img(
            served["client"], "a (red:1.4) circle, <page-thing>", pipeline="xl", height=64, width=64, steps=6,
            scheduler="ddim", seed=3, prompt_syntax="a1111", clip_skip=1,
        )  # fmt: skip
        np.testing.assert_array_equal(shown, direct.images[0])
        plain = txt2img(served["client"], "a (red:1.4) circle,", pipeline="xl", height=64, width=64, steps=6,
                        scheduler="ddim", seed=3)  # fmt: skip
        assert max_abs_diff(shown[None], plain.images) > 5  # what the page sent mattered
        assert not [e for e in page.console() if e["level"] == "SEVERE"]
    finally:
        embeddings.remove(repo, "<page-thing>", pipeline="xl")


def _card(http: Any, model: str) -> dict[str, Any]:
    """The model's entry of GET /v1/models."""
    return next(m for m in http.get("/v1/models").json()["data"] if m["id"] == model)
