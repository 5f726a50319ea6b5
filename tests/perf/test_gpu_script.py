"""The prepared GPU script stops at once, with the reason, where it cannot run (here: no CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "gpu" / "bench.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for real")
def test_without_cuda_it_fails_fast_and_says_why(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "torch sees no CUDA device" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_the_step_split_adds_up_on_the_tiny_checkpoint(tiny_checkpoint: Path) -> None:
    """The script's per-step split (the stack's denoising loop around the UNet), run here on the CPU."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench import step_split  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(SCRIPT.parent))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    split = step_split(pipe, steps=4, size=64, dtype=torch.float32, device="cpu")
    assert split["unet_call_ms"] > 0 and split["other_ms"] > 0
    assert split["step_ms"] == pytest.approx(split["unet_call_ms"] + split["other_ms"], abs=2e-3)


def test_the_step_split_runs_an_sdxl_unet_with_its_added_conditioning() -> None:
    """`--preset sdxl`'s split on the tiny SDXL-shaped model, here on the CPU."""
    from diffusers import DDIMScheduler

    from sd_triton.export.tiny import build_tiny_xl_pipeline

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench import step_split
    finally:
        sys.path.remove(str(SCRIPT.parent))
    pipe = build_tiny_xl_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    split = step_split(pipe, steps=3, size=64, dtype=torch.float32, device="cpu")
    assert split["unet_call_ms"] > 0 and split["other_ms"] > 0
