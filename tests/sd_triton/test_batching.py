"""Continuous batching over the exported tiny UNet (ONNX Runtime in-process): a request's image is
the same whether it ran alone or joined other requests mid-flight; budget, fairness, cancellation,
errors and the worker thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from sd_triton import contract as c
from sd_triton.requests import GenerationParams, uses_guidance
from sd_triton.runtime.batching import BatchingConfig, Cancelled, ContinuousBatcher, Ticket
from sd_triton.runtime.denoise import DenoiseJob, denoise
from sd_triton.runtime.local import LocalPipeline
from sd_triton.runtime.postprocess import to_uint8_images

# Different prompts, seeds, steps, schedulers, guidance (one without CFG), image counts and shapes.
REQUESTS = [
    ("a red circle", GenerationParams(64, 64, 9, 7.5, 11, "ddim", 1)),
    ("a blue square at the top", GenerationParams(64, 64, 6, 4.0, 12, "euler_a", 2)),
    ("a green triangle", GenerationParams(48, 64, 7, 6.0, 13, "dpmpp_2m", 1)),
    ("fog over a harbour", GenerationParams(64, 64, 5, 1.0, 14, "lms", 1)),
    ("a yellow star", GenerationParams(64, 64, 8, 5.0, 15, "pndm", 1)),
]


@pytest.fixture(scope="module")
def local(exported: dict) -> LocalPipeline:
    return LocalPipeline(exported["repo"])


@dataclass
class Outcome:
    latents: np.ndarray | None = None
    error: Exception | None = None
    steps: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def embeds(local: LocalPipeline, prompt: str, params: GenerationParams) -> np.ndarray:
    tokens = local.tokenizer.tokenize(prompt, "", uses_guidance(params.guidance_scale))
    return local._run(c.TEXT_ENCODER.name, *tokens.text_encoder_inputs)


def unet_of(local: LocalPipeline):
    return lambda *inputs: local._run(c.UNET.name, *inputs)


def images(local: LocalPipeline, latents: np.ndarray) -> np.ndarray:
    return to_uint8_images(local._run(c.VAE_DECODER.name, latents)).astype(int)


def ticket(local: LocalPipeline, prompt: str, params: GenerationParams, outcome: Outcome, **kw) -> Ticket:
    def done(latents: np.ndarray) -> None:
        outcome.latents = latents
        outcome.done.set()

    def failed(exc: Exception) -> None:
        outcome.error = exc
        outcome.done.set()

    job = DenoiseJob(embeds(local, prompt, params), params, local.config)
    return Ticket(job, done, failed, on_step=lambda i, n: outcome.steps.append(i), **kw)


def alone(local: LocalPipeline, prompt: str, params: GenerationParams) -> np.ndarray:
    return images(local, denoise(embeds(local, prompt, params), params, local.config, unet_of(local)))


def test_joined_mid_flight_equals_alone(local: LocalPipeline) -> None:
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(max_batch=16))
    outcomes = [Outcome() for _ in REQUESTS]
    tickets = [ticket(local, p, params, o) for (p, params), o in zip(REQUESTS, outcomes, strict=True)]
    # 1. The first request runs alone for two steps, two more join, then the last two.
    batcher.submit(tickets[0])
    batcher.iterate()
    batcher.iterate()
    batcher.submit(tickets[1])
    batcher.submit(tickets[2])
    for _ in range(3):
        batcher.iterate()
    batcher.submit(tickets[3])
    batcher.submit(tickets[4])
    batcher.run_until_idle()
    # 2. Every request finished, with one progress event per step, in order.
    for t, outcome in zip(tickets, outcomes, strict=True):
        assert outcome.error is None and outcome.latents is not None
        assert outcome.steps == list(range(t.job.steps))
    # 3. Requests really shared calls: some call held more rows than any one request.
    assert max(batcher.stats.call_rows) > max(t.job.rows for t in tickets)
    assert batcher.stats.finished == len(REQUESTS)
    # 4. The images equal the ones made alone.
    for (prompt, params), outcome in zip(REQUESTS, outcomes, strict=True):
        batched, solo = images(local, outcome.latents), alone(local, prompt, params)
        assert batched.shape == solo.shape == (params.num_images, params.height, params.width, 3)
        assert np.abs(batched - solo).max() <= 2, prompt
        assert solo.std() > 0


def test_budget_caps_each_call_and_admission_is_fifo(local: LocalPipeline) -> None:
    rows: list[int] = []
    unet = unet_of(local)

    def counting_unet(*inputs: np.ndarray) -> np.ndarray:
        rows.append(inputs[0].shape[0])
        return unet(*inputs)

    batcher = ContinuousBatcher(counting_unet, BatchingConfig(max_batch=4))
    params = [GenerationParams(64, 64, steps, 7.5, i, "ddim", 1) for i, steps in enumerate((3, 5, 2, 2))]
    big = GenerationParams(64, 64, 2, 7.5, 9, "ddim", 3)  # 6 rows: more than the budget
    outcomes = [Outcome() for _ in range(5)]
    for p, o in zip([*params, big], outcomes, strict=True):
        batcher.submit(ticket(local, "a shape", p, o))
    first_step_call: dict[int, int] = {}
    while batcher.pending():
        batcher.iterate()
        for index, o in enumerate(outcomes):
            if o.steps and index not in first_step_call:
                first_step_call[index] = len(rows)
    assert all(o.latents is not None for o in outcomes)
    # 2 CFG rows per request: two at a time; the 3rd starts when the 1st (3 steps) leaves.
    assert first_step_call[0] == first_step_call[1] == 1
    assert first_step_call[2] == 4 and first_step_call[3] == 6
    # the 6-row request waits for an empty group, then runs alone
    assert rows[-2:] == [6, 6] and max(rows[:-2]) <= 4


def test_a_rare_shape_is_not_starved(local: LocalPipeline) -> None:
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(max_batch=2))
    common = [Outcome() for _ in range(4)]
    for i, o in enumerate(common):
        batcher.submit(ticket(local, "a circle", GenerationParams(64, 64, 4, 7.5, i, "ddim", 1), o))
    rare = Outcome()
    batcher.submit(ticket(local, "a square", GenerationParams(48, 64, 4, 7.5, 7, "ddim", 1), rare))
    for _ in range(4):
        batcher.iterate()
    # the rare shape has its own call every iteration: done with the first common request
    assert rare.latents is not None and common[0].latents is not None
    assert common[1].latents is None
    batcher.run_until_idle()
    assert all(o.latents is not None for o in common)


def test_a_cancelled_request_leaves_and_the_others_are_untouched(local: LocalPipeline) -> None:
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(cancel_check_s=0.0))
    cancel = threading.Event()
    kept, dropped = Outcome(), Outcome()
    (p1, params1), (p2, params2) = REQUESTS[0], REQUESTS[1]
    batcher.submit(ticket(local, p1, params1, kept))
    batcher.submit(ticket(local, p2, params2, dropped, is_cancelled=cancel.is_set))
    batcher.iterate()
    batcher.iterate()
    cancel.set()
    batcher.run_until_idle()
    assert isinstance(dropped.error, Cancelled) and dropped.latents is None
    assert dropped.steps == [0, 1]
    assert batcher.stats.cancelled == 1
    assert np.abs(images(local, kept.latents) - alone(local, p1, params1)).max() <= 2


def test_dropped_request_ids_leave_before_the_next_unet_call(local: LocalPipeline) -> None:
    """`drop` (the gateway's cancel of a txt2img request, by Triton request id): the request leaves at
    once, whatever cancel_check_s says; another request goes on; a drop may come before its request."""
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(cancel_check_s=60.0))
    kept, dropped, early = Outcome(), Outcome(), Outcome()
    (p1, params1), (p2, params2) = REQUESTS[0], REQUESTS[1]
    batcher.submit(ticket(local, p1, params1, kept, request_id="gw-1"))
    batcher.submit(ticket(local, p2, params2, dropped, request_id="gw-2"))
    batcher.iterate()
    batcher.drop(["gw-2", "gw-3"])
    batcher.submit(ticket(local, p2, params2, early, request_id="gw-3"))
    batcher.run_until_idle()
    assert isinstance(dropped.error, Cancelled) and dropped.steps == [0]
    assert isinstance(early.error, Cancelled) and early.steps == []
    assert batcher.stats.cancelled == 2
    assert np.abs(images(local, kept.latents) - alone(local, p1, params1)).max() <= 2


def test_cancellation_is_asked_at_most_every_cancel_check_s(local: LocalPipeline) -> None:
    asked: list[int] = []
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(cancel_check_s=60.0))
    outcome = Outcome()
    batcher.submit(
        ticket(
            local,
            "a",
            GenerationParams(64, 64, 4, 7.5, 1, "ddim", 1),
            outcome,
            is_cancelled=lambda: bool(asked.append(1)),
        )
    )
    batcher.run_until_idle()
    assert outcome.latents is not None and len(asked) == 1  # 4 iterations, one question


def test_a_failing_unet_call_fails_only_its_requests(local: LocalPipeline) -> None:
    unet = unet_of(local)

    def unet_failing_on_narrow(*inputs: np.ndarray) -> np.ndarray:
        if inputs[0].shape[-2] == 6:  # 48 px high
            raise RuntimeError("engine out of memory")
        return unet(*inputs)

    batcher = ContinuousBatcher(unet_failing_on_narrow, BatchingConfig())
    narrow, square = Outcome(), Outcome()
    batcher.submit(ticket(local, "a", GenerationParams(48, 64, 3, 7.5, 1, "ddim", 1), narrow))
    batcher.submit(ticket(local, "b", GenerationParams(64, 64, 3, 7.5, 2, "ddim", 1), square))
    batcher.run_until_idle()
    assert isinstance(narrow.error, RuntimeError) and "out of memory" in str(narrow.error)
    assert square.error is None and square.latents is not None
    assert batcher.stats.failed == 1 and batcher.stats.finished == 1


def test_the_worker_thread_serves_requests_from_many_threads(local: LocalPipeline) -> None:
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(max_batch=8, max_wait_s=0.005))
    batcher.start()
    outcomes = [Outcome() for _ in REQUESTS]
    try:
        threads = [
            threading.Thread(
                target=lambda p=p, params=params, o=o: batcher.submit(ticket(local, p, params, o))
            )
            for (p, params), o in zip(REQUESTS, outcomes, strict=True)
        ]
        for t in threads:
            t.start()
        for o in outcomes:
            assert o.done.wait(60)
    finally:
        batcher.stop()
    for (prompt, params), outcome in zip(REQUESTS, outcomes, strict=True):
        assert outcome.error is None
        assert np.abs(images(local, outcome.latents) - alone(local, prompt, params)).max() <= 2


def test_stop_fails_what_is_still_queued(local: LocalPipeline) -> None:
    batcher = ContinuousBatcher(unet_of(local))
    outcome = Outcome()
    batcher.submit(ticket(local, "late", REQUESTS[0][1], outcome))
    batcher.stop()
    assert isinstance(outcome.error, RuntimeError) and "shutting down" in str(outcome.error)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_wait_s": -1.0}, "max_wait_s"),
        ({"cancel_check_s": -1}, "cancel_check_s"),
    ],
)
def test_batching_config_names_the_bad_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        BatchingConfig(**kwargs)


def test_prepare_runs_on_the_worker_when_admitted_and_fails_alone(local: LocalPipeline) -> None:
    """txt2img_stream's tickets come without a job: the batcher's thread makes it (the text
    embeddings) when it admits them; a failing prepare fails that request only."""
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(max_batch=16))
    (prompt, params), (_, other) = REQUESTS[0], REQUESTS[2]
    good, bad, plain = Outcome(), Outcome(), Outcome()
    threads: list[str] = []

    def prepare() -> DenoiseJob:
        threads.append(threading.current_thread().name)
        return DenoiseJob(embeds(local, prompt, params), params, local.config)

    def broken() -> DenoiseJob:
        raise RuntimeError("text encoder unavailable")

    def lazy(outcome: Outcome, make) -> Ticket:
        shape = (local.config.latent_channels, params.height // 8, params.width // 8)
        template = ticket(local, prompt, params, outcome)
        return Ticket(None, template.on_done, template.on_error, prepare=make, latent_shape=shape)

    with pytest.raises(ValueError, match="prepare and latent_shape"):
        Ticket(None, good.done.set, bad.done.set)
    batcher.start()
    try:
        for t in (lazy(good, prepare), lazy(bad, broken), ticket(local, "a green triangle", other, plain)):
            batcher.submit(t)
        for outcome in (good, bad, plain):
            assert outcome.done.wait(60)
    finally:
        batcher.stop()
    assert threads == ["continuous-batcher"]
    assert isinstance(bad.error, RuntimeError) and bad.latents is None
    assert good.error is None and plain.error is None
    assert np.abs(images(local, good.latents) - alone(local, prompt, params)).max() <= 2


def test_a_ticket_arriving_during_a_prepare_is_prepared_before_it_joins(local: LocalPipeline) -> None:
    """Two jobs submitted together: the second arrives while the first's prepare (its BLS calls) runs;
    it must not join unprepared (it did once, and its shape group never advanced)."""
    batcher = ContinuousBatcher(unet_of(local), BatchingConfig(max_batch=16))
    (p1, first), (p2, second) = REQUESTS[0], REQUESTS[2]
    outcomes = [Outcome(), Outcome()]

    def lazy(prompt: str, params: GenerationParams, outcome: Outcome, before=None) -> Ticket:
        def prepare() -> DenoiseJob:
            if before is not None:
                before()
            return DenoiseJob(embeds(local, prompt, params), params, local.config)

        template = ticket(local, prompt, params, outcome)
        shape = (local.config.latent_channels, params.height // 8, params.width // 8)
        return Ticket(None, template.on_done, template.on_error, prepare=prepare, latent_shape=shape)

    late = lazy(p2, second, outcomes[1])
    batcher.submit(lazy(p1, first, outcomes[0], before=lambda: batcher.submit(late)))
    batcher.run_until_idle()
    for (prompt, params), outcome in zip((REQUESTS[0], REQUESTS[2]), outcomes, strict=True):
        assert outcome.error is None and outcome.latents is not None
        assert np.abs(images(local, outcome.latents) - alone(local, prompt, params)).max() <= 2


def test_embeddings_are_joined_once_per_group_and_a_joining_request_refreshes_the_unet(
    local: LocalPipeline,
) -> None:
    """The text embeddings do not change between steps: a lone request's are passed as they are and a
    group's are joined again only when the group changes. A UNet that follows a live engine version
    (sd_triton.runtime.triton_io) is told when a request joins."""
    calls: list[tuple[int, int]] = []  # (id of the embeddings batch, its rows)

    class Recording:
        refreshes = 0

        def refresh(self) -> None:
            self.refreshes += 1

        def __call__(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
            calls.append((id(hidden), hidden.shape[0]))
            return local._run(c.UNET.name, sample, timestep, hidden)

    unet = Recording()
    batcher = ContinuousBatcher(unet, BatchingConfig(max_batch=16))
    first, second = (ticket(local, p, params, Outcome()) for p, params in (REQUESTS[0], REQUESTS[1]))
    batcher.submit(first)
    batcher.iterate()
    batcher.iterate()
    batcher.submit(second)
    batcher.iterate()
    batcher.iterate()
    assert unet.refreshes == 2  # one per admission
    assert calls[0][0] == calls[1][0] == id(first.job.embeds)  # alone: its own array, no copy per step
    assert calls[2][0] == calls[3][0] != calls[1][0]  # joined once, when the group changed
    assert calls[2][1] == first.job.rows + second.job.rows


def test_sdxl_requests_batch_their_added_conditioning_row_by_row() -> None:
    """SDXL jobs in one call: each job's pooled embeddings and time ids go with its own rows (a tiny-xl
    UNet in torch), so every job gets the latents it gets alone."""
    from sd_triton.export.tiny import build_tiny_xl_pipeline
    from sd_triton.pipeline_config import PipelineConfig
    from sd_triton.runtime.denoise import AddedConditioning, time_ids
    from tests.sd_triton.test_runtime import torch_unet

    xl = build_tiny_xl_pipeline()
    config = PipelineConfig(4, 8, 0.18215, {**xl.scheduler.config, "_class_name": "EulerDiscreteScheduler"})
    calls: list[int] = []

    xl_unet = torch_unet(xl.unet)

    def unet(*inputs: np.ndarray) -> np.ndarray:
        assert len(inputs) == 5  # sample, timestep, hidden states, text_embeds, time_ids
        calls.append(len(inputs[0]))
        return xl_unet(*inputs)

    rng = np.random.default_rng(1)
    jobs = []
    for seed, (n, guidance, size) in enumerate([(1, 5.0, (64, 64)), (2, 7.5, (128, 96)), (1, 1.0, (32, 32))]):
        rows = 2 if guidance > 1 else 1
        params = GenerationParams(64, 64, 5, guidance, seed, "euler", n)
        added = AddedConditioning(
            rng.standard_normal((rows, 32)).astype(np.float32),
            np.array([time_ids(size, (0, 0), (64, 64))] * rows, dtype=np.float32),
        )
        jobs.append((rng.standard_normal((rows, 77, 80)).astype(np.float32), params, added))
    solo = [denoise(e, p, config, unet, added=a) for e, p, a in jobs]
    calls.clear()
    batcher = ContinuousBatcher(unet, BatchingConfig(max_batch=16))
    outcomes = [Outcome() for _ in jobs]
    for (e, p, a), outcome in zip(jobs, outcomes, strict=True):
        done = lambda x, o=outcome: setattr(o, "latents", x)  # noqa: E731
        failed = lambda exc, o=outcome: setattr(o, "error", exc)  # noqa: E731
        batcher.submit(Ticket(DenoiseJob(e, p, config, added=a), done, failed))
    batcher.run_until_idle()
    assert max(calls) == 2 + 4 + 1  # all three jobs' rows in one call
    for outcome, alone_latents in zip(outcomes, solo, strict=True):
        assert outcome.error is None and outcome.latents is not None
        # float32: a batched call sums in another order
        scale = max(1.0, float(np.abs(alone_latents).max()))
        np.testing.assert_allclose(outcome.latents, alone_latents, atol=1e-5 * scale)


def test_the_worker_reads_the_queues_only_under_the_lock() -> None:
    """Every read of the waiting queues holds the batcher's lock, the worker's idle check included: a
    submit from another thread adds a shape to them, and a read without the lock once died on the dict
    changing size ("dictionary changed size during iteration"), killing the worker: every later request
    hung. Checked on every read, not left to a race to show."""

    class IdleUNet:
        def __call__(self, *arrays: np.ndarray) -> np.ndarray:
            raise AssertionError("no request gets this far")

        def idle(self) -> None:  # a UNet with work between bursts (the inline path's metrics)
            pass

    batcher = ContinuousBatcher(IdleUNet(), BatchingConfig())  # type: ignore[arg-type]

    class Guarded(dict):  # type: ignore[type-arg]
        def values(self) -> Any:
            assert batcher._cond._is_owned(), "the queues read without the lock"  # type: ignore[attr-defined]
            return super().values()

        def items(self) -> Any:
            assert batcher._cond._is_owned(), "the queues read without the lock"  # type: ignore[attr-defined]
            return super().items()

    def prepare() -> Any:
        raise ValueError("this request fails at once")

    batcher._waiting = Guarded()
    answered = threading.Semaphore(0)
    batcher.start()
    try:
        for side in range(1, 50):
            ticket = Ticket(
                None,
                lambda _: None,
                lambda _: answered.release(),
                prepare=prepare,
                latent_shape=(4, side, side),
            )
            batcher.submit(ticket)
        assert all(answered.acquire(timeout=10) for _ in range(49)), "requests were left unanswered"
        assert batcher._thread is not None and batcher._thread.is_alive()
    finally:
        batcher.stop()
