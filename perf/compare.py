"""`sd-triton perf compare`: one run, one model, the same prompts and seeds, four ways to serve it:

  a. diffusers' StableDiffusionPipeline in this process: one pipeline object, calls take turns;
  b. the exported ONNX files in this process with ONNX Runtime, no server (the engine floor);
  c. the naive service: FastAPI with the diffusers pipeline in the handler (perf/naive_service.py);
  d. this stack: the gateway over HTTP in front of Triton.

All four are set up first (the services started and warmed up, the pipelines built), then measured in
interleaved rounds: in each round every system runs every concurrency level once, alone (the others
idle), a closed loop of `concurrency` clients and `max(concurrency, min_requests)` requests (by
preset, MIN_REQUESTS) with staggered starts; the systems' order rotates from round to round. Rows keep
the median over rounds of p50/p95/p99 and images/s with the rounds' [min, max]; each ratio is taken per
round, and a target whose limit lies inside its rounds' spread is "inconclusive", not met or missed.
Each round ends with (b) and (d) once more at concurrency 1, request by request in turn
(`measure_paired`): their p50 ratio is the serving overhead measured without the drift between blocks.
For (d) the rows also carry the gateway's and Triton's own time split (the last round's).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import statistics
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
# the presets whose requests cost tens of milliseconds: per-call costs weigh most (wider overhead limit,
# more requests per level, no throughput target against the floor)
TINY_PRESETS = ("tiny", "tiny-xl")


# Requests per system, level and round by preset: a p50 of 6 requests (the default, a `small` request
# takes seconds) moved 1.10 -> 1.28 between two runs of `tiny` minutes apart (75 ms a request here);
# 40 give every level of `tiny` a few seconds per system and round, and 5 waves at concurrency 8
MIN_REQUESTS = dict.fromkeys(TINY_PRESETS, 40)


def overhead_limit(preset: str) -> float:
    """The serving-overhead target (d/b p50 at concurrency 1) of a preset."""
    return OVERHEAD_LIMITS["tiny" if preset in TINY_PRESETS else "small"]


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
    rounds: int = 3  # interleaved: every system at every level once per round
    min_requests: int | None = None  # per system, level and round; None: the preset's (MIN_REQUESTS)
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
        """Requests per system, level and round."""
        least = MIN_REQUESTS.get(self.preset, 6) if self.min_requests is None else self.min_requests
        return max(least, concurrency)


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


PAIRED = "d/b p50 at concurrency 1, request-paired (serving overhead)"


def measure_paired(
    floor_one: Callable[[int], Any], stack_one: Callable[[int], Any], requests: int, seed: int
) -> dict[str, Any]:
    """(b) and (d) at concurrency 1 request by request in turn (b d, d b, b d, ...), the same seeds:
    both see the machine as it is in the same second. Blocks of requests per system see this VM's
    drift (the floor's p50 moved 47 -> 75 -> 51 ms between runs of one day)."""
    floor: list[float] = []
    stack: list[float] = []
    for index in range(requests):
        turns = [(floor, floor_one), (stack, stack_one)]
        for latencies, one in turns if index % 2 == 0 else turns[::-1]:
            started = time.perf_counter()
            one(seed + index)
            latencies.append(1000 * (time.perf_counter() - started))
    b50, d50 = statistics.median(floor), statistics.median(stack)
    return {
        "requests": requests,
        "b_p50_ms": round(b50, 2),
        "d_p50_ms": round(d50, 2),
        "ratio": round(d50 / b50, 4),
    }


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
    """(a): one diffusers pipeline (the checkpoint's class) for the process, built once, as the naive
    service (c) holds one. Its scheduler keeps per-call state, so calls take turns (concurrent clients
    queue, as in (c))."""
    import torch

    from sd_triton.perf.reference import diffusers_pipeline

    pipe = diffusers_pipeline(checkpoint)
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
    """Measure every system of `settings.systems` in interleaved rounds; return the result document."""
    from contextlib import ExitStack

    import torch

    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.export.repository import RepositorySettings

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
    per_round: dict[tuple[str, int], list[dict[str, Any]]] = {}
    paired: list[dict[str, Any]] = []

    with ExitStack() as stack:
        # 2. Every system set up and warmed up: the in-process pipelines built once, the services started.
        measure: dict[str, Callable[[int], dict[str, Any]]] = {}
        one: dict[str, Callable[[int], Any]] = {}  # (b), (d): one request alone (measure_paired)
        for system in settings.systems:
            log.info(
                "compare: setting up %s (%s), %dx%d, %d steps",
                system,
                SYSTEMS[system],
                height,
                width,
                settings.steps,
            )
            measure[system], single = _system(system, settings, checkpoint, repo, body, running, stack)
            if single is not None:
                one[system] = single

        # 3. Round by round, level by level, each system alone; the systems' order rotates every round.
        for number in range(settings.rounds):
            order = list(
                settings.systems[number % len(settings.systems) :]
                + settings.systems[: number % len(settings.systems)]
            )
            for level in settings.concurrency:
                for system in order:
                    log.info(
                        "compare: round %d/%d, concurrency %d, %s", number + 1, settings.rounds, level, system
                    )
                    per_round.setdefault((system, level), []).append(measure[system](level))
            # (b) and (d) once more at concurrency 1, request by request in turn
            if "b" in one and "d" in one and 1 in settings.concurrency:
                log.info("compare: round %d/%d, b and d paired at concurrency 1", number + 1, settings.rounds)
                paired.append(measure_paired(one["b"], one["d"], settings.requests_at(1), settings.seed))

    # 4. The document: settings, machine, rows (medians over rounds), ratios and targets (per round).
    document = {
        "settings": asdict(settings),
        "size": [height, width],
        "machine": machine(),
        "floor_engines": floor_engines(repo),
        "rows": [_median_row(rounds) for rounds in per_round.values()],
    }
    rounds = [[r[n] for r in per_round.values()] for n in range(settings.rounds)]
    pairs = [p["ratio"] for p in paired]
    document["paired"] = paired
    document["ratios"], document["targets"] = ratios_and_targets(
        document["rows"], settings.preset, rounds, pairs
    )
    document["ratio_spreads"] = {**ratio_spreads(rounds), **({PAIRED: pairs} if pairs else {})}
    return document


def _system(
    system: str,
    settings: CompareSettings,
    checkpoint: Path,
    repo: Path,
    body: dict[str, Any],
    running: Running | None,
    stack: Any,
) -> tuple[Callable[[int], dict[str, Any]], Callable[[int], Any] | None]:
    """`measure(concurrency) -> row` for one system, set up (and its service started on `stack`), and
    for (b) and (d) `one(seed)`: one request alone."""
    from sd_triton.perf.naive_service import NaiveServiceProcess
    from sd_triton.perf.stack import free_port, serving

    height, width = body["height"], body["width"]
    if system in ("a", "b"):
        # (b) with torch as the stack's loop runs it (one thread); (a) as diffusers does by default
        threads = stack_torch_threads if system == "b" else nullcontext
        with threads():
            if system == "a":
                generate = _diffusers(checkpoint, settings, height, width)
            else:
                generate = floor_generate(floor_pipeline(repo), settings, height, width)
            generate(settings.seed)  # warm-up

        def in_process(level: int) -> dict[str, Any]:
            with threads():
                return measure_in_process(system, generate, settings, level)

        def alone(seed: int) -> Any:
            with threads():
                return generate(seed)

        return in_process, alone if system == "b" else None
    if system == "c":
        naive = stack.enter_context(NaiveServiceProcess(checkpoint, free_port()))
        url, metrics = naive.url, None
    elif running:
        url, metrics = running.gateway_url, running.triton_metrics_url
    else:
        served = stack.enter_context(serving(repo))
        url, metrics = served.gateway_url, served.triton.metrics_url
    warm_up(url, body)

    def over_http(level: int) -> dict[str, Any]:
        one = replace(settings, concurrency=(level,))
        (result,) = http_levels(SYSTEMS[system], url, one, body, system == "d", metrics)
        return _load_result(system, result)

    if system != "d":
        return over_http, None
    import httpx

    client = stack.enter_context(
        httpx.Client(base_url=url, timeout=600, headers={"Cache-Control": "no-cache"})
    )

    def alone_over_http(seed: int) -> Any:
        return client.post("/v1/generate", json={**body, "seed": seed}).raise_for_status()

    return over_http, alone_over_http


def _median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One system at one level over the rounds: the median of each figure with its [min, max], the
    requests summed, the last round's time split."""
    row = {**rounds[-1], "requests": sum(r["requests"] for r in rounds), "rounds": len(rounds)}
    row["errors"] = sum(r.get("errors", 0) for r in rounds)
    for key in ("images_per_s", "p50_ms", "p95_ms", "p99_ms"):
        values = [r[key] for r in rounds]
        row[key] = round(statistics.median(values), 4)
        row[f"{key}_spread"] = [round(min(values), 4), round(max(values), 4)]
    return row


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
    name: str,
    value: float | None,
    limit: float,
    higher_is_better: bool,
    floor: float | None = None,
    spread: list[float] | None = None,
) -> dict[str, Any]:
    """A target with its measured value and verdict (None: not measured in this run). `floor`: a ratio
    against a real floor cannot go below it; a value that does is an anomaly to explain, never "met".
    `spread`: the per-round values behind `value`; a limit inside their [min, max] is "inconclusive"."""
    met = None if value is None else (value >= limit if higher_is_better else value <= limit)
    judged = {"target": name, "value": None if value is None else round(value, 3), "limit": limit, "met": met}
    if floor is not None and value is not None and value < floor:
        judged["met"] = None
        if spread and max(spread) >= floor:
            judged["anomaly"] = (
                f"{value:.3f} is below the floor's {floor:g}, inside the rounds' spread "
                f"[{min(spread):.3f}, {max(spread):.3f}]: the stack and its floor are not told apart"
            )
        else:
            judged["anomaly"] = (
                f"{value:.3f} is below the floor's {floor:g}: the floor was not the stack's floor"
            )
    elif spread and min(spread) <= limit <= max(spread):
        judged["met"] = None
        judged["inconclusive"] = (
            f"the limit lies inside the rounds' spread [{min(spread):.3f}, {max(spread):.3f}]"
        )
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


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The ratios of (d) to the others in one set of rows (one round, or the medians)."""
    ratios: dict[str, float] = {}
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
    return ratios


def ratio_spreads(rounds: list[list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Each ratio per round, in round order."""
    spreads: dict[str, list[float]] = {}
    for rows in rounds:
        for name, value in _ratios(rows).items():
            spreads.setdefault(name, []).append(round(value, 4))
    return spreads


