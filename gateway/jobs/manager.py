"""Async jobs: submit, a FIFO queue, workers that run jobs through Triton's txt2img_stream (tried
again while Triton is down or full, see `_generate`), the job's events (for Server-Sent Events),
cancel, webhooks.

Where jobs live in the shared state store, and their keys: store.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image as PILImage

from sd_triton.gateway.access.limits import StateErrors
from sd_triton.gateway.errors import (
    GatewayError,
    InvalidRequestError,
    OverloadedError,
    TritonUnavailableError,
)
from sd_triton.gateway.jobs.models import (
    TERMINAL,
    JobProgress,
    JobRecord,
    JobRequest,
    JobStatus,
    JobView,
    WebhookStatus,
)
from sd_triton.gateway.jobs.store import JobStore
from sd_triton.gateway.jobs.webhooks import WebhookSender, refused_target
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.schemas import ErrorDetail, GenerateResponse
from sd_triton.gateway.service import Generator, ProgressCallback
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.state import StateStore, StateUnavailable
from sd_triton.gateway.storage import ImageStorage
from sd_triton.txt2img_client import Progress

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    pass


class JobStopped(Exception):
    """The gateway is stopping and the job's drain time is over."""


STOPPED = ErrorDetail(type="backend_unavailable", message="the gateway stopped; submit the job again")
# the one way a job ends cancelled: a client's DELETE (api/jobs.py), seen by whichever replica runs it
CANCELLED = "cancelled by a client (DELETE /v1/jobs/{id})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def preview_data_url(previews: np.ndarray[Any, Any]) -> str:
    """The first image's preview as a PNG data URL (latent resolution: a few hundred bytes)."""
    buffer = io.BytesIO()
    PILImage.fromarray(previews[0]).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# the webhook secret of an API key (None: no key, open mode)
SecretLookup = Callable[[str | None], str | None]


