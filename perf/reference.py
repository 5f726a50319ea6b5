"""The diffusers pipeline the benchmarks measure against (systems a and c of `perf compare`): the
checkpoint's own pipeline class (StableDiffusionPipeline, or StableDiffusionXLPipeline for an SDXL
folder), no safety checker, DDIM as the stack's requests ask for it, no progress bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def diffusers_pipeline(folder: str | Path) -> Any:
    from diffusers import DDIMScheduler, DiffusionPipeline

    from sd_triton.runtime.torch_modules import architecture_of

    sd = architecture_of(Path(folder)) == "sd"
    extra = {"safety_checker": None, "requires_safety_checker": False} if sd else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
