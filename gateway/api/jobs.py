"""The /v1/jobs routes: submit, status, Server-Sent Events, cancel (gateway/jobs/ does the work)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from sd_triton.gateway.deps import AccessDep, BaseUrlDep, CacheAllowedDep, JobsDep
from sd_triton.gateway.errors import NotFoundError
from sd_triton.gateway.jobs.manager import JobManager
from sd_triton.gateway.jobs.models import JobRecord, JobRequest, JobView
from sd_triton.gateway.schemas import ErrorResponse

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "no such job (or not this API key's)"},
    422: {"model": ErrorResponse, "description": "a field out of its limits; the message names both"},
    503: {"model": ErrorResponse, "description": "Triton unreachable or not ready; see Retry-After"},
}


async def _owned(jobs: JobManager, job_id: str, access: AccessDep) -> JobRecord:
    """The job, if the caller may see it: with API keys, only the key that submitted it."""
    record = await jobs.get(job_id)
    if record is None or record.key_id != access.ctx.key_id:
        raise NotFoundError(f"job: no job {job_id!r}", field="id")
    return record


@router.post("", status_code=202, response_model=JobView, responses=ERRORS)
async def submit_job(
    body: JobRequest, jobs: JobsDep, access: AccessDep, base_url: BaseUrlDep, use_cache: CacheAllowedDep
) -> JobView:
    """Queue a generation (the /v1/generate body, plus `preview` and `webhook_url`). Checked now;
    follow it at `events_url` (SSE) or `GET /v1/jobs/{id}`. Charged to the key's quota now.
    `Cache-Control: no-cache` asks for a fresh generation, as on /v1/generate."""
    await access.admit([body.prompt], body.num_images, field="prompt")
    record = await jobs.submit(body, access.ctx.key_id, base_url, use_cache)
    return await jobs.view(record, base_url)


@router.get("/{job_id}", response_model=JobView, responses=ERRORS)
async def get_job(job_id: str, jobs: JobsDep, access: AccessDep, base_url: BaseUrlDep) -> JobView:
    """Status, queue position, progress, and the result once completed."""
    return await jobs.view(await _owned(jobs, job_id, access), base_url)


@router.delete("/{job_id}", response_model=JobView, responses=ERRORS)
async def cancel_job(job_id: str, jobs: JobsDep, access: AccessDep, base_url: BaseUrlDep) -> JobView:
    """Cancel: a queued job at once, a running one at its next denoising step (Triton drops it
    from the batch). A finished job is returned unchanged."""
    record = await jobs.cancel(await _owned(jobs, job_id, access))
    return await jobs.view(record, base_url)


@router.get(
    "/{job_id}/events",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "the job's events"}},
)
async def job_events(
    job_id: str,
    jobs: JobsDep,
    access: AccessDep,
    last_event_id: Annotated[int | None, Header()] = None,
) -> StreamingResponse:
    """Server-Sent Events: `queued` {position}, one `step` {step, steps, eta_s, elapsed_s,
    preview?} per denoising step, then `completed` {result}, `failed` {error} or `cancelled`.
    Events so far are replayed first (from `Last-Event-ID` when the client reconnects)."""
    await _owned(jobs, job_id, access)
    frames = _sse(jobs.events(job_id, after=last_event_id or 0), jobs.settings.job_keepalive_s)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)


async def _sse(events: AsyncIterator[dict[str, Any]], keepalive_s: float) -> AsyncIterator[str]:
    """Events as SSE frames, and a comment line when none came for keepalive_s (proxies close idle
    connections; a write also tells us when the client has gone)."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for event in events:
                await queue.put(event)
        finally:
            await queue.put(None)

    reader = asyncio.create_task(read())
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:  # its own class on Python 3.10, TimeoutError from 3.11
                yield ": keepalive\n\n"
                continue
            if event is None:
                return
            data = json.dumps(event["data"], separators=(",", ":"))
            yield f"id: {event['seq']}\nevent: {event['event']}\ndata: {data}\n\n"
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
