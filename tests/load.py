"""A steady load on a gateway for the tests that change things under it (engine swaps, a Triton killed):
sync requests and async jobs in loops until stopped, every outcome kept with its start and end time."""

from __future__ import annotations

import threading
import time
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
    results: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _sync(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120, headers=NO_CACHE) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                response = http.post("/v1/generate", json={**self.body, "seed": seed})
                body = response.json() if response.status_code == 200 else {"error": response.text}
                self._record("sync", seed, started, response.status_code, body)

    def _jobs(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120, headers=NO_CACHE) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                job = http.post("/v1/jobs", json={**self.body, "seed": seed})
                if job.status_code != 202:
                    self._record("job", seed, started, job.status_code, {"error": job.text})
                    continue
                while (record := http.get(f"/v1/jobs/{job.json()['id']}").json())["status"] in (
                    "queued",
                    "running",
                ):
                    time.sleep(0.05)
                status = 200 if record["status"] == "completed" else 500
                self._record("job", seed, started, status, record.get("result") or record)

    def _record(self, kind: str, seed: int, started: float, status: int, body: dict[str, Any]) -> None:
        end = time.monotonic()
        self.results.append(
            {"kind": kind, "seed": seed, "start": started, "end": end, "status": status, "body": body}
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
