"""A request without a scheduler runs the checkpoint's own scheduler, class and config, as diffusers'
`StableDiffusionPipeline.from_pretrained` does: checked on checkpoints whose scheduler differs from SD
1.5's (another class, v_prediction, trailing spacing, zero-SNR betas, LCM, SDE noise).

Each variant is the tiny checkpoint with its weights linked and another `scheduler/` (and the class
named in model_index.json). One Triton serves them in turn: the export of each variant reuses the ONNX
graphs (same weights) and rewrites the scheduler config, then Triton reloads the python steps.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import StableDiffusionPipeline

from sd_triton import contract as c
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.triton_server import TritonServer
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, triton_server

MAX_ABS_DIFF = 2  # on the 0-255 scale, as the parity suite
PROMPT = "a watercolor painting of a lighthouse at dawn"

# name -> (class, config changes on top of the tiny checkpoint's, steps, guidance)
VARIANTS: dict[str, tuple[str, dict[str, Any], int, float]] = {
    "euler-vpred-trailing": (
        "EulerDiscreteScheduler",
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        6,
        7.5,
    ),
    "ddim-vpred-zero-snr": (
        "DDIMScheduler",
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
        8,
        5.0,
    ),
    "lcm": ("LCMScheduler", {"original_inference_steps": 50}, 4, 1.5),
    "dpmpp-2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "solver_order": 2},
        10,
        7.5,
    ),
}


def make_variant(tiny: Path, folder: Path, cls: str, changes: dict[str, Any]) -> Path:
    """The tiny checkpoint with another scheduler: weights hard-linked, scheduler and index rewritten."""
    shutil.copytree(tiny, folder, copy_function=os.link)
    config = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
    config.update(changes, _class_name=cls)
    target = folder / "scheduler" / "scheduler_config.json"
    target.unlink()  # a link to the tiny checkpoint's file: write a new one
    target.write_text(json.dumps(config, indent=2))
    index = json.loads((tiny / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls]
    (folder / "model_index.json").unlink()
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _link_large(src: str, dst: str) -> None:
    """Hard-link the ONNX graphs (never written again: a re-export replaces the file), copy the rest."""
    if src.endswith((".onnx", ".onnx.data")):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def served(
    exported: dict, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonServer, Path, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("default-scheduler")
    variants = {
        name: make_variant(tiny_checkpoint, root / name, cls, changes)
        for name, (cls, changes, _, _) in VARIANTS.items()
    }
    repo = root / "repo"
    shutil.copytree(exported["repo"], repo, copy_function=_link_large)
    server = triton_server(repo, root / "triton.log")
    server.start()
    yield server, repo, variants
    server.stop()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_scheduler_field_runs_the_checkpoints_own(served, variant: str) -> None:
    server, repo, variants = served
    cls, _, steps, guidance = VARIANTS[variant]
    folder = variants[variant]
    # 1. The variant's export: ONNX reused (same weights), the scheduler config rewritten.
    manifest = run_export(ExportOptions(model=str(folder), repo=repo, work_dir=WORK_DIR))
    assert all(manifest["components"][m]["onnx"]["source_sha256"] for m in c.ENGINE_MODELS)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for model in (c.DENOISE.name, c.TXT2IMG.name):
            client.load_model(model)  # the new pipeline.json and txt2img's default_scheduler parameter
        params = client.get_model_config(c.TXT2IMG.name, as_json=True)["config"]["parameters"]
        assert params["default_scheduler"]["string_value"] == cls

        # 2. Ours without a SCHEDULER input, and diffusers' pipeline as it loads the folder.
        common = dict(height=64, width=64, guidance_scale=guidance, seed=99)
        ours = txt2img(client, PROMPT, steps=steps, num_images=2, **common).images
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert type(pipe.scheduler).__name__ == cls
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT,
        num_inference_steps=steps,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(99 + i) for i in range(2)],
        output_type="np",
        height=64,
        width=64,
        guidance_scale=guidance,
    ).images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert ours.std() > 5, "a flat image would make the comparison meaningless"
    diff = int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())
    assert diff <= MAX_ABS_DIFF, f"{variant}: max abs diff {diff}"


def test_the_variants_differ_from_each_other(served) -> None:
    """The comparison above can fail: the same request under two of the checkpoints' schedulers gives
    other images (so a loop that ignored the checkpoint's scheduler would not match diffusers)."""
    server, repo, variants = served
    images = []
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for name in ("euler-vpred-trailing", "ddim-vpred-zero-snr"):
            run_export(ExportOptions(model=str(variants[name]), repo=repo, work_dir=WORK_DIR))
            client.load_model(c.DENOISE.name)
            images.append(txt2img(client, PROMPT, height=64, width=64, steps=6, seed=5).images)
    assert int(np.abs(images[0].astype(np.int16) - images[1].astype(np.int16)).max()) > 2 * MAX_ABS_DIFF