class JobManager:
    def __init__(
        self,
        store: StateStore,
        generator: Generator,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        webhook_secret: SecretLookup,
        storage: ImageStorage,
    ) -> None:
        self.jobs = JobStore(store, settings.job_ttl_s)
        self.generator = generator
        self.settings = settings
        self.metrics = metrics
        self.webhook_secret = webhook_secret
        self.storage = storage
        self.webhooks = WebhookSender(
            settings.webhook_max_attempts,
            settings.webhook_backoff_s,
            settings.webhook_timeout_s,
            settings.webhook_allow_private,
        )
        self._wake = asyncio.Event()
        self._stopping = False
        self._halted = False  # past the drain: running jobs stop at their next step
        self.errors = StateErrors(metrics, "jobs waiting: the shared state is unavailable ({use})", 30.0, log)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        for index in range(self.settings.jobs_max_running):
            self._spawn(self._worker(), f"job-worker-{index}")

    async def close(self) -> None:
        """Take no new job, let running ones finish for up to `job_drain_s`, then stop the rest
        (they end `failed`, to be submitted again)."""
        self._stopping = True
        self._wake.set()
        workers = [t for t in self._tasks if t.get_name().startswith("job-worker")]
        if workers:
            _, late = await asyncio.wait(workers, timeout=self.settings.job_drain_s)
            if late:
                log.warning(
                    "jobs: %d still running after %.0f s; stopping them", len(late), self.settings.job_drain_s
                )
        # A task's cancel can be lost (a client library swallowing it mid-call): the flag makes the next
        # step stop the job regardless.
        self._halted = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.webhooks.close()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the API -----------------------------------------------------------------------------------

    async def submit(
        self, request: JobRequest, key_id: str | None, base_url: str, use_cache: bool = True
    ) -> JobRecord:
        """Checked like /v1/generate (before it is queued), then queued."""
        await self.generator.check([request.prompt], request)
        if request.webhook_url is not None and self.webhook_secret(key_id) is None:
            raise InvalidRequestError(
                "webhook_url: webhooks are signed with the API key's secret; without API keys set "
                "SD_GATEWAY_WEBHOOK_SECRET",
                field="webhook_url",
            )
        if request.webhook_url is not None:
            refused = await refused_target(request.webhook_url, self.webhooks.allow_private)
            if refused is not None:
                raise InvalidRequestError(refused, field="webhook_url")
        now = _now()
        record = JobRecord(
            id="job_" + secrets.token_hex(12),
            status="queued",
            created_at=now,
            updated_at=now,
            request=request,
            key_id=key_id,
            base_url=base_url,
            use_cache=use_cache,
            webhook=None if request.webhook_url is None else WebhookStatus(url=request.webhook_url),
        )
        await self.jobs.save(record)
        # the event first: once queued, a worker may start it (and log its steps) at once
        await self.jobs.event(record.id, "queued", {"position": await self.jobs.queue_length() + 1})
        await self.jobs.enqueue(record.id)
        self.metrics.jobs.labels(state="queued").inc()
        self._wake.set()
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.jobs.get(job_id)

    async def view(self, record: JobRecord, base_url: str) -> JobView:
        position = await self.jobs.position(record.id) if record.status == "queued" else None
        return JobView(
            **record.model_dump(include={"id", "status", "progress", "result", "error", "webhook"}),
            created_at=record.created_at,
            updated_at=record.updated_at,
            queue_position=position,
            events_url=f"{base_url.rstrip('/')}/v1/jobs/{record.id}/events",
        )

    async def cancel(self, record: JobRecord, wait_s: float = 5.0) -> JobRecord:
        """A queued job is cancelled at once; a running one at its next step (waited for up to
        wait_s). A finished job is returned as it is."""
        if record.status in TERMINAL:
            return record
        await self.jobs.mark_cancelled(record.id)
        if await self.jobs.unqueue(record.id):
            return await self._finish(record, "cancelled")
        await self.jobs.announce_cancel(record.id)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            current = await self.get(record.id)
            if current is None or current.status in TERMINAL:
                return current or record
            await asyncio.sleep(0.02)
        return await self.get(record.id) or record

    def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Every event of the job with seq > after, in order, then live ones until a terminal one.
        Yields {seq, event, data}; callers add keepalives."""
        return self.jobs.events(job_id, after)

    # -- running jobs ------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while not self._stopping:
            try:
                job_id = await self.jobs.next()
            except StateUnavailable as exc:  # an outage must not end the worker
                self.errors.record("jobs queue", exc)
                job_id = None
            if job_id is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.job_poll_s)
                except asyncio.TimeoutError:  # its own class on Python 3.10, TimeoutError from 3.11
                    pass
                continue
            try:
                await self._run(job_id)
            except Exception:  # noqa: BLE001
                log.exception("jobs: running %s failed", job_id)

    async def _run(self, job_id: str) -> None:
        record = await self.get(job_id)
        if record is None or record.status != "queued":
            return
        if await self.jobs.cancelled(job_id):
            await self._finish(record, "cancelled")
            return
        record = record.model_copy(update={"status": "running", "updated_at": _now()})
        await self.jobs.save(record)
        self.metrics.jobs.labels(state="running").inc()
        started = time.monotonic()

        async def progress(event: Progress) -> None:
            if self._halted:
                raise JobStopped()
            if await self.jobs.cancelled(job_id):
                raise JobCancelled()
            elapsed = time.monotonic() - started
            eta = elapsed / event.step * (event.steps - event.step)
            state = JobProgress(
                step=event.step, steps=event.steps, eta_s=round(eta, 3), elapsed_s=round(elapsed, 3)
            )
            data: dict[str, Any] = state.model_dump()
            preview = None if event.previews is None else preview_data_url(event.previews)
            await self.jobs.event(job_id, "step", data, preview=preview)
            record.progress = state
            record.updated_at = _now()
            await self.jobs.save(record)

        generation = asyncio.ensure_future(self._generate(record, progress))
        watcher = asyncio.ensure_future(self._watch_for_cancel(job_id, generation))
        try:
            result = await generation
        except asyncio.CancelledError:
            # Task.cancelling() (3.11+) tells a gateway stopping apart from the job's own cancel; on 3.10
            # the watcher's verdict decides alone (a stop racing a cancel ends the job "cancelled")
            cancelling = getattr(asyncio.current_task(), "cancelling", None)
            stopping = cancelling is not None and cancelling() > 0
            if not stopping and watcher.done() and watcher.result():
                await self._finish(record, "cancelled")  # the cancel, seen at once
                return
            # the gateway is stopping (past job_drain_s)
            await asyncio.shield(self._finish(record, "failed", error=STOPPED))
            raise
        except JobStopped:
            await self._finish(record, "failed", error=STOPPED)
        except JobCancelled:
            await self._finish(record, "cancelled")
        except GatewayError as exc:
            await self._finish(record, "failed", error=ErrorDetail(**exc.body()["error"]))
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker goes on
            log.exception("jobs: %s failed", job_id)
            await self._finish(record, "failed", error=ErrorDetail(type="internal_error", message=str(exc)))
        else:
            await self._finish(record, "completed", result=result)
        finally:
            watcher.cancel()

    async def _watch_for_cancel(self, job_id: str, generation: asyncio.Future[Any]) -> bool:
        """Stop `generation` as soon as a cancel is published for the job (from any replica): its
        Triton stream closes and Triton drops the request before its next UNet call. True when it
        did; the per-step check of the cancel flag covers a store that cannot be subscribed to."""
        try:
            async with self.jobs.cancel_announcements(job_id) as messages:
                if not await self.jobs.cancelled(job_id):  # not cancelled meanwhile
                    await anext(messages)
        except StateUnavailable:
            return False
        generation.cancel()
        return True

    async def _generate(self, record: JobRecord, progress: ProgressCallback) -> GenerateResponse:
        """The job's images. With every Triton endpoint down or full the job is not failed: it is tried
        again (a `retrying` event, progress from step 1) until `job_retry_s` has passed. An attempt
        runs again only after the one before it failed, so a job completes at most once."""
        request = record.request
        give_up_at, attempt = time.monotonic() + self.settings.job_retry_s, 0
        while True:
            try:
                result = await self.generator.generate(
                    [request.prompt], request, progress, request.preview, use_cache=record.use_cache
                )
                break
            except (TritonUnavailableError, OverloadedError) as exc:
                attempt += 1
                wait = min(2.0 ** (attempt - 1) * 0.5, float(self.settings.retry_after_s))
                if time.monotonic() + wait > give_up_at:
                    raise
                log.warning("job %s: attempt %d: %s; trying again in %.1f s", record.id, attempt, exc, wait)
                self.metrics.jobs.labels(state="retrying").inc()
                retrying = {"attempt": attempt, "error": exc.message, "wait_s": wait}
                await self.jobs.event(record.id, "retrying", retrying)
                await asyncio.sleep(wait)
        if request.response_format == "url":
            return await self.storage.with_urls(result, record.base_url)
        return result

    async def _finish(
        self,
        record: JobRecord,
        status: JobStatus,
        result: GenerateResponse | None = None,
        error: ErrorDetail | None = None,
    ) -> JobRecord:
        if status == "cancelled" and error is None:
            error = ErrorDetail(type="cancelled", message=CANCELLED.format(id=record.id))
        record = record.model_copy(
            update={"status": status, "updated_at": _now(), "result": result, "error": error}
        )
        await self.jobs.save(record)
        data: dict[str, Any] = {}
        if result is not None:
            data["result"] = result.model_dump(mode="json")
        if error is not None:
            data["error"] = error.model_dump(mode="json", exclude_none=True)
        await self.jobs.event(record.id, status, data)
        self.metrics.jobs.labels(state=status).inc()
        if record.webhook is not None:
            self._spawn(self._notify(record), f"webhook-{record.id}")
        return record

    async def _notify(self, record: JobRecord) -> None:
        assert record.webhook is not None
        secret = self.webhook_secret(record.key_id)
        if secret is None:  # the key was deleted since
            log.warning("job %s: no webhook secret for key %s; not delivered", record.id, record.key_id)
            return
        body = json.dumps(
            {
                "id": record.id,
                "status": record.status,
                "result": None if record.result is None else record.result.model_dump(mode="json"),
                "error": None if record.error is None else record.error.model_dump(mode="json"),
                "created_at": record.created_at,
                "finished_at": record.updated_at,
            }
        ).encode()
        delivery = await self.webhooks.deliver(record.webhook.url, body, secret, f"job.{record.status}")
        current = await self.get(record.id) or record
        current.webhook = WebhookStatus(**vars(delivery))
        await self.jobs.save(current)
        if not delivery.delivered:
            log.warning("job %s: webhook not delivered after %d attempts", record.id, delivery.attempts)
