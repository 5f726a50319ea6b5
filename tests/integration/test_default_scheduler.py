"""A request without a scheduler runs the checkpoint's own scheduler, class and config, as diffusers'
`StableDiffusionPipeline.from_pretrained` does: checked on checkpoints whose scheduler differs from SD
1.5's (another class, v_prediction, trailing spacing, zero-SNR betas, LCM, SDE noise).

Each variant is the tiny checkpoint with its weights linked and another `scheduler/` (and the class
named in model_index.json), exported into one repository in turn (the ONNX graphs are reused: same
weights; the scheduler config is rewritten) and run by the exported files in-process
(`sd_triton.runtime.local`: the denoising loop Triton's `denoise` runs, without a server to reload per
variant). The path of a request without SCHEDULER through Triton and the gateway is checked on the
tiny checkpoint (tests/integration/test_parity.py "default", tests/gateway/test_routes.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sd_triton import contract as c
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import CONFIG_FILE, parse
from sd_triton.runtime.local import LocalPipeline
from tests.conftest import WORK_DIR

log = logging.getLogger(__name__)

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
def variants(
    exported: dict, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("default-scheduler")
    return {
        name: make_variant(tiny_checkpoint, root / name, cls, changes)
        for name, (cls, changes, _, _) in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def repo(exported: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny export: each variant's export reuses its ONNX graphs."""
    target = tmp_path_factory.mktemp("default-scheduler-repo") / "repo"
    shutil.copytree(exported["repo"], target, copy_function=_link_large)
    return target


def diffusers_images(folder: Path, steps: int, guidance: float, seed: int, n: int) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        num_inference_steps=steps,
        num_images_per_prompt=n,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        output_type="np",
        height=64,
        width=64,
        guidance_scale=guidance,
    ).images
    return (images * 255).round().astype(np.uint8)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_scheduler_runs_the_checkpoints_own(variants: dict[str, Path], repo: Path, variant: str) -> None:
    cls, _, steps, guidance = VARIANTS[variant]
    # 1. The variant's export: ONNX reused (same weights), its scheduler written for denoise and txt2img.
    manifest = run_export(ExportOptions(model=str(variants[variant]), repo=repo, work_dir=WORK_DIR))
    assert manifest["source"]["path"] == str(variants[variant].resolve())
    config = parse((repo / c.TXT2IMG.name / CONFIG_FILE).read_text())
    assert config.parameters["default_scheduler"].string_value == cls  # what the gateway shows
    # 2. The denoising loop with the default scheduler, and diffusers' pipeline as it loads the folder.
    local = LocalPipeline(repo)
    request = dict(height=64, width=64, steps=steps, guidance_scale=guidance, seed=99, num_images=2)
    ours = local(PROMPT, scheduler=c.DEFAULT_SCHEDULER, **request).images
    theirs = diffusers_images(variants[variant], steps, guidance, seed=99, n=2)
    assert ours.shape == (2, 64, 64, 3)
    assert ours.std() > 5, "a flat image would make the comparison meaningless"
    diff = max_abs_diff(ours, theirs)
    log.info("%s (%s): max abs diff %d vs diffusers", variant, cls, diff)
    assert diff <= MAX_ABS_DIFF, f"{variant}: max abs diff {diff}"
    # 3. The comparison can fail: the tiny checkpoint's own scheduler (PNDM) gives other images here.
    pndm = local(PROMPT, scheduler="pndm", **request).images
    assert max_abs_diff(ours, pndm) > 2 * MAX_ABS_DIFF, f"{variant} runs like PNDM"
