"""`sd-triton perf int8`: the UNet as INT8 (ONNX Runtime dynamic quantization) against FP32 on this
CPU, side by side in one run: time per UNet call (cond + uncond at the native latent size, the two
sessions interleaved) and the parity of whole images on the golden prompts and seeds."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Settings:
    preset: str = "small"
    steps: int = 20  # for the parity images
    calls: int = 20  # timed UNet calls per engine
    scheduler: str = "ddim"
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        for name in ("steps", "calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def run_int8(settings: Int8Settings, work_dir: Path) -> dict[str, Any]:
    from sd_triton import contract as c
    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.parity import ParityGate, render_parity
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.export.quantize import INT8_FILE
    from sd_triton.export.repository import RepositorySettings
    from sd_triton.perf.compare import machine
    from sd_triton.runtime.local import LocalPipeline

    # 1. The preset exported, its UNet also as INT8.
    log.info("[1/3] export %s with an INT8 UNet", settings.preset)
    repo = work_dir / f"int8-{settings.preset}"
    options = ExportOptions(
        settings.preset, repo, settings=RepositorySettings(int8=("unet",)), work_dir=work_dir
    )
    manifest = run_export(options)
    checkpoint = Checkpoint.open(Path(manifest["source"]["path"]))
    height, width = checkpoint.native_size
    fp32, int8 = LocalPipeline(repo), LocalPipeline(repo, model_files={c.UNET.name: INT8_FILE})

    # 2. One UNet call (2 rows: uncond + cond) per engine, interleaved.
    log.info("[2/3] %d UNet calls per engine, interleaved", settings.calls)
    scale = fp32.config.vae_scale_factor
    rng = np.random.default_rng(0)
    text = {
        "input_ids": np.zeros((2, 77), np.int32),
        "clip_skip": np.zeros((2, 1), np.int32),
        "token_embeddings": np.zeros((2, 1, (fp32.config.text_widths or [0])[0]), np.float32),
    }
    hidden = fp32.runners[c.TEXT_ENCODER.name].run(text)
    feeds = {
        "sample": rng.standard_normal(
            (2, fp32.config.latent_channels, height // scale, width // scale)
        ).astype(np.float32),
        "timestep": np.full((2, 1), 500.0, np.float32),
        "encoder_hidden_states": next(iter(hidden.values())),
    }
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for pipeline in (fp32, int8):  # warm-up
        pipeline.runners[c.UNET.name].run(feeds)
    for _ in range(settings.calls):
        for name, pipeline in (("fp32", fp32), ("int8", int8)):
            started = time.perf_counter()
            pipeline.runners[c.UNET.name].run(feeds)
            times[name].append((time.perf_counter() - started) * 1000)

    # 3. Whole images on the golden prompts and seeds.
    log.info("[3/3] parity on the golden prompts, %d steps", settings.steps)
    params = {
        "height": height,
        "width": width,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": settings.scheduler,
    }
    report = render_parity(fp32, int8, **params)
    gate = ParityGate()
    unet_ms = {name: round(statistics.median(values), 2) for name, values in times.items()}
    version = repo / c.UNET.name / "1"
    return {
        "settings": asdict(settings),
        "size": [height, width],
        "machine": machine(),
        "unet_call_ms": unet_ms,
        "int8_speedup": round(unet_ms["fp32"] / unet_ms["int8"], 3),
        "unet_file_mb": {
            "fp32": round(sum(p.stat().st_size for p in version.glob("model.onnx*")) / 1e6, 1),
            "int8": round((version / INT8_FILE).stat().st_size / 1e6, 1),
        },
        "parity": {
            "images": report.images,
            "max_abs": report.max_abs,
            "min_psnr_db": report.min_psnr_db,
            "gate": asdict(gate),
            "gate_failures": gate.check(report),
        },
    }


def table(document: dict[str, Any]) -> str:
    ms, parity = document["unet_call_ms"], document["parity"]
    lines = [
        f"perf int8: {document['settings']['preset']} {document['size'][1]}x{document['size'][0]}, "
        f"UNet call with 2 rows, median of {document['settings']['calls']} interleaved calls",
        "| UNet | ms per call | file (MB) |",
        "|---|---|---|",
        f"| FP32 | {ms['fp32']} | {document['unet_file_mb']['fp32']} |",
        f"| INT8 (dynamic) | {ms['int8']} | {document['unet_file_mb']['int8']} |",
        f"INT8 speed-up: {document['int8_speedup']}x",
        f"parity on {len(parity['images'])} golden images, {document['settings']['steps']} steps: "
        f"max abs {parity['max_abs']} (0-255), min PSNR {parity['min_psnr_db']} dB; "
        f"gate (PSNR >= {parity['gate']['min_psnr_db']} dB): "
        + ("passed" if not parity["gate_failures"] else "FAILED: " + "; ".join(parity["gate_failures"])),
    ]
    return "\n".join(lines)
