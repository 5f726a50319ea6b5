"""The jobs in the shared state store (gateway/state.py), so that with Redis every gateway replica sees
every job: a job queued on one replica may run on another, its events reach a subscriber on a third,
and a cancel on any replica stops it.

Keys (all but the queue expire after job_ttl_s):
- `jobs:queue`            the FIFO of queued job ids
- `job:<id>`              the job's record (JSON)
- `job-events:<id>`       every event so far, in order, without preview images (a late subscriber
                          replays them); published live on channel `job:<id>` (with previews)
- `job-seq:<id>`          the number of the job's latest event (SSE `id:`)
- `job-cancel:<id>`       set by a cancel; the runner checks it at every step
- channel `job-control:<id>`  a cancel, published: the runner stops the job's stream at once
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sd_triton.gateway.jobs.models import TERMINAL, JobRecord
from sd_triton.gateway.state import StateStore

QUEUE = "jobs:queue"


class JobStore:
    def __init__(self, store: StateStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s

    # -- records and events -------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.store.get(f"job:{job_id}")
        return None if raw is None else JobRecord.model_validate_json(raw)

    async def save(self, record: JobRecord) -> None:
        await self.store.set(f"job:{record.id}", record.model_dump_json().encode(), ttl_s=self.ttl_s)

    async def event(self, job_id: str, name: str, data: dict[str, Any], preview: str | None = None) -> None:
        """Logged (without the preview) for late subscribers, and published live (with it)."""
        seq = await self.store.incr(f"job-seq:{job_id}", ttl_s=self.ttl_s)
        event: dict[str, Any] = {"seq": seq, "event": name, "data": {"id": job_id, **data}}
        await self.store.rpush(f"job-events:{job_id}", json.dumps(event).encode(), ttl_s=self.ttl_s)
        if preview is not None:
            event["data"]["preview"] = preview
        await self.store.publish(f"job:{job_id}", json.dumps(event).encode())

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Every event of the job with seq > after, in order, then live ones until a terminal one."""
        async with self.store.subscribe(f"job:{job_id}") as live:
            seen = after
            for raw in await self.store.lrange(f"job-events:{job_id}", after):
                event = json.loads(raw)
                seen = event["seq"]
                yield event
                if event["event"] in TERMINAL:
                    return
            async for raw in live:
                event = json.loads(raw)
                if event["seq"] <= seen:
                    continue  # logged before we read the history, and published after we subscribed
                seen = event["seq"]
                yield event
                if event["event"] in TERMINAL:
                    return

    # -- the queue ------------------------------------------------------------------------------------

    async def queue_length(self) -> int:
        return len(await self.store.lrange(QUEUE))

    async def enqueue(self, job_id: str) -> None:
        await self.store.rpush(QUEUE, job_id.encode())

    async def position(self, job_id: str) -> int | None:
        """1 = next to run; None when not queued."""
        queue = await self.store.lrange(QUEUE)
        return queue.index(job_id.encode()) + 1 if job_id.encode() in queue else None

    async def next(self) -> str | None:
        raw = await self.store.lpop(QUEUE)
        return None if raw is None else raw.decode()

    async def unqueue(self, job_id: str) -> bool:
        """Take a queued job out of the queue; False when it was not there (running already)."""
        return bool(await self.store.lrem(QUEUE, job_id.encode()))

    # -- cancels ------------------------------------------------------------------------------------

    async def mark_cancelled(self, job_id: str) -> None:
        await self.store.set(f"job-cancel:{job_id}", b"1", ttl_s=self.ttl_s)

    async def cancelled(self, job_id: str) -> bool:
        return await self.store.get(f"job-cancel:{job_id}") is not None

    async def announce_cancel(self, job_id: str) -> None:
        """Tell the job's runner, on whichever replica: it stops the job's stream at once."""
        await self.store.publish(f"job-control:{job_id}", b"cancel")

    def cancel_announcements(self, job_id: str) -> Any:
        """An async context manager: the messages `announce_cancel` publishes for the job."""
        return self.store.subscribe(f"job-control:{job_id}")
