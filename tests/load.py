"""A steady load on a gateway for the tests that change things under it (engine swaps, a Triton killed):
sync requests and async jobs in loops until stopped, every outcome kept with its start and end time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

NO_CACHE = {"Cache-Control": "no-cache"}  # every request a fresh generation


@dataclass
class Load:
    """`sync_clients` threads POST /v1/generate, `job_clients` threads run jobs; each thread its own seed
    (sync: 0, 1, ...; jobs after them), again and again."""

    url: str
    body: dict[str, Any]  # the generate body without the seed
    sync_clients: int = 3
    job_clients: int = 1
    pace_s: float = 0.0  # each client waits this long between requests (may change while it runs)
    results: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _sync(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120, headers=NO_CACHE) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                response = http.post("/v1/generate", json={**self.body, "seed": seed})
                body = response.json() if response.status_code == 200 else {"error": response.text}
                retry_after = response.headers.get("Retry-After")
                self._record("sync", seed, started, response.status_code, body, retry_after=retry_after)
                if response.is_error:
                    time.sleep(0.1)  # a refusal comes back at once: do not spin
                time.sleep(self.pace_s)

    def _jobs(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120, headers=NO_CACHE) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                job = http.post("/v1/jobs", json={**self.body, "seed": seed})
                if job.status_code != 202:
                    retry_after = job.headers.get("Retry-After")
                    self._record(
                        "job", seed, started, job.status_code, {"error": job.text}, retry_after=retry_after
                    )
                    time.sleep(0.1)
                    continue
                job_id = job.json()["id"]
                view = job_end(http, job_id)
                record = view.json() if view.status_code == 200 else {"error": view.text}
                status = (
                    200 if record.get("status") == "completed" else view.status_code if view.is_error else 500
                )
                self._record("job", seed, started, status, record.get("result") or record, job_id=job_id)
                time.sleep(self.pace_s)

    def _record(
        self, kind: str, seed: int, started: float, status: int, body: dict[str, Any], **more: Any
    ) -> None:
        end = time.monotonic()
        self.results.append(
            {"kind": kind, "seed": seed, "start": started, "end": end, "status": status, "body": body, **more}
        )

    def failures(self) -> list[tuple[str, int, str]]:
        return [(r["kind"], r["status"], str(r["body"])[:300]) for r in self.results if r["status"] != 200]

    def wait_for(self, after: float, count: int, timeout_s: float = 60.0) -> None:
        """Until `count` requests started after `after` have ended (timeout_s at most)."""
        deadline = time.monotonic() + timeout_s
        while sum(r["start"] > after for r in self.results) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> Load:
        seeds = range(self.sync_clients + self.job_clients)
        self.threads = [
            threading.Thread(target=self._sync if seed < self.sync_clients else self._jobs, args=(seed,))
            for seed in seeds
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def job_end(http: httpx.Client, job_id: str) -> httpx.Response:
    """GET the job until it ends (a 503, the store down, is asked again: the job may still end)."""
    while True:
        view = http.get(f"/v1/jobs/{job_id}")
        if view.status_code != 503 and (view.is_error or view.json()["status"] not in ("queued", "running")):
            return view
        time.sleep(0.05)


def job_events(
    http: httpx.Client, job_id: str, headers: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """The job's SSE stream, parsed: {'id', 'event', 'data'} per frame."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, Any] = {}
        for line in response.iter_lines():
            if not line:
                if frame:
                    yield frame
                frame = {}
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(": ")
                frame[name] = json.loads(value) if name == "data" else value


def wait_until(check: Any, what: str, timeout_s: float = 30.0, interval_s: float = 0.25) -> None:
    """Poll `check()` until it is true; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout_s:.0f} s")
        time.sleep(interval_s)
