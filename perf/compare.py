"""`sd-triton perf compare`: one run, one model, the same prompts and seeds, four ways to serve it:

  a. diffusers' StableDiffusionPipeline in this process: one pipeline object, calls take turns;
  b. the exported ONNX files in this process with ONNX Runtime, no server (the engine floor);
  c. the naive service: FastAPI with the diffusers pipeline in the handler (perf/naive_service.py);
  d. this stack: the gateway over HTTP in front of Triton.

Each is measured alone (the others are stopped) at every concurrency level: a closed loop of
`concurrency` clients, `concurrency x rounds` requests (at least `min_requests`), staggered starts.
The result JSON has p50/p95/p99 and images/s per level, the ratios the targets are stated in, and
for (d) the gateway's and Triton's own time split.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from sd_triton.perf.loadgen import Load, LoadResult, run_load
from sd_triton.perf.stats import latency_percentiles

log = logging.getLogger(__name__)

SYSTEMS = {
    "a": "diffusers in-process",
    "b": "ONNX Runtime in-process (engine floor)",
    "c": "naive FastAPI + diffusers",
    "d": "gateway + Triton (this stack)",
}


# (d)'s p50 at concurrency 1 over the engine floor's (b), at most (issue 20's targets)
OVERHEAD_LIMITS = {"tiny": 1.15, "small": 1.03}


@dataclass(frozen=True)
class CompareSettings:
    preset: str = "small"
    height: int | None = None  # default: the preset's native size
    width: int | None = None
    steps: int = 10
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    prompt: str = "a red circle on a blue background"
    seed: int = 1000
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    rounds: int = 2
    min_requests: int = 4
    stagger_s: float = 0.05
    systems: tuple[str, ...] = tuple(SYSTEMS)
    batching: str = "continuous"  # (d): how requests share UNet calls (the export's default)
    denoise_instances: int = 8  # (d), batching none / dynamic: denoising loops in flight at once
    max_queue_delay_us: int = 2000  # (d): Triton's dynamic batching window on the engines

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"systems: unknown {unknown}; expected some of {list(SYSTEMS)}")
        if self.steps < 1 or self.rounds < 1 or not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("steps, rounds and every concurrency level must be >= 1")

    def requests_at(self, concurrency: int) -> int:
        return max(self.min_requests, concurrency * self.rounds)


def _summary(
    system: str, concurrency: int, latencies_ms: list[float], images: int, seconds: float
) -> dict[str, Any]:
    return {
        "system": system,
        "concurrency": concurrency,
        "requests": len(latencies_ms),
        "images_per_s": round(images / seconds, 4) if seconds > 0 else 0.0,
        **latency_percentiles(latencies_ms),
        "errors": 0,
    }


def measure_in_process(
    system: str, generate: Callable[[int], int], settings: CompareSettings, concurrency: int
) -> dict[str, Any]:
    """`generate(seed) -> images` from `concurrency` threads, closed loop, staggered starts."""
    total = settings.requests_at(concurrency)
    latencies: list[float] = []
    counter = iter(range(total))
    lock = threading.Lock()
    images = 0

    def worker(number: int) -> None:
        nonlocal images
        time.sleep(number * settings.stagger_s)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.perf_counter()
            made = generate(settings.seed + index)
            with lock:
                latencies.append(1000 * (time.perf_counter() - started))
                images += made

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return _summary(system, concurrency, latencies, images, time.perf_counter() - started)


def _load_result(system: str, result: LoadResult) -> dict[str, Any]:
    summary = result.summary()
    return {"system": system, **{k: v for k, v in summary.items() if k != "requests"}, "requests": result.ok}


class RequestSettings(Protocol):
    """What a benchmark's request is made of (CompareSettings, BatchingSettings, SoakSettings)."""

    @property
    def prompt(self) -> str: ...
    @property
    def steps(self) -> int: ...
    @property
    def guidance_scale(self) -> float: ...
    @property
    def scheduler(self) -> str: ...
    @property
    def seed(self) -> int: ...