def ratios_and_targets(
    rows: list[dict[str, Any]],
    preset: str,
    rounds: list[list[dict[str, Any]]] | None = None,
    paired: list[float] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The ratios of (d) to the others, and each target with its measured value and verdict. With
    `rounds` (each round's rows), each ratio is the median of its per-round values, judged with their
    spread; without, the ratios of `rows`. `paired`: each round's request-paired d/b p50 (PAIRED)."""
    if rounds:
        spreads = ratio_spreads(rounds)
        ratios = {name: statistics.median(values) for name, values in spreads.items()}
    else:
        spreads, ratios = {}, _ratios(rows)
    if paired:
        spreads[PAIRED], ratios[PAIRED] = paired, statistics.median(paired)
    return {k: round(v, 3) for k, v in ratios.items()}, targets_of(ratios, spreads, preset)


def targets_of(
    ratios: dict[str, float], spreads: dict[str, list[float]], preset: str
) -> list[dict[str, Any]]:
    """Each target of `preset` judged on its ratio (and the ratio's per-round values, where measured)."""
    targets: list[dict[str, Any]] = []

    def judge(
        name: str, ratio: str, limit: float, higher_is_better: bool, floor: float | None = None
    ) -> None:
        targets.append(target(name, ratios.get(ratio), limit, higher_is_better, floor, spreads.get(ratio)))

    # the serving-overhead targets of issue 20: on tiny, per-call costs weigh most, so the limit is wider
    overhead = overhead_limit(preset)
    judge(
        f"serving overhead d/b p50 at concurrency 1 <= {overhead:g}",
        "d/b p50 at concurrency 1 (serving overhead)",
        overhead,
        False,
        floor=1.0,
    )
    judge(
        f"serving overhead d/b p50 at concurrency 1, request-paired, <= {overhead:g}",
        PAIRED,
        overhead,
        False,
        1.0,
    )
    judge("d faster than a at p50 (d/a < 1)", "d/a p50 at concurrency 1", 1.0, False)
    judge("d faster than c at p50 (d/c < 1)", "d/c p50 at concurrency 1", 1.0, False)
    if preset not in TINY_PRESETS:
        judge("d images/s at concurrency 8 >= 0.95x b's", "d/b images/s at concurrency 8", 0.95, True)
    need = 2.0 if preset in TINY_PRESETS else 1.0
    judge(f"d images/s at concurrency 8 >= {need:g}x c's", "d/c images/s at concurrency 8", need, True)
    return targets


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
