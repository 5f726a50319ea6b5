"""`sd-triton perf lora`: what LoRA adapters cost a loaded server, and how soon a new one serves.

One run, through the gateway, on the preset exported with four synthetic adapters (the UNet's attention
projections and the text encoder's q/v, rank `rank`, non-zero up-projections):

1. time to usable: a fifth adapter added (`sd-triton lora add`'s work) while Triton and the gateway
   serve, then its first request; beside it, the same request once warm (its patched weights cached);
2. the load: `requests` requests at concurrency `concurrency`, a fresh seed each (the cache never answers),
   once without adapters ("base") and once cycling over the four adapter sets ("mixed"), interleaved round
   by round; images/s of each and mixed / base per round (median and spread).

The mixed load shares the continuous batch by adapter set: each set's rows get their own UNet call per
iteration.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

log = logging.getLogger(__name__)

TARGETS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "q_proj.weight", "v_proj.weight")


@dataclass(frozen=True)
class LoraBenchSettings:
    preset: str = "tiny"
    steps: int = 10
    concurrency: int = 8
    requests: int = 32  # per load and round
    rounds: int = 3
    rank: int = 8
    prompt: str = "a red circle on a blue background"
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "concurrency", "requests", "rounds", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def synthetic_adapter(checkpoint: Path, path: Path, seed: int, rank: int) -> Path:
    """A LoRA file in diffusers/PEFT keys for the checkpoint: the UNet's attention projections and the text
    encoder's q/v, random factors (non-zero up-projections: a fresh LoRA would be a no-op)."""
    from safetensors.numpy import save_file

    from sd_triton.export.lora import base_shapes

    rng = np.random.default_rng(seed)
    tensors = {}
    for target, shape in sorted(base_shapes(checkpoint).items()):
        if (
            len(shape) != 2
            or not target.endswith(TARGETS)
            or target.split(".")[0] not in ("unet", "text_encoder")
        ):
            continue
        module = target.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = (rng.normal(size=(rank, shape[1])) * 0.1).astype(np.float32)
        tensors[f"{module}.lora_B.weight"] = (rng.normal(size=(shape[0], rank)) * 0.1).astype(np.float32)
    save_file(tensors, str(path))
    return path


async def _load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    """The bodies POSTed to /v1/generate at that concurrency; the images per second."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    images = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal images
        while not queue.empty():
            body = queue.get_nowait()
            response = await client.post("/v1/generate", json=body, headers={"Cache-Control": "no-cache"})
            response.raise_for_status()
            images += len(response.json()["images"])

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return images / (time.perf_counter() - started)


def run_lora_bench(settings: LoraBenchSettings, work_dir: Path) -> dict[str, Any]:
    from sd_triton.export import lora
    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.perf.compare import machine, request_body
    from sd_triton.perf.stack import serving

    # 1. The preset exported with four adapters in its library; Triton and the gateway started.
    log.info("[1/4] export %s with four adapters, start Triton and the gateway", settings.preset)
    repo = work_dir / f"lora-{settings.preset}"
    manifest = run_export(ExportOptions(settings.preset, repo, work_dir=work_dir))
    checkpoint = Path(manifest["source"]["path"])
    height, width = Checkpoint.open(checkpoint).native_size
    names = [f"bench-{i}" for i in range(5)]
    files = [
        synthetic_adapter(checkpoint, work_dir / f"{name}.safetensors", i, settings.rank)
        for i, name in enumerate(names)
    ]
    for name in names:
        if (repo / "denoise" / "loras" / name).exists():
            lora.remove(repo, name)
    for name, file in zip(names[:4], files[:4], strict=True):
        lora.add(repo, file, name)
    base = request_body(settings, height, width)
    sets = [[{"name": name, "scale": 1.0}] for name in names[:4]]
    with serving(repo) as stack, httpx.Client(base_url=stack.gateway_url, timeout=600) as http:
        # 2. Warm-up: the base and every set once (each set's patched weights made and cached).
        log.info("[2/4] warm-up")
        for loras in [None, *sets]:
            body = {**base, "seed": 0, **({"loras": loras} if loras else {})}
            http.post("/v1/generate", json=body, headers={"Cache-Control": "no-cache"}).raise_for_status()
        # 3. A fifth adapter added while serving: how long until it serves, against the same request warm.
        log.info("[3/4] a new adapter while serving")
        started = time.perf_counter()
        lora.add(repo, files[4], names[4])
        added = time.perf_counter()
        fifth = {**base, "seed": 1, "loras": [{"name": names[4]}]}
        http.post("/v1/generate", json=fifth, headers={"Cache-Control": "no-cache"}).raise_for_status()
        first = time.perf_counter()
        http.post(
            "/v1/generate", json={**fifth, "seed": 2}, headers={"Cache-Control": "no-cache"}
        ).raise_for_status()
        warm = time.perf_counter()
        usable = {
            "add_s": round(added - started, 3),
            "first_request_ms": round((first - added) * 1000, 1),
            "warm_request_ms": round((warm - first) * 1000, 1),
        }
        # 4. The loads, interleaved round by round.
        rates: dict[str, list[float]] = {"base": [], "mixed": []}
        seed = 1000
        for round_index in range(settings.rounds):
            log.info("[4/4] round %d/%d", round_index + 1, settings.rounds)
            for load in rates:
                bodies = []
                for i in range(settings.requests):
                    seed += 1
                    extra = {"loras": sets[i % len(sets)]} if load == "mixed" else {}
                    bodies.append({**base, "seed": seed, **extra})
                rates[load].append(asyncio.run(_load(stack.gateway_url, bodies, settings.concurrency)))
    ratios = [m / b for m, b in zip(rates["mixed"], rates["base"], strict=True)]
    return {
        "settings": asdict(settings),
        "size": [height, width],
        "machine": machine(),
        "time_to_usable": usable,
        "images_per_s": {load: [round(r, 3) for r in values] for load, values in rates.items()},
        "mixed_over_base": round(statistics.median(ratios), 3),
        "mixed_over_base_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "target": 0.8,
    }


def table(document: dict[str, Any]) -> str:
    s, usable = document["settings"], document["time_to_usable"]
    ratio, spread = document["mixed_over_base"], document["mixed_over_base_spread"]
    target = document["target"]
    verdict = (
        "met"
        if spread[0] >= target
        else "missed"
        if spread[1] < target
        else "INCONCLUSIVE (rounds straddle it)"
    )
    lines = [
        f"perf lora: {s['preset']} {document['size'][1]}x{document['size'][0]}, {s['steps']} steps, "
        f"concurrency {s['concurrency']}, {s['requests']} requests per load, {s['rounds']} rounds, "
        f"rank {s['rank']}",
        "| load | images/s per round |",
        "|---|---|",
        *(
            f"| {load} | {', '.join(str(v) for v in values)} |"
            for load, values in document["images_per_s"].items()
        ),
        f"mixed (4 adapter sets) / base: {ratio} (rounds {spread[0]}–{spread[1]}); target >= "
        f"{document['target']}: {verdict}",
        f"a new adapter: lora add {usable['add_s']} s, then its first request "
        f"{usable['first_request_ms']} ms (warm: {usable['warm_request_ms']} ms)",
    ]
    return "\n".join(lines)
