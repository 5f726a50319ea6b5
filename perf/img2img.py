"""`sd-triton perf img2img`: what an image-to-image request costs against text-to-image, in one run.

Through the gateway at one request at a time (POST /v1/generate, a fresh seed each time so the cache
never answers), interleaved round by round: text-to-image, then image-to-image at each strength s, then
inpainting at strength 1. An img2img request runs int(steps x s) UNet steps plus one VAE encoder call, so
its time should be about s x the text-to-image time plus that encode; the table prints the measured ratio
beside s and the spread over the rounds.
"""

from __future__ import annotations

import base64
import io
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from sd_triton.perf.inputs import init_picture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Img2ImgBenchSettings:
    preset: str = "small"
    steps: int = 20
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    rounds: int = 3
    repeats: int = 3  # requests per mode and round
    prompt: str = "a red circle on a blue background"
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "rounds", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.strengths or not all(0 < s <= 1 for s in self.strengths):
            raise ValueError(f"strengths must be in (0, 1], got {self.strengths}")


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def modes(settings: Img2ImgBenchSettings, height: int, width: int) -> dict[str, dict[str, Any]]:
    """Each mode's extra request fields, by name."""
    picture = _png(init_picture(height, width, 7))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    chosen: dict[str, dict[str, Any]] = {"txt2img": {}}
    for strength in settings.strengths:
        chosen[f"img2img s={strength:g}"] = {"image": picture, "strength": strength}
    chosen["inpaint s=1"] = {"image": picture, "mask": _png(mask), "strength": 1.0}
    return chosen


def run_img2img_bench(settings: Img2ImgBenchSettings, work_dir: Path) -> dict[str, Any]:
    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.perf.compare import machine, request_body
    from sd_triton.perf.stack import serving

    # 1. The preset exported, Triton and the gateway started.
    log.info("[1/3] export %s, start Triton and the gateway", settings.preset)
    repo = work_dir / f"img2img-{settings.preset}"
    manifest = run_export(ExportOptions(settings.preset, repo, work_dir=work_dir))
    height, width = Checkpoint.open(Path(manifest["source"]["path"])).native_size
    base = request_body(settings, height, width)  # its seed replaced request by request
    chosen = modes(settings, height, width)
    times: dict[str, list[list[float]]] = {mode: [] for mode in chosen}
    with serving(repo) as stack, httpx.Client(base_url=stack.gateway_url, timeout=600) as http:
        # 2. Warm-up: every mode once (the VAE encoder's first load included).
        log.info("[2/3] warm-up")
        for extra in chosen.values():
            http.post("/v1/generate", json={**base, **extra, "seed": 0}).raise_for_status()
        # 3. The modes interleaved, round by round, a fresh seed every request.
        seed = 1000
        for round_index in range(settings.rounds):
            log.info("[3/3] round %d/%d", round_index + 1, settings.rounds)
            for mode, extra in chosen.items():
                measured = []
                for _ in range(settings.repeats):
                    seed += 1
                    started = time.perf_counter()
                    http.post("/v1/generate", json={**base, **extra, "seed": seed}).raise_for_status()
                    measured.append((time.perf_counter() - started) * 1000)
                times[mode].append(measured)
    return {"settings": asdict(settings), "size": [height, width], "machine": machine(), **summary(times)}


def summary(times: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Per mode: the median over all its requests, and per round its median over txt2img's that round."""
    rows = {}
    for mode, rounds in times.items():
        ratios = [
            statistics.median(r) / statistics.median(t) for r, t in zip(rounds, times["txt2img"], strict=True)
        ]
        rows[mode] = {
            "p50_ms": round(statistics.median(v for r in rounds for v in r), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        }
    return {"rows": rows, "requests": {mode: sum(len(r) for r in rounds) for mode, rounds in times.items()}}


def table(document: dict[str, Any]) -> str:
    settings = document["settings"]
    lines = [
        f"perf img2img: {settings['preset']} {document['size'][1]}x{document['size'][0]}, "
        f"{settings['steps']} steps, through the gateway one request at a time, {settings['rounds']} "
        f"interleaved rounds of {settings['repeats']}",
        "| mode | p50 (ms) | / txt2img (median of rounds) | spread over rounds | steps run / txt2img's |",
        "|---|---|---|---|---|",
    ]
    for mode, row in document["rows"].items():
        strength = 1.0 if "=" not in mode else float(mode.split("=")[1])
        share = int(settings["steps"] * strength) / settings["steps"]
        spread = f"{row['ratio_spread'][0]}–{row['ratio_spread'][1]}"
        lines.append(f"| {mode} | {row['p50_ms']} | {row['ratio']} | {spread} | {share:g} |")
    return "\n".join(lines)