def request_body(settings: RequestSettings, height: int, width: int) -> dict[str, Any]:
    """The /v1/generate body of one benchmark request, one image (the soak sends a new seed each time)."""
    return {
        "prompt": settings.prompt,
        "height": height,
        "width": width,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": settings.scheduler,
        "seed": settings.seed,
        "num_images": 1,
    }


def _diffusers(checkpoint: Path, settings: CompareSettings, height: int, width: int) -> Callable[[int], int]:
    """(a): one StableDiffusionPipeline for the process, built once, as the naive service (c) holds one.
    Its scheduler keeps per-call state, so calls take turns (concurrent clients queue, as in (c))."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        checkpoint, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()

    def generate(seed: int) -> int:
        with lock:
            out = pipe(
                settings.prompt,
                height=height,
                width=width,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            )
        return len(out.images)

    return generate


def floor_engines(repo: Path) -> dict[str, dict[str, Any]]:
    """What the engine floor (b) runs: each engine's artifact, threads and spinning exactly as the
    stack's Triton engines run them (their config.pbtxt), so that (b) is the stack's own floor."""
    from sd_triton.export.repository import engine_params

    return {
        name: {
            "artifact": p.model_file,
            "intra_op_threads": p.intra_op_threads,
            "allow_spinning": p.allow_spinning,
        }
        for name, p in engine_params(repo).items()
    }


@contextmanager
def stack_torch_threads() -> Iterator[None]:
    """This process's torch as the stack's denoising loop runs it, for the floor: one intra-op thread
    (sd_triton.runtime.triton_denoise). With torch's default (one per core) its idle threads wait
    spinning after every scheduler op, on the cores ONNX Runtime computes on: the floor measured
    slower than the stack on `small` (0.94x) until it ran as the stack does."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def floor_pipeline(repo: Path) -> Any:
    """The engine floor (b): the repository's engines in this process, run as the stack runs them."""
    from sd_triton.export.repository import engine_params
    from sd_triton.runtime.local import LocalPipeline

    params = engine_params(repo)
    return LocalPipeline(repo, model_files={n: p.model_file for n, p in params.items()}, engine_params=params)


def floor_generate(pipeline: Any, settings: RequestSettings, height: int, width: int) -> Callable[[int], int]:
    """`generate(seed) -> images` on the floor's pipeline, the request of `settings`."""

    def generate(seed: int) -> int:
        result = pipeline(
            settings.prompt,
            height=height,
            width=width,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            seed=seed,
            scheduler=settings.scheduler,
        )
        return len(result.images)

    return generate


def http_levels(
    what: str,
    url: str,
    settings: CompareSettings,
    body: dict[str, Any],
    gateway: bool,
    triton_metrics: str | None,
) -> list[LoadResult]:
    """The closed-loop HTTP load at every concurrency level of `settings`; any failed request raises."""
    results = []
    for concurrency in settings.concurrency:
        load = Load(
            url,
            body,
            concurrency=concurrency,
            requests=settings.requests_at(concurrency),
            stagger_s=settings.stagger_s,
            gateway_metrics=gateway,
        )
        result = asyncio.run(run_load(load, triton_metrics))
        if result.errors:
            raise RuntimeError(f"{what}: {result.errors} failed requests: {result.error_samples[:2]}")
        results.append(result)
    return results


def warm_up(url: str, body: dict[str, Any], parallel: int = 1) -> None:
    """One request, then `parallel` at once, twice: every model instance that will serve the run (8
    `denoise` loops with dynamic batching) has run once. A cold instance's first request costs ~1 s here
    (its first scheduler, its first tensors), which would land in the first round's latencies."""

    import httpx

    headers = {"Cache-Control": "no-cache"}

    def one(seed: int) -> None:
        httpx.post(
            f"{url}/v1/generate", json={**body, "seed": seed}, headers=headers, timeout=600
        ).raise_for_status()

    one(1)
    if parallel > 1:
        with ThreadPoolExecutor(parallel) as pool:
            for _ in range(2):
                list(pool.map(one, range(2, 2 + parallel)))


