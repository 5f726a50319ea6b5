"""`sd-triton perf controlnet`: what ControlNets cost per denoising step.

One run, in this process, on the preset exported with two ControlNets (`random:1`, `random:2`: built from
its UNet, sd_triton/export/controlnet.py), with the loop's own code (runtime/controlnets.ControlledUNet
over ONNX Runtime, as the inline UNet path runs them): one step's UNet work for a guided image (2 rows, the
native size), timed `calls` times per configuration, the configurations interleaved round by round:

- `none`: the plain UNet (a request without ControlNets);
- `zeros`: the controlled UNet fed zero residuals, what every request would pay if the UNet always took
  residuals instead of having a variant for the requests with ControlNets (issue 24's "zeros or a
  variant");
- `one`, `two`: one and two ControlNets and the controlled UNet.

Each configuration's median ms per step, and per round its ratio over `none` (median and spread).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CONFIGS = ("none", "zeros", "one", "two")


@dataclass(frozen=True)
class ControlNetBenchSettings:
    preset: str = "tiny"
    calls: int = 5  # per configuration and round
    rounds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("calls", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def run_controlnet_bench(settings: ControlNetBenchSettings, work_dir: Path) -> dict[str, Any]:
    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.perf.compare import machine
    from sd_triton.runtime.controlnets import ControlledUNet, ControlNetLibrary
    from sd_triton.runtime.ort_runner import OrtRunner

    # 1. The preset with two ControlNets; the plain UNet, the ControlNets and the controlled UNet loaded.
    log.info("[1/3] export %s with two ControlNets", settings.preset)
    repo = work_dir / f"controlnet-{settings.preset}"
    controlnets = {"a": "random:1", "b": "random:2"}
    manifest = run_export(ExportOptions(settings.preset, repo, work_dir=work_dir, controlnets=controlnets))
    checkpoint = Checkpoint.open(Path(manifest["source"]["path"]))
    height, width = checkpoint.native_size
    plain = OrtRunner(repo / "unet" / "1" / "model.onnx")
    names = ("sample", "timestep", "encoder_hidden_states")
    unet = ControlledUNet(lambda *arrays: plain.run(dict(zip(names, arrays, strict=True)))["noise_pred"],
                          ControlNetLibrary(repo / "denoise"))  # fmt: skip
    # 2. One guided step's inputs (2 rows), a control image, and the zero residuals.
    rng = np.random.default_rng(settings.seed)
    scale = checkpoint.dims.vae_scale_factor
    inputs = (
        rng.normal(size=(2, checkpoint.dims.latent_channels, height // scale, width // scale)).astype(
            np.float32
        ),
        np.full((2, 1), 500.0, np.float32),
        rng.normal(size=(2, 77, checkpoint.dims.text_hidden)).astype(np.float32),
    )
    image = rng.random((1, 3, height, width)).astype(np.float32)
    residuals = unet.library.runner("a").run({**dict(zip(names, inputs, strict=True)), "controlnet_cond":
                                              np.repeat(image, 2, axis=0)})  # fmt: skip
    zeros = {key: np.zeros_like(value) for key, value in residuals.items()}
    variant = unet.library.runner("")
    calls = {
        "none": lambda: unet(*inputs),
        "zeros": lambda: variant.run({**dict(zip(names, inputs, strict=True)), **zeros})["noise_pred"],
        "one": lambda: unet(*inputs, controls=[(2, [("a", 1.0, image)])]),
        "two": lambda: unet(*inputs, controls=[(2, [("a", 1.0, image), ("b", 0.7, image)])]),
    }
    outputs = {name: call() for name, call in calls.items()}  # warm-up: sessions made, allocations done
    # the ControlNets steer; zero residuals leave the step as it is (within float rounding)
    differ = {name: not np.allclose(outputs[name], outputs["none"], atol=1e-4) for name in CONFIGS[1:]}
    # 3. The configurations interleaved, round by round.
    log.info("[2/3] %d rounds of %d calls per configuration", settings.rounds, settings.calls)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_index in range(settings.rounds):
        log.info("[3/3] round %d/%d", round_index + 1, settings.rounds)
        for name in CONFIGS:
            samples = []
            for _ in range(settings.calls):
                started = time.perf_counter()
                calls[name]()
                samples.append(time.perf_counter() - started)
            times[name].append(1000 * statistics.median(samples))
    ratios = {
        name: [t / base for t, base in zip(times[name], times["none"], strict=True)] for name in CONFIGS[1:]
    }
    return {
        "settings": asdict(settings),
        "size": [height, width],
        "machine": machine(),
        "ms_per_step": {name: [round(t, 2) for t in values] for name, values in times.items()},
        "over_none": {name: round(statistics.median(r), 3) for name, r in ratios.items()},
        "over_none_spread": {name: [round(min(r), 3), round(max(r), 3)] for name, r in ratios.items()},
        "outputs_differ": differ,
    }


def table(document: dict[str, Any]) -> str:
    s = document["settings"]
    lines = [
        f"perf controlnet: {s['preset']} {document['size'][1]}x{document['size'][0]}, one guided step "
        f"(2 rows), {s['calls']} calls per configuration, {s['rounds']} rounds",
        "| per step | ms per round | over none (rounds) |",
        "|---|---|---|",
    ]
    for name, values in document["ms_per_step"].items():
        ratio = "1" if name == "none" else (
            f"{document['over_none'][name]} ({document['over_none_spread'][name][0]}–"
            f"{document['over_none_spread'][name][1]})"
        )  # fmt: skip
        lines.append(f"| {name} | {', '.join(str(v) for v in values)} | {ratio} |")
    return "\n".join(lines)
