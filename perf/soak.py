"""`sd-triton perf soak`: a steady load on a real Triton and gateway for a set time, to catch what only
time shows: errors after many requests, latency that creeps up, memory that is never given back.

The load: `concurrency` closed-loop clients (httpx, one shared connection pool) POST /v1/generate back
to back with `Cache-Control: no-cache` and a new seed every request, so each one is a real generation.
Before the clock starts, `untimed_rounds` (2) rounds of `concurrency` requests sent at once: sessions
load lazily, and ONNX Runtime's arenas grow to the largest batch they see, which a steady closed loop
may only reach minutes in. Clients stop sending at the deadline; the requests then in flight
finish and count.

Time is cut into windows by each request's start time:

  warm-up  the first `warmup_fraction` of the run (default 20%: 2 of 10 minutes). Allocators, ONNX
           Runtime's arenas and the Python heaps reach their working size; counted for errors, not
           judged for latency or memory.
  1..N     the rest in `windows` equal windows (default 4: 2 minutes each in a 10-minute run). On
           the small preset (about 0.3 requests/s on two cores) that is some 35 requests a window, so
           a window's p99 is close to its slowest request; a longer soak (30 minutes) steadies it.
           Each window also shows the CPU cores the gateway, Triton and every other process on the
           machine used: a p99 that rises while other processes take cores was the machine, not
           the stack; one that rises at the same cores and fewer requests was the stack.

Figures, with their default targets:

  errors       every request, warm-up included: a non-200 answer, a transport error, no image. 0.
  p99 drift    p99 latency of the last window vs the first window, in percent. < 10%.
  RSS growth   per process group, in percent: the median of the first `rss_samples` samples after the
               warm-up vs the median of the last `rss_samples` samples before the deadline. < 5%.
               Medians of a few samples (default 5, one every 2 s) rather than single readings, so
               that the buffers of the requests in flight at one instant do not decide the figure.

Process groups: `gateway` (the uvicorn process and any children) and `triton` (tritonserver and all
its descendants: the python backend runs every model instance as its own triton_python_backend_stub
process). RSS is summed over a group at each sample (psutil); every process's own figures are kept too,
so a growth can be traced to the model whose stub grew.

The gateway is started as the other benchmarks start it (no API keys, result cache off) unless
`cache` is set: then its result cache is on, as deployed, and every fresh result is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from sd_triton.perf.stats import latency_percentiles, percentile

log = logging.getLogger(__name__)

NO_CACHE = {"Cache-Control": "no-cache"}  # every request a fresh generation
GROUPS = ("gateway", "triton")
MB = 1024 * 1024


@dataclass(frozen=True)
class SoakSettings:
    preset: str = "small"
    minutes: float = 10.0
    concurrency: int = 4
    steps: int = 10
    height: int | None = None  # None: the preset's native size
    width: int | None = None
    warmup_fraction: float = 0.2
    windows: int = 4  # judged windows after the warm-up
    sample_s: float = 2.0  # RSS and CPU sampling interval
    rss_samples: int = 5  # samples whose median is "after warm-up" and "at the end"
    untimed_rounds: int = 2  # before the clock: rounds of `concurrency` requests sent at once
    progress_s: float = 60.0  # a progress line at most this often
    max_errors: int = 0
    max_p99_drift_pct: float = 10.0
    max_rss_growth_pct: float = 5.0
    cache: bool = False  # the gateway's result cache on (stores every fresh result), as deployed
    prompt: str = "a red circle on a blue background"
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    seed: int = 100_000  # request i gets seed + i

    def __post_init__(self) -> None:
        checks = {
            "minutes": self.minutes > 0,
            "concurrency": self.concurrency >= 1,
            "steps": self.steps >= 1,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "windows": self.windows >= 2,
            "sample_s": self.sample_s > 0,
            "rss_samples": self.rss_samples >= 1,
            "untimed_rounds": self.untimed_rounds >= 0,
            "progress_s": self.progress_s > 0,
            "max_errors": self.max_errors >= 0,
            "max_p99_drift_pct": self.max_p99_drift_pct >= 0,
            "max_rss_growth_pct": self.max_rss_growth_pct >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup_s(self) -> float:
        return self.seconds * self.warmup_fraction

    @property
    def window_s(self) -> float:
        return (self.seconds - self.warmup_s) / self.windows


@dataclass(frozen=True)
class Running:
    """Servers already up (tests): the repository Triton serves, the gateway's URL, and the root pid
    of each process group to measure ({"gateway": pid, "triton": pid})."""

    repo: Path
    gateway_url: str
    pids: dict[str, int]


@dataclass(frozen=True)
class Outcome:
    start_s: float  # since the clock started
    end_s: float
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.start_s) * 1000.0


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss: dict[str, dict[int, int]]  # group -> pid -> bytes
    # cumulative CPU seconds (user + system): each group's live processes, this load driver ("driver")
    # and the whole machine's busy time ("machine"), so that a window shows who had the cores
    cpu_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Sampler:
    """RSS and CPU time of each group's root process and all its descendants (a label per process),
    and the CPU time of this process and of the machine."""

    pids: dict[str, int]
    labels: dict[int, str] = field(default_factory=dict)  # a group's root process: the group's name

    def sample(self, at_s: float) -> Sample:
        rss: dict[str, dict[int, int]] = {}
        machine = psutil.cpu_times()
        cpu_s = {
            "machine": machine.user + machine.nice + machine.system + machine.irq + machine.softirq,
            "driver": sum(psutil.Process().cpu_times()[:2]),
        }
        for group, pid in self.pids.items():
            rss[group], cpu_s[group] = {}, 0.0
            try:
                root = psutil.Process(pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in processes:
                try:
                    rss[group][process.pid] = int(process.memory_info().rss)
                    cpu_s[group] += sum(process.cpu_times()[:2])
                    if process.pid not in self.labels:
                        self.labels[process.pid] = group if process.pid == pid else _label(process)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return Sample(at_s, rss, cpu_s)


def _label(process: psutil.Process) -> str:
    """`stub:<model>` for a python backend stub (its first argument is the model's
    `<repo>/<model>/<version>/model.py`), else the process name."""
    command = process.cmdline()
    if command and command[0].endswith("triton_python_backend_stub") and len(command) > 1:
        return f"stub:{Path(command[1]).parent.parent.name}"
    return str(process.name())


async def drive(
    url: str, body: dict[str, Any], settings: SoakSettings, sampler: Sampler
) -> tuple[list[Outcome], list[Sample]]:
    """The untimed rounds, then the closed-loop load until the deadline with RSS and CPU time sampled
    alongside and progress logged."""
    outcomes: list[Outcome] = []
    samples: list[Sample] = []
    seeds = itertools.count(settings.seed)
    started = 0.0

    def clock() -> float:
        return time.monotonic() - started

    async def client(http: httpx.AsyncClient) -> None:
        while (start := clock()) < settings.seconds:
            error: str | None = None
            try:
                response = await http.post("/v1/generate", json={**body, "seed": next(seeds)})
                if response.status_code != 200:
                    error = f"HTTP {response.status_code}: {response.text[:300]}"
                elif not response.json().get("images"):
                    error = "HTTP 200 without images"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            outcomes.append(Outcome(start, clock(), error))

    async def watch() -> None:
        next_progress = settings.progress_s
        while (now := clock()) < settings.seconds:
            samples.append(await asyncio.to_thread(sampler.sample, now))
            if now >= next_progress:
                _log_progress(settings, outcomes, samples[-1], now)
                next_progress += settings.progress_s
            await asyncio.sleep(max(0.0, settings.sample_s - (clock() - now)))

    limits = httpx.Limits(max_connections=settings.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=NO_CACHE) as http:
        for number in range(settings.untimed_rounds):
            log.info(
                "untimed round %d/%d: %d requests at once",
                number + 1,
                settings.untimed_rounds,
                settings.concurrency,
            )
            rounds = [
                http.post("/v1/generate", json={**body, "seed": next(seeds)})
                for _ in range(settings.concurrency)
            ]
            for response in await asyncio.gather(*rounds):
                response.raise_for_status()
        log.info("the clock starts: %.1f min", settings.minutes)
        started = time.monotonic()
        await asyncio.gather(watch(), *(client(http) for _ in range(settings.concurrency)))
    return outcomes, samples


def _log_progress(settings: SoakSettings, outcomes: list[Outcome], sample: Sample, now: float) -> None:
    recent = [o.latency_ms for o in outcomes if o.error is None and o.end_s > now - settings.progress_s]
    rss = ", ".join(f"{g} {sum(sample.rss.get(g, {}).values()) / MB:.0f} MB" for g in GROUPS)
    log.info(
        "soak: %.1f/%.1f min, %d requests, %d errors; last %.0f s p50 %.0f ms; RSS %s",
        now / 60,
        settings.minutes,
        len(outcomes),
        sum(o.error is not None for o in outcomes),
        settings.progress_s,
        percentile(recent, 50),
        rss,
    )


def run_soak(settings: SoakSettings, work_dir: Path, running: Running | None = None) -> dict[str, Any]:
    """Export the preset, start Triton and the gateway (unless `running`), drive the load, and return
    the result document (`summary`)."""
    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.manifest import Manifest
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.perf.compare import machine, request_body
    from sd_triton.perf.stack import serving

    # 1. The preset exported (python-ort engines, default repository settings) and the request size.
    repo = running.repo if running else work_dir / f"soak-{settings.preset}"
    if not running:
        log.info("[1/3] export %s", settings.preset)
        run_export(ExportOptions(settings.preset, repo, work_dir=work_dir))
    native_h, native_w = Checkpoint.open(Manifest.load(repo).checkpoint).native_size
    height, width = settings.height or native_h, settings.width or native_w
    body = request_body(settings, height, width)
    with contextlib.ExitStack() as stack:
        # 2. Triton and the gateway, and the process groups to watch.
        if running:
            url, pids = running.gateway_url, running.pids
        else:
            log.info("[2/3] start Triton and the gateway")
            served = stack.enter_context(serving(repo, cache=settings.cache))
            triton, gateway = served.triton, served.gateway
            assert triton.process is not None and gateway is not None and gateway.process is not None
            url, pids = gateway.url, {"gateway": gateway.process.pid, "triton": triton.process.pid}
        # 3. The untimed rounds, then the soak.
        log.info(
            "[3/3] soak: %s %dx%d, %d steps, concurrency %d, %.1f min (warm-up %.0f s, %d windows of %.0f s)",
            settings.preset,
            width,
            height,
            settings.steps,
            settings.concurrency,
            settings.minutes,
            settings.warmup_s,
            settings.windows,
            settings.window_s,
        )
        sampler = Sampler(dict(pids))
        with _quiet("httpx"):  # not a log line per request
            outcomes, samples = asyncio.run(drive(url, body, settings, sampler))
    document = summary(settings, outcomes, samples, sampler.labels)
    return {"size": [height, width], "machine": machine(), **document}


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)


def _pct_change(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before <= 0:
        return None
    return round(100.0 * (after / before - 1.0), 2)


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def _windows(settings: SoakSettings, outcomes: list[Outcome], samples: list[Sample]) -> list[dict[str, Any]]:
    bounds = [(0.0, settings.warmup_s)] + [
        (settings.warmup_s + i * settings.window_s, settings.warmup_s + (i + 1) * settings.window_s)
        for i in range(settings.windows)
    ]
    rows = []
    for number, (start, end) in enumerate(bounds):
        last = number == len(bounds) - 1
        inside = [o for o in outcomes if start <= o.start_s < end or (last and o.start_s >= end)]
        latencies = [o.latency_ms for o in inside if o.error is None]
        in_window = [s for s in samples if start <= s.at_s < end]
        rss_mb = {}
        for group in GROUPS:
            median = _median([sum(s.rss.get(group, {}).values()) for s in in_window])
            rss_mb[group] = None if median is None else round(median / MB, 1)
        rows.append(
            {
                "window": "warm-up" if number == 0 else str(number),
                "start_s": round(start, 1),
                "end_s": round(end, 1),
                "requests": len(inside),
                "errors": sum(o.error is not None for o in inside),
                **latency_percentiles(latencies, (50, 99)),
                "rss_mb": rss_mb,
                "cpu_cores": _cpu_cores(in_window),
            }
        )
    return rows


def _cpu_cores(samples: list[Sample]) -> dict[str, float | None]:
    """Cores used on average between the window's first and last sample: the gateway, Triton, and
    every other process on the machine (not this load driver)."""
    first, last = (samples[0], samples[-1]) if len(samples) > 1 else (None, None)
    if first is None or last is None or not first.cpu_s or not last.cpu_s:
        return {group: None for group in (*GROUPS, "others")}
    seconds = last.at_s - first.at_s
    cores = {key: (last.cpu_s[key] - first.cpu_s[key]) / seconds for key in first.cpu_s}
    cores["others"] = max(0.0, cores["machine"] - cores["driver"] - sum(cores[g] for g in GROUPS))
    return {key: round(cores[key], 2) for key in (*GROUPS, "others")}


def _rss_growth(
    settings: SoakSettings, samples: list[Sample], labels: dict[int, str], group: str
) -> dict[str, Any]:
    """The group's and each process's RSS after warm-up and at the end (medians of rss_samples)."""
    after = [s for s in samples if s.at_s >= settings.warmup_s]
    first, last = after[: settings.rss_samples], after[-settings.rss_samples :]

    def total(chosen: list[Sample]) -> float | None:
        median = _median([sum(s.rss.get(group, {}).values()) for s in chosen])
        return None if median is None else median / MB

    def own(chosen: list[Sample], pid: int) -> float | None:
        median = _median([s.rss[group][pid] for s in chosen if pid in s.rss.get(group, {})])
        return None if median is None else round(median / MB, 1)

    before_mb, end_mb = total(first), total(last)
    pids = sorted({pid for s in first + last for pid in s.rss.get(group, {})})
    processes = [
        {
            "pid": pid,
            "name": labels.get(pid, "?"),
            "after_warmup_mb": own(first, pid),
            "end_mb": own(last, pid),
            "growth_pct": _pct_change(own(first, pid), own(last, pid)),
        }
        for pid in pids
    ]
    return {
        "after_warmup_mb": None if before_mb is None else round(before_mb, 1),
        "end_mb": None if end_mb is None else round(end_mb, 1),
        "growth_pct": _pct_change(before_mb, end_mb),
        "samples": len(after),
        "processes": processes,
    }


def _target(figure: str, value: float | None, limit: float, unit: str) -> dict[str, Any]:
    """A count must stay at or under its limit (`<= 0` errors); a percentage under it (`< 10%`)."""
    if unit:
        met, target = (None if value is None else value < limit), f"< {limit:g}{unit}"
    else:
        met, target = (None if value is None else value <= limit), f"<= {limit:g}"
    return {"figure": figure, "value": value, "target": target, "unit": unit, "met": met}


def summary(
    settings: SoakSettings, outcomes: list[Outcome], samples: list[Sample], labels: dict[int, str]
) -> dict[str, Any]:
    """The result document: counts, windows, p99 drift, RSS growth per group, targets and verdict. A
    figure that could not be measured (no latency in a window, no RSS sample) fails its target."""
    errors = [o.error for o in outcomes if o.error is not None]
    windows = _windows(settings, outcomes, samples)
    drift = _pct_change(windows[1]["p99_ms"], windows[-1]["p99_ms"])
    p50_drift = _pct_change(windows[1]["p50_ms"], windows[-1]["p50_ms"])  # shown, not judged
    rss = {group: _rss_growth(settings, samples, labels, group) for group in GROUPS}
    targets = [
        _target("errors", len(errors), settings.max_errors, ""),
        _target("p99 drift, last vs first window (%)", drift, settings.max_p99_drift_pct, "%"),
        *(
            _target(
                f"{g} RSS growth after warm-up (%)", rss[g]["growth_pct"], settings.max_rss_growth_pct, "%"
            )
            for g in GROUPS
        ),
    ]
    ended = max((o.end_s for o in outcomes), default=0.0)
    ok = len(outcomes) - len(errors)
    return {
        "settings": asdict(settings),
        "requests": len(outcomes),
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": round(ended, 1),
        "images_per_s": round(ok / ended, 3) if ended > 0 else 0.0,
        "windows": windows,
        "p99_drift_pct": drift,
        "p50_drift_pct": p50_drift,
        "rss": rss,
        "targets": targets,
        "passed": all(t["met"] is True for t in targets),
    }


def _figure(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}{unit}" if unit == "%" else f"{value:g}{unit}"


def table(document: dict[str, Any]) -> str:
    s = document["settings"]
    height, width = document.get("size", [s["height"], s["width"]])
    lines = [
        f"perf soak: {s['preset']} {width}x{height}, {s['steps']} steps, concurrency {s['concurrency']}, "
        f"{s['minutes']:g} min, gateway cache {'on' if s['cache'] else 'off'}: "
        f"{document['requests']} requests, {document['errors']} errors, {document['images_per_s']} images/s",
        "| window | from-to (s) | requests | errors | p50 ms | p99 ms | gateway RSS MB | Triton RSS MB "
        "| CPU cores: gateway / Triton / other processes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cores = (*GROUPS, "others")
    for w in document["windows"]:
        rss = w["rss_mb"]
        lines.append(
            f"| {w['window']} | {w['start_s']:g}-{w['end_s']:g} | {w['requests']} | {w['errors']} | "
            f"{_figure(w['p50_ms'])} | {_figure(w['p99_ms'])} | {_figure(rss['gateway'])} | "
            f"{_figure(rss['triton'])} | {' / '.join(_figure(w['cpu_cores'][k]) for k in cores)} |"
        )
    lines += ["", "| figure | measured | target | verdict |", "|---|---|---|---|"]
    for t in document["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "FAIL (not measured)"}[t["met"]]
        lines.append(f"| {t['figure']} | {_figure(t['value'], t['unit'])} | {t['target']} | {verdict} |")
    p50_drift = _figure(document["p50_drift_pct"], "%")
    lines += ["", f"p50 drift, last vs first window: {p50_drift} (not judged)", ""]
    for group in GROUPS:
        rss = document["rss"][group]
        processes = ", ".join(
            f"{p['name']} {_figure(p['after_warmup_mb'])}->{_figure(p['end_mb'])}" for p in rss["processes"]
        )
        lines.append(
            f"{group} RSS after warm-up -> end (MB, medians of {s['rss_samples']} samples): "
            f"{_figure(rss['after_warmup_mb'])} -> {_figure(rss['end_mb'])}; {processes}"
        )
    if document["error_samples"]:
        lines.append("errors: " + " | ".join(document["error_samples"]))
    lines.append(f"soak: {'PASS' if document['passed'] else 'FAIL'}")
    return "\n".join(lines)
