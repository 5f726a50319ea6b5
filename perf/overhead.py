"""`sd-triton perf overhead`: what serving adds to every denoising step, measured two ways in one run.

For the engine floor (the repository's engines in this process, run exactly as the stack's configs run
them: compare.floor_pipeline) and for the stack (gateway + Triton) in each batching mode and UNet path
(`continuous/inline`, `continuous/bls`, `dynamic/bls`, ...), at each
concurrency level, the same closed-loop load runs at two step counts, `steps` and `steps_high`,
interleaved round by round (floor low, floor high, then each mode low, high; the order of the two flips
every round). Per round and system:

  step_ms        the latency slope: (p50 at steps_high - p50 at steps) / (steps_high - steps), the time
                 one more denoising step adds to a request;
  unet_ms        the mean UNet call: Triton's compute_infer for the `unet` model (bls), the loop's own
                 timer (inline: the sd_triton_inline_unet_* metrics), or the floor's timer around the
                 session;
  other_ms       step_ms - unet_ms: everything in a step that is not the UNet call (BLS round trip,
                 scheduler step, guidance, concatenation, thread hand-offs), per iteration;
  other_ms_per_request_step  other_ms / the request steps one UNet call carries (continuous batching
                 shares an iteration's work between the requests in it).

Rows keep the median over rounds and the spread (min, max). What serving adds per step is the stack's
minus the floor's, per round: as the slope (step_ms) and as the time outside the UNet (other_ms). A
target whose limit lies inside the rounds' spread is "inconclusive", not met or missed.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from sd_triton import contract as c
from sd_triton.model_params import UNET_PATHS
from sd_triton.perf.batching import MODES, BatchingSettings
from sd_triton.perf.compare import (
    floor_generate,
    floor_pipeline,
    http_levels,
    machine,
    measure_in_process,
    overhead_limit,
    request_body,
    stack_torch_threads,
    target,
    verdict_lines,
    warm_up,
)
from sd_triton.perf.loadgen import inline_unet_key

log = logging.getLogger(__name__)

FLOOR = "floor"
STEP_MS_LIMIT = 1.0  # issue 20: serving adds at most this much to every denoising step at concurrency 1
# An SD 1.5 512x512 UNet step (CFG pair) on an H100/A100 with TensorRT, the figure issue 20 and the GPU
# goals assume: the report states the overhead as a share of it.
GPU_UNET_STEP_MS = (5.0, 10.0)


@dataclass(frozen=True)
class OverheadSettings(BatchingSettings):
    """The load of `perf batching`; `steps` and `steps_high` are the two step counts of the slope,
    `repeats` the interleaved rounds."""

    steps_high: int = 30
    concurrency: tuple[int, ...] = (1, 8)
    rounds: int = 1  # requests per run: concurrency x rounds, at least min_requests
    min_requests: int = 4
    repeats: int = 3
    modes: tuple[str, ...] = MODES
    unet_paths: tuple[str, ...] = ("inline", "bls")

    def __post_init__(self) -> None:
        super().__post_init__()
        for path in self.unet_paths:
            if path not in UNET_PATHS:
                raise ValueError(f"unet_paths: {path!r} is not one of {', '.join(UNET_PATHS)}")
        if not self.stacks():
            raise ValueError("modes and unet_paths leave no stack to measure (inline needs continuous)")
        if self.steps_high <= self.steps:
            raise ValueError(f"steps_high must be above steps ({self.steps}), got {self.steps_high}")

    def stacks(self) -> list[tuple[str, str, str]]:
        """(name, batching mode, UNet path) of every stack measured. The inline path only where the loop
        batches continuously: the other modes merge the loops' calls in Triton's unet model (bls)."""
        return [
            (f"{mode}/{path}", mode, path)
            for mode in self.modes
            for path in self.unet_paths
            if path == "bls" or mode == "continuous"
        ]

    def one_run(self, level: int, steps: int) -> BatchingSettings:
        """The load of one run: this concurrency level at this step count."""
        base = {f.name: getattr(self, f.name) for f in fields(BatchingSettings)}
        return BatchingSettings(**{**base, "concurrency": (level,), "steps": steps})


class TimedRunner:
    """An engine runner whose `run` calls are timed (the floor's UNet)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls_ms: list[float] = []
        self._lock = threading.Lock()

    def run(self, feeds: Any) -> Any:
        started = time.perf_counter()
        outputs = self.inner.run(feeds)
        with self._lock:
            self.calls_ms.append(1000 * (time.perf_counter() - started))
        return outputs

    def take(self) -> list[float]:
        with self._lock:
            calls, self.calls_ms = self.calls_ms, []
        return calls


def run_split(steps: int, p50_ms: float, requests: int, unet_ms: float, unet_calls: float) -> dict[str, Any]:
    """One run at one step count: its p50, the mean UNet call and the request steps per call."""
    return {
        "steps": steps,
        "p50_ms": p50_ms,
        "unet_ms": unet_ms,
        "request_steps_per_call": requests * steps / unet_calls if unet_calls else None,
    }


def round_split(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """A round's two runs as the per-step split (module docstring)."""
    step_ms = (high["p50_ms"] - low["p50_ms"]) / (high["steps"] - low["steps"])
    unet_ms = (low["unet_ms"] + high["unet_ms"]) / 2
    shared = high["request_steps_per_call"] or 1.0
    return {
        "step_ms": step_ms,
        "unet_ms": unet_ms,
        "other_ms": step_ms - unet_ms,
        "other_ms_per_request_step": (step_ms - unet_ms) / shared,
        "request_steps_per_call": shared,
        "p50_low_ms": low["p50_ms"],
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the rounds of each figure, and the spread of each as [min, max]."""
    row: dict[str, Any] = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        row[key] = round(statistics.median(values), 3)
        row[f"{key}_spread"] = [round(min(values), 3), round(max(values), 3)]
    row["rounds"] = len(rounds)
    return row


def judged(name: str, values: list[float], limit: float, floor: float | None = None) -> dict[str, Any]:
    """A lower-is-better target on per-round values: the median judged, "inconclusive" when the limit
    lies inside the rounds' spread."""
    return target(name, statistics.median(values) if values else None, limit, False, floor, values)


def differences(document_rounds: dict[str, list[dict[str, Any]]], mode: str, key: str) -> list[float]:
    """Per round, the stack's `key` minus the floor's (what serving adds)."""
    stack, floor = document_rounds.get(mode, []), document_rounds.get(FLOOR, [])
    return [s[key] - f[key] for s, f in zip(stack, floor, strict=False)]


def targets_of(
    per_round: dict[tuple[str, int], list[dict[str, Any]]], preset: str, mode: str
) -> list[dict[str, Any]]:
    """Issue 20's targets at concurrency 1 for `mode`, from the per-round splits."""
    at_1 = {system: rounds for (system, level), rounds in per_round.items() if level == 1}
    ratio_limit = overhead_limit(preset)
    ratios = [
        s["p50_low_ms"] / f["p50_low_ms"]
        for s, f in zip(at_1.get(mode, []), at_1.get(FLOOR, []), strict=False)
    ]
    adds = f"serving adds <= {STEP_MS_LIMIT:g} ms per step at concurrency 1 ({mode}"
    return [
        judged(f"{adds}, latency slope over the floor's)", differences(at_1, mode, "step_ms"), STEP_MS_LIMIT),
        judged(
            f"{adds}, time outside the UNet over the floor's)",
            differences(at_1, mode, "other_ms"),
            STEP_MS_LIMIT,
        ),
        judged(
            f"{mode} p50 <= {ratio_limit:g}x the floor's at concurrency 1", ratios, ratio_limit, floor=1.0
        ),
    ]


def run_overhead(settings: OverheadSettings, work_dir: Path) -> dict[str, Any]:
    """Measure the floor and every stack of `settings.stacks()`; return the result document."""
    from contextlib import ExitStack

    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.perf.stack import serving

    urls: dict[str, tuple[str, str, str]] = {}  # system -> (gateway URL, Triton metrics URL, UNet split key)
    per_round: dict[tuple[str, int], list[dict[str, Any]]] = {}
    systems = settings.stacks()
    with ExitStack() as stack:
        # 1. One repository per system (the ONNX export is cached), its Triton and gateway, warmed up;
        #    the floor on the first system's repository (the engines are the same in every one).
        for name, mode, path in systems:
            log.info("[1/3] %s: export and start", name)
            repo = work_dir / f"overhead-{settings.preset}-{mode}-{path}"
            repository = replace(settings.repository(mode), unet_path=path)
            manifest = run_export(
                ExportOptions(settings.preset, repo, settings=repository, work_dir=work_dir)
            )
            native_h, native_w = Checkpoint.open(Path(manifest["source"]["path"])).native_size
            size = (settings.height or native_h, settings.width or native_w)
            served = stack.enter_context(serving(repo))
            parallel = max(*settings.concurrency, repository.denoise_instances)
            warm_up(served.gateway_url, request_body(settings, *size), parallel)
            # the UNet's time: Triton's unet model (bls), or the loop's own timer (inline, loadgen)
            unet_key = c.UNET.name if path == "bls" else inline_unet_key(c.DENOISE.name)
            urls[name] = (served.gateway_url, served.triton.metrics_url, unet_key)
        log.info("[2/3] the floor: the engines in this process, as the stack runs them")
        _, first_mode, first_path = systems[0]
        floor_repo = work_dir / f"overhead-{settings.preset}-{first_mode}-{first_path}"
        pipeline = floor_pipeline(floor_repo)
        timer = pipeline.runners["unet"] = TimedRunner(pipeline.runners["unet"])
        floor_generate(pipeline, settings, *size)(settings.seed)  # warm-up

        # 3. Round by round, level by level: the floor and each mode at both step counts.
        stack.enter_context(stack_torch_threads())  # the floor's torch as the stack's loop runs it
        for repeat in range(settings.repeats):
            counts = (settings.steps, settings.steps_high)
            counts = counts if repeat % 2 == 0 else counts[::-1]
            for level in settings.concurrency:
                for system in (FLOOR, *urls):
                    log.info(
                        "[3/3] round %d/%d, concurrency %d, %s", repeat + 1, settings.repeats, level, system
                    )
                    runs = {}
                    for steps in counts:
                        one = settings.one_run(level, steps)
                        if system == FLOOR:
                            timer.take()
                            row = measure_in_process(FLOOR, floor_generate(pipeline, one, *size), one, level)
                            calls = timer.take()
                            unet_ms = statistics.fmean(calls) if calls else 0.0
                            runs[steps] = run_split(
                                steps, row["p50_ms"], row["requests"], unet_ms, len(calls)
                            )
                        else:
                            gateway_url, metrics_url, unet_key = urls[system]
                            body = request_body(one, *size)
                            (result,) = http_levels(
                                f"mode {system}", gateway_url, one, body, True, metrics_url
                            )
                            unet = result.triton_split_ms.get(unet_key, {})
                            runs[steps] = run_split(
                                steps,
                                result.percentile(50),
                                result.ok,
                                unet.get("compute_infer_ms", 0.0),
                                unet.get("executions", 0.0),
                            )
                    split = round_split(runs[settings.steps], runs[settings.steps_high])
                    per_round.setdefault((system, level), []).append(split)

    # 4. The document: settings, machine, a row per (system, level), what serving adds, the targets.
    rows = [
        {"system": system, "concurrency": level, **summarize(rounds)}
        for (system, level), rounds in per_round.items()
    ]
    names = [name for name, _, _ in systems]
    at_level = {
        lv: {m: r for (m, level), r in per_round.items() if level == lv} for lv in settings.concurrency
    }
    main = "continuous/inline" if "continuous/inline" in names else names[0]
    document = {
        "settings": asdict(settings),
        "size": list(size),
        "machine": machine(),
        "rows": rows,
        "serving_adds_ms_per_step": {
            f"{mode} at concurrency {level}": {
                key: round(statistics.median(d), 3)
                for key in ("step_ms", "other_ms")
                if (d := differences(at_level[level], mode, key))
            }
            for mode in names
            for level in settings.concurrency
        },
        "ratios": {},
        "targets": targets_of(per_round, settings.preset, main),
    }
    return document


def table(document: dict[str, Any]) -> str:
    head = (
        f"{'system':18s} {'conc':>4} {'step ms':>8} {'unet ms':>8} {'other ms':>9} {'other/req':>9} "
        f"{'req/call':>8}  step ms spread"
    )
    lines = [head, "-" * len(head)]
    for r in document["rows"]:
        lines.append(
            f"{r['system']:18s} {r['concurrency']:>4} {r['step_ms']:>8.2f} {r['unet_ms']:>8.2f} "
            f"{r['other_ms']:>9.2f} {r['other_ms_per_request_step']:>9.2f} "
            f"{r['request_steps_per_call']:>8.2f}  {r['step_ms_spread']}"
        )
    lines.append("")
    for name, adds in document["serving_adds_ms_per_step"].items():
        figures = ", ".join(f"{k} {v:+.2f}" for k, v in adds.items())
        lines.append(f"serving adds per step, {name}: {figures}")
    return "\n".join([*lines, "", *verdict_lines(document)])
