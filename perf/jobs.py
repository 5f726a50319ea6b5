"""`sd-triton perf jobs`: what async jobs cost on top of Triton's own stream, side by side in one run.

Three ways to the same image (a new seed every run, so the cache never answers), interleaved:

  direct - Triton's txt2img_stream over gRPC streaming, no gateway: the floor;
  job    - POST /v1/jobs, then its Server-Sent Events from the gateway (queue, Redis-free store,
           JSON events, previews when asked);
  sync   - POST /v1/generate (the txt2img ensemble), for the end-to-end comparison.

Reported (medians over the runs): time to the first step event, the interval between step events,
the total; the SSE overhead per step = job step interval - direct step interval, and the time to
first step difference.
"""

from __future__ import annotations

import json
import logging
import queue
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from sd_triton import contract as c
from sd_triton.txt2img_client import infer_input, txt2img_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobsBenchSettings:
    preset: str = "tiny"
    steps: int = 20
    repeats: int = 10
    preview: bool = True
    prompt: str = "a red circle on a blue background"
    scheduler: str = "ddim"
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        for name in ("steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Run:
    first_step_ms: float
    step_interval_ms: float  # median gap between consecutive step events
    total_ms: float


def _run_of(started: float, step_times: list[float], finished: float) -> Run:
    gaps = np.diff(step_times) * 1000 if len(step_times) > 1 else np.array([0.0])
    return Run(
        first_step_ms=(step_times[0] - started) * 1000,
        step_interval_ms=float(np.median(gaps)),
        total_ms=(finished - started) * 1000,
    )


def direct_run(client: grpcclient.InferenceServerClient, params: dict[str, Any], preview: bool) -> Run:
    """One request on Triton's txt2img_stream; the stream is opened before the clock starts."""
    responses: queue.Queue[tuple[float, Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))
    try:
        inputs = txt2img_inputs(params.pop("prompt"), **params)
        if preview:
            inputs.append(infer_input(c.PREVIEW, np.array([True])))
        started = time.perf_counter()
        client.async_stream_infer(c.TXT2IMG_STREAM.name, inputs)
        steps: list[float] = []
        while True:
            at, result, error = responses.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"txt2img_stream: {error}")
            if result.as_numpy(c.IMAGES.name) is not None:
                return _run_of(started, steps, at)
            steps.append(at)
    finally:
        client.stop_stream()


def job_run(http: httpx.Client, body: dict[str, Any]) -> Run:
    """POST /v1/jobs, then its event stream until `completed`."""
    started = time.perf_counter()
    job = http.post("/v1/jobs", json=body)
    job.raise_for_status()
    steps: list[float] = []
    event = ""
    with http.stream("GET", f"/v1/jobs/{job.json()['id']}/events") as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "step":
                steps.append(time.perf_counter())
            elif line.startswith("data: ") and event in ("completed", "failed", "cancelled"):
                if event != "completed":
                    raise RuntimeError(f"job {event}: {json.loads(line[6:])}")
                return _run_of(started, steps, time.perf_counter())
    raise RuntimeError("the event stream ended before the job did")


def sync_run(http: httpx.Client, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    http.post("/v1/generate", json=body).raise_for_status()
    return (time.perf_counter() - started) * 1000


def run_jobs_bench(settings: JobsBenchSettings, work_dir: Path) -> dict[str, Any]:
    from sd_triton.export.checkpoint import Checkpoint
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.perf.compare import machine
    from sd_triton.perf.stack import serving

    # 1. The preset exported, Triton and the gateway started.
    log.info("[1/3] export %s, start Triton and the gateway", settings.preset)
    repo = work_dir / f"jobs-{settings.preset}"
    manifest = run_export(ExportOptions(settings.preset, repo, work_dir=work_dir))
    height, width = Checkpoint.open(Path(manifest["source"]["path"])).native_size
    common = {
        "height": height,
        "width": width,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": settings.scheduler,
    }
    runs: dict[str, list[Any]] = {"direct": [], "job": [], "sync": []}
    with (
        serving(repo) as stack,
        grpcclient.InferenceServerClient(stack.triton.grpc_url) as client,
        httpx.Client(base_url=stack.gateway_url, timeout=600) as http,
    ):
        # 2. Warm-up: every path once.
        log.info("[2/3] warm-up")
        body = {"prompt": settings.prompt, **common}
        direct_run(client, {**body, "seed": 0, "num_images": 1}, settings.preview)
        job_run(http, {**body, "seed": 0, "preview": settings.preview})
        sync_run(http, {**body, "seed": 0})
        # 3. The three paths interleaved, a fresh seed each time.
        for repeat in range(settings.repeats):
            log.info("[3/3] run %d/%d", repeat + 1, settings.repeats)
            seed = 1000 + repeat
            runs["direct"].append(
                direct_run(client, {**body, "seed": seed, "num_images": 1}, settings.preview)
            )
            runs["job"].append(job_run(http, {**body, "seed": seed, "preview": settings.preview}))
            runs["sync"].append(sync_run(http, {**body, "seed": seed + 10_000}))
    return {"settings": asdict(settings), "size": [height, width], "machine": machine(), **summary(runs)}


def summary(runs: dict[str, list[Any]]) -> dict[str, Any]:
    def median(path: str, field: str) -> float:
        return round(float(statistics.median(getattr(r, field) for r in runs[path])), 2)

    rows = {
        path: {field: median(path, field) for field in ("first_step_ms", "step_interval_ms", "total_ms")}
        for path in ("direct", "job")
    }
    sync_ms = round(statistics.median(runs["sync"]), 2)
    overhead = {
        "first_step_ms": round(rows["job"]["first_step_ms"] - rows["direct"]["first_step_ms"], 2),
        "per_step_ms": round(rows["job"]["step_interval_ms"] - rows["direct"]["step_interval_ms"], 2),
        "total_ms": round(rows["job"]["total_ms"] - rows["direct"]["total_ms"], 2),
        "job_vs_sync_total": round(rows["job"]["total_ms"] / sync_ms, 3),
    }
    return {
        "rows": rows,
        "sync_total_ms": sync_ms,
        "overhead": overhead,
        "runs": {k: len(v) for k, v in runs.items()},
    }


def table(document: dict[str, Any]) -> str:
    rows, overhead = document["rows"], document["overhead"]
    lines = [
        f"perf jobs: {document['settings']['preset']} {document['size'][1]}x{document['size'][0]}, "
        f"{document['settings']['steps']} steps, preview={document['settings']['preview']}, "
        f"medians of {document['runs']['job']} interleaved runs",
        "| path | first step event (ms) | step interval (ms) | total (ms) |",
        "|---|---|---|---|",
    ]
    for path, row in rows.items():
        label = "Triton txt2img_stream (gRPC)" if path == "direct" else "gateway job (POST + SSE)"
        lines.append(f"| {label} | {row['first_step_ms']} | {row['step_interval_ms']} | {row['total_ms']} |")
    lines.append(f"| gateway /v1/generate (sync) | - | - | {document['sync_total_ms']} |")
    lines.append(
        f"SSE overhead: {overhead['first_step_ms']} ms to the first step event, "
        f"{overhead['per_step_ms']} ms per step, {overhead['total_ms']} ms in total; "
        f"job / sync total = {overhead['job_vs_sync_total']}"
    )
    return "\n".join(lines)