@dataclass(frozen=True)
class Running:
    """Servers already up on an exported repository of the preset (tests): (d) uses them."""

    repo: Path
    gateway_url: str
    triton_metrics_url: str


def run_compare(settings: CompareSettings, work_dir: Path, running: Running | None = None) -> dict[str, Any]:
    """Measure every system of `settings.systems`; return the result document."""
    import torch

    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.export.repository import RepositorySettings
    from sd_triton.perf.naive_service import NaiveServiceProcess
    from sd_triton.perf.stack import free_port, serving

    torch.set_num_threads(os.cpu_count() or 1)
    # 1. The model, exported once (python-ort engines) into the work folder.
    repo = running.repo if running else work_dir / f"repository-{settings.preset}"
    # servers already running (tests) keep the settings they were exported with
    repository = RepositorySettings(
        batching=settings.batching,  # type: ignore[arg-type]
        denoise_instances=settings.denoise_instances,
        max_queue_delay_us=settings.max_queue_delay_us,
    )
    options = ExportOptions(settings.preset, repo, settings=RepositorySettings() if running else repository)
    manifest = run_export(replace(options, work_dir=work_dir))
    checkpoint = Path(manifest["source"]["path"])
    native_h, native_w = Checkpoint.open(checkpoint).native_size
    height, width = settings.height or native_h, settings.width or native_w
    body = request_body(settings, height, width)
    rows: list[dict[str, Any]] = []

    # 2. Each system alone, every concurrency level.
    for system in settings.systems:
        log.info("compare: %s (%s), %dx%d, %d steps", system, SYSTEMS[system], height, width, settings.steps)
        results: list[LoadResult] = []  # the HTTP systems' levels
        if system in ("a", "b"):
            # (b) with torch as the stack's loop runs it (one thread); (a) as diffusers does by default
            with stack_torch_threads() if system == "b" else nullcontext():
                if system == "a":
                    generate = _diffusers(checkpoint, settings, height, width)
                else:
                    generate = floor_generate(floor_pipeline(repo), settings, height, width)
                generate(settings.seed)  # warm-up
                rows += [measure_in_process(system, generate, settings, c) for c in settings.concurrency]
        elif system == "c":
            with NaiveServiceProcess(checkpoint, free_port()) as naive:
                warm_up(naive.url, body)
                results = http_levels(SYSTEMS[system], naive.url, settings, body, False, None)
        elif running:
            warm_up(running.gateway_url, body)
            results = http_levels(
                SYSTEMS[system], running.gateway_url, settings, body, True, running.triton_metrics_url
            )
        else:
            with serving(repo) as stack:
                warm_up(stack.gateway_url, body)
                results = http_levels(
                    SYSTEMS[system], stack.gateway_url, settings, body, True, stack.triton.metrics_url
                )
        rows += [_load_result(system, r) for r in results]

    # 3. The document: settings, machine, rows, ratios and targets.
    document = {
        "settings": asdict(settings),
        "size": [height, width],
        "machine": machine(),
        "floor_engines": floor_engines(repo),
        "rows": rows,
    }
    document["ratios"], document["targets"] = ratios_and_targets(rows, settings.preset)
    return document


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gpu": None if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _row(rows: list[dict[str, Any]], system: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["system"] == system and r["concurrency"] == concurrency), None)


def target(
    name: str, value: float | None, limit: float, higher_is_better: bool, floor: float | None = None
) -> dict[str, Any]:
    """A target with its measured value and verdict (None: not measured in this run). `floor`: a ratio
    against a real floor cannot go below it; a value that does is an anomaly to explain, never "met"."""
    met = None if value is None else (value >= limit if higher_is_better else value <= limit)
    judged = {"target": name, "value": None if value is None else round(value, 3), "limit": limit, "met": met}
    if floor is not None and value is not None and value < floor:
        judged["met"] = None
        judged["anomaly"] = f"{value:.3f} is below the floor's {floor:g}: the floor was not the stack's floor"
    return judged


