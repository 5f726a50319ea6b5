"""Continuous batching for the denoising loop.

Every iteration, all active requests of one latent shape advance by one step in one shared UNet
call: each with its own timestep row, guidance scale, scheduler and generators (`DenoiseJob`).
A request that arrives while an iteration runs joins at the next one; a finished request leaves at
once (its latents go to the VAE); a cancelled one leaves before the next UNet call. Requests of
different step counts and schedulers share calls.

Admission is FIFO per group (latent shape, LoRA adapter set, and whether it has ControlNets: those run on
the controlled UNet) and each group gets its own UNet call every iteration, so a rare shape (or adapter
set) never waits behind a common one. `max_batch` caps
the UNet rows (latents, cond and uncond both counted) per call; a request larger than the cap runs
when its group is empty.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from sd_triton.lora import AdapterSet
from sd_triton.runtime.denoise import (
    DenoiseJob,
    StepCallback,
    UNetFn,
    UNetInputs,
    advance_jobs,
    joined,
    joined_kwargs,
)

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]
# rows share a UNet call by latent shape, adapter set (AdapterSet.key), UNet variant (ControlNets or not)
# and text length (77 tokens per prompt chunk; 0 for a request not prepared yet)
Group = tuple[Shape, str, bool, int]


class Cancelled(Exception):
    """The request was cancelled by its client; it left the batch."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 16  # UNet rows per call
    max_wait_s: float = 0.0  # before an iteration below max_batch rows, wait this long for arrivals
    cancel_check_s: float = 0.05  # ask a request whether it was cancelled at most this often

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        for name in ("max_wait_s", "cancel_check_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


def _never() -> bool:
    return False


@dataclass(eq=False)
class Ticket:
    """One request in the batcher and what to do with its outcome (called on the batcher's thread)."""

    job: DenoiseJob | None  # None: `prepare` makes it on the batcher's thread when it is admitted
    on_done: Callable[[np.ndarray], None]  # the final latents (DenoiseJob.result)
    on_error: Callable[[Exception], None]  # Cancelled, or the UNet's / scheduler's error
    on_step: StepCallback | None = None  # progress: (step index, number of steps) after each step
    # Asked on the batcher's thread, at most every cancel_check_s. In Triton it is a round trip to the
    # server (0.1 ms here); the stub's messages are not safe from two threads at once (a separate
    # watcher thread asking it while the loop made its UNet call hung the server).
    is_cancelled: Callable[[], bool] = _never
    next_check: float = 0.0  # time.monotonic() of the next is_cancelled question
    # Work to do on the batcher's thread before the request joins (e.g. BLS calls for the text
    # embeddings: every call into the Triton stub stays on one thread). Needs `latent_shape`.
    prepare: Callable[[], DenoiseJob] | None = None
    latent_shape: Shape | None = None
    request_id: str = ""  # Triton's request id: `ContinuousBatcher.drop` names requests by it
    adapters: AdapterSet | None = None  # with `prepare`: the LoRA adapters its job will run with
    controlled: bool = False  # with `prepare`: whether its job has ControlNets

    def __post_init__(self) -> None:
        if self.job is None and (self.prepare is None or self.latent_shape is None):
            raise ValueError("a Ticket without a job needs prepare and latent_shape")

    @property
    def shape(self) -> Shape:
        return self.job.latent_shape if self.job is not None else self.latent_shape  # type: ignore[return-value]

    @property
    def group(self) -> Group:
        """What it shares UNet calls by: its latent shape, LoRA adapter set ("": the base), whether it
        has ControlNets, and its prompt embeddings' length (known once it is prepared)."""
        adapters = self.job.adapters if self.job is not None else self.adapters
        controlled = self.job.controls is not None if self.job is not None else self.controlled
        tokens = 0 if self.job is None else int(self.job.embeds.shape[1])
        return self.shape, "" if adapters is None else adapters.key, controlled, tokens

    @property
    def rows(self) -> int:
        return 0 if self.job is None else self.job.rows


@dataclass
class BatcherStats:
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    call_rows: deque[int] = field(default_factory=lambda: deque(maxlen=256))  # the latest UNet calls' rows


class ContinuousBatcher:
    """The scheduling loop. `submit` from any thread; `iterate` (or the worker `start` runs) advances."""

    def __init__(self, unet: UNetFn, config: BatchingConfig | None = None) -> None:
        self.unet = unet
        self.config = config or BatchingConfig()
        self.stats = BatcherStats()
        self._waiting: dict[Group, deque[Ticket]] = {}  # FIFO per group, guarded by _cond
        self._active: dict[Group, list[Ticket]] = {}  # the worker's own
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dropped: dict[str, float] = {}  # request id -> time.monotonic() of the drop
        # per group: (its jobs, their embeddings joined)
        self._hidden_states: dict[Group, tuple[list, np.ndarray]] = {}

    DROP_MEMORY_S = 60.0  # a drop may arrive before its request: it is remembered this long

    # -- any thread -------------------------------------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        with self._cond:
            self._waiting.setdefault(ticket.group, deque()).append(ticket)
            self._cond.notify()

    def drop(self, request_ids: Iterable[str]) -> None:
        """Cancel the requests with these ids (waiting, active, or arriving within DROP_MEMORY_S):
        they leave before the next UNet call, as if their clients had cancelled them."""
        now = time.monotonic()
        with self._cond:
            for request_id in [i for i, at in self._dropped.items() if now - at > self.DROP_MEMORY_S]:
                del self._dropped[request_id]
            self._dropped.update(dict.fromkeys(request_ids, now))
            self._cond.notify()

    def pending(self) -> int:
        """Requests waiting or in the batch."""
        with self._cond:
            waiting = self._waiting_count()
        return waiting + sum(len(group) for group in list(self._active.values()))  # list(): one step

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="continuous-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker after its current iteration; requests still queued get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        leftovers = [t for group in self._active.values() for t in group]
        with self._cond:
            leftovers += [t for q in self._waiting.values() for t in q]
            self._waiting.clear()
        self._active.clear()
        for ticket in leftovers:
            self._fail(ticket, RuntimeError("the denoise model is shutting down"))

    # -- the worker -------------------------------------------------------------------------------

    def iterate(self) -> int:
        """One iteration: drop cancelled requests, admit waiting ones, one UNet call per shape group.
        Returns the number of UNet calls made."""
        # 1. Cancelled requests leave at once, waiting or active.
        self._drop_cancelled()
        # 2. Admit waiting requests, FIFO per shape, while the group's rows fit.
        self._admit()
        # 3. One UNet call per shape group; every request in it advances one step.
        shapes = list(self._active)
        for shape in shapes:
            self._advance_group(shape)
        return len(shapes)

    def run_until_idle(self) -> None:
        """Iterate until nothing is waiting or active (tests and the in-process pipeline)."""
        while self.pending():
            self.iterate()

    def _run(self) -> None:
        idle = getattr(self.unet, "idle", None)  # a UNet with work to do between bursts (its metrics)
        while True:
            if idle is not None:
                with self._cond:  # submit() adds shapes to _waiting from other threads meanwhile
                    quiet = not self._active and not self._waiting_count()
                if quiet:
                    try:
                        idle()
                    except Exception:  # noqa: BLE001 - the loop must outlive its metrics
                        log.exception("continuous batcher: the UNet's idle work failed")
            with self._cond:
                while not self._stopping and not self._waiting_count() and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                self._wait_for_company()
            try:
                self.iterate()
            except Exception:  # noqa: BLE001 - the loop must outlive any one iteration
                log.exception("continuous batcher: iteration failed")

    def _waiting_count(self) -> int:
        """With the lock held (a submit adding a shape would break the iteration)."""
        return sum(len(q) for q in self._waiting.values())

    def _wait_for_company(self) -> None:
        """With the lock held: up to max_wait_s for arrivals while the batch is below max_batch."""
        if self.config.max_wait_s <= 0:
            return
        deadline = time.monotonic() + self.config.max_wait_s
        while not self._stopping:
            rows = sum(t.rows for group in self._active.values() for t in group)
            rows += sum(t.rows for q in self._waiting.values() for t in q)
            remaining = deadline - time.monotonic()
            if rows >= self.config.max_batch or remaining <= 0:
                return
            self._cond.wait(remaining)

    def _drop_cancelled(self) -> None:
        with self._cond:
            waiting = [t for queue in self._waiting.values() for t in queue]
        for ticket in [t for t in waiting if self._cancelled(t)]:
            with self._cond:
                self._waiting[ticket.group].remove(ticket)
            self._cancel(ticket)
        for shape, group in list(self._active.items()):
            kept = [t for t in group if not self._cancelled(t)]
            for ticket in group:
                if ticket not in kept:
                    self._cancel(ticket)
            self._set_group(shape, kept)

    def _prepare_waiting(self) -> None:
        with self._cond:
            unprepared = [t for queue in self._waiting.values() for t in queue if t.job is None]
        for ticket in unprepared:
            assert ticket.prepare is not None
            waiting = ticket.group
            try:
                ticket.job = ticket.prepare()
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                with self._cond:
                    self._waiting[waiting].remove(ticket)
                self._fail(ticket, exc)
                continue
            if ticket.group != waiting:  # its text's length is known now: it waits with its group
                with self._cond:
                    self._waiting[waiting].remove(ticket)
                    if not self._waiting[waiting]:
                        del self._waiting[waiting]
                    self._waiting.setdefault(ticket.group, deque()).append(ticket)

    def _admit(self) -> None:
        self._prepare_waiting()
        joined = False
        with self._cond:
            for shape, queue in list(self._waiting.items()):
                group = self._active.get(shape, [])
                rows = sum(t.rows for t in group)
                # a ticket that arrived while others were prepared waits for the next iteration's prepare
                while (
                    queue
                    and queue[0].job is not None
                    and (rows + queue[0].rows <= self.config.max_batch or not group)
                ):
                    ticket = queue.popleft()
                    group = [*group, ticket]
                    rows += ticket.rows
                    joined = True
                if not queue:
                    del self._waiting[shape]
                self._set_group(shape, group)
        refresh = getattr(self.unet, "refresh", None)
        if joined and refresh is not None:
            refresh()  # a UNet that follows a live engine version: a new request runs on the current one

    def _advance_group(self, shape: Group) -> None:
        group = self._active[shape]
        try:
            inputs = [t.job.unet_inputs() for t in group]  # type: ignore[union-attr] - admitted: prepared
            # sample, timestep, the text embeddings (cached), an SDXL UNet's added conditioning
            batch = (
                *(joined([x[i] for x in inputs]) for i in range(2)),
                self._hidden(shape, group, inputs),
                *(joined([x[i] for x in inputs]) for i in range(3, len(inputs[0]))),
            )
            noise = self.unet(*batch, **joined_kwargs([t.job for t in group]))  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - every request of the call gets the error
            log.error("continuous batcher: UNet call for %s failed: %s", shape, exc)
            for ticket in group:
                self._fail(ticket, exc)
            self._set_group(shape, [])
            return
        self.stats.call_rows.append(batch[0].shape[0])
        # every request's guidance and scheduler step at once (advance_jobs); an error fails its request only
        errors = advance_jobs([t.job for t in group], noise)  # type: ignore[misc] - admitted: prepared
        kept = []
        for ticket, error in zip(group, errors, strict=True):
            if error is None and ticket.on_step is not None:
                try:
                    ticket.on_step(ticket.job.steps_done - 1, ticket.job.steps)
                except Exception as exc:  # noqa: BLE001 - this request alone fails
                    error = exc
            if error is not None:
                self._fail(ticket, error)
                continue
            if ticket.job.done:
                self._finish(ticket)
            else:
                kept.append(ticket)
        self._set_group(shape, kept)

    def _set_group(self, shape: Group, group: list[Ticket]) -> None:
        if group:
            self._active[shape] = group
        else:
            self._active.pop(shape, None)
            self._hidden_states.pop(shape, None)

    def _hidden(self, shape: Group, group: list[Ticket], inputs: list[UNetInputs]) -> np.ndarray:
        """The group's text embeddings as one batch: joined again only when the group changed (they are
        the same every step, and the largest input: 77 x width floats per row)."""
        jobs = [t.job for t in group]
        cached = self._hidden_states.get(shape)
        same = cached is not None and len(cached[0]) == len(jobs)
        if not (same and all(a is b for a, b in zip(cached[0], jobs, strict=True))):  # type: ignore[index]
            cached = self._hidden_states[shape] = (jobs, joined([x[2] for x in inputs]))
        return cached[1]

    def _cancelled(self, ticket: Ticket) -> bool:
        if ticket.request_id and ticket.request_id in self._dropped:
            return True
        now = time.monotonic()
        if now < ticket.next_check:
            return False
        ticket.next_check = now + self.config.cancel_check_s
        try:
            return ticket.is_cancelled()
        except Exception:  # noqa: BLE001 - a broken probe must not stop the loop
            log.exception("continuous batcher: is_cancelled failed")
            return False

    def _cancel(self, ticket: Ticket) -> None:
        self.stats.cancelled += 1
        self._deliver(ticket.on_error, Cancelled("the request was cancelled"))

    def _fail(self, ticket: Ticket, exc: Exception) -> None:
        self.stats.failed += 1
        self._deliver(ticket.on_error, exc)

    def _finish(self, ticket: Ticket) -> None:
        try:
            latents = ticket.job.result()
        except Exception as exc:  # noqa: BLE001
            self._fail(ticket, exc)
            return
        self.stats.finished += 1
        self._deliver(ticket.on_done, latents)

    @staticmethod
    def _deliver(callback: Callable[[object], None], value: object) -> None:
        try:
            callback(value)
        except Exception:  # noqa: BLE001 - a failed response send must not stop the loop
            log.exception("continuous batcher: delivering a result failed")