def verdict(judged: dict[str, Any]) -> str:
    if judged.get("anomaly"):
        return f"ANOMALY ({judged['anomaly']})"
    if judged.get("inconclusive"):
        return f"inconclusive ({judged['inconclusive']})"
    return {True: "met", False: "MISSED", None: "not measured"}[judged["met"]]


def verdict_lines(document: dict[str, Any]) -> list[str]:
    """The ratios and the targets of a result document, one line each."""
    lines = [f"{name}: {value:.3f}" for name, value in document["ratios"].items()]
    lines += [f"target {t['target']}: {t['value']} -> {verdict(t)}" for t in document["targets"]]
    return lines


def ratios_and_targets(
    rows: list[dict[str, Any]], preset: str
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The ratios of (d) to the others, and each target with its measured value and verdict."""
    ratios: dict[str, float] = {}
    targets: list[dict[str, Any]] = []

    d1, b1, a1, c1 = (_row(rows, s, 1) for s in "dbac")
    d8, b8, c8 = _row(rows, "d", 8), _row(rows, "b", 8), _row(rows, "c", 8)
    if d1 and b1:
        ratios["d/b p50 at concurrency 1 (serving overhead)"] = d1["p50_ms"] / b1["p50_ms"]
    if d1 and a1:
        ratios["d/a p50 at concurrency 1"] = d1["p50_ms"] / a1["p50_ms"]
    if d1 and c1:
        ratios["d/c p50 at concurrency 1"] = d1["p50_ms"] / c1["p50_ms"]
    if d8 and b8:
        ratios["d/b images/s at concurrency 8"] = d8["images_per_s"] / b8["images_per_s"]
    if d8 and c8:
        ratios["d/c images/s at concurrency 8"] = d8["images_per_s"] / c8["images_per_s"]
    get = ratios.get
    # the serving-overhead targets of issue 20: on tiny, per-call costs weigh most, so the limit is wider
    overhead = OVERHEAD_LIMITS.get(preset, OVERHEAD_LIMITS["small"])
    targets.append(
        target(
            f"serving overhead d/b p50 at concurrency 1 <= {overhead:g}",
            get("d/b p50 at concurrency 1 (serving overhead)"),
            overhead,
            False,
            floor=1.0,
        )
    )
    checks = [
        ("d faster than a at p50 (d/a < 1)", get("d/a p50 at concurrency 1"), 1.0, False),
        ("d faster than c at p50 (d/c < 1)", get("d/c p50 at concurrency 1"), 1.0, False),
    ]
    if preset != "tiny":
        floor_share = (
            "d images/s at concurrency 8 >= 0.95x b's",
            get("d/b images/s at concurrency 8"),
            0.95,
            True,
        )
        checks.append(floor_share)
    need = 2.0 if preset == "tiny" else 1.0
    checks.append(
        (f"d images/s at concurrency 8 >= {need:g}x c's", get("d/c images/s at concurrency 8"), need, True)
    )
    targets += [target(*check) for check in checks]
    return {k: round(v, 3) for k, v in ratios.items()}, targets


def save(document: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def table(document: dict[str, Any]) -> str:
    head = f"{'system':38s} {'conc':>4} {'images/s':>9} {'p50 ms':>9} {'p95 ms':>9}"
    lines = [head, "-" * len(head)]
    for r in document["rows"]:
        lines.append(
            f"{SYSTEMS[r['system']]:38s} {r['concurrency']:>4} {r['images_per_s']:>9.3f} "
            f"{r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f}"
        )
    return "\n".join([*lines, "", *verdict_lines(document)])
