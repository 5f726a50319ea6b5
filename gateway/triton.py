"""The gateway's gRPC channels to its Triton servers (tritonclient.grpc.aio): a deadline on every call,
Triton's errors mapped onto the gateway's, and with several endpoints (`triton_url` "a:8001,b:8001",
or "dns:NAME:PORT" for every address NAME resolves to) least-in-flight routing, health checks that take
an endpoint out of rotation and back, and retries on another endpoint.

Retries: a call that failed with UNAVAILABLE (connection refused, the server gone mid-call) or because
the endpoint's txt2img is not ready is sent to another endpoint, up to `triton_retries` times. txt2img
is a pure function of its inputs (the gateway fixes the seed before the call), so running it again is
safe; a job's progress restarts from step 1 on the new endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferRequestedOutput
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.gateway.errors import (
    InvalidRequestError,
    OverloadedError,
    TritonError,
    TritonTimeoutError,
    TritonUnavailableError,
)
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.settings import GatewaySettings, parse_endpoints
from sd_triton.requests import InvalidRequest
from sd_triton.served_model import ServedModel, config_fingerprint
from sd_triton.txt2img_client import (
    Progress,
    Txt2ImgResult,
    infer_input,
    parse_result,
    parse_stream_response,
    txt2img_inputs,
)

log = logging.getLogger(__name__)

# reconnect quickly once Triton is back, instead of gRPC's default backoff of up to 2 minutes
CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}
INVALID = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE"}
NOT_READY = ("not found", "unavailable", "not ready")  # Triton's words for a model it cannot run now
INPUT_NAMES = [t.name for t in c.TXT2IMG_STREAM.inputs]  # what an INVALID_ARG message may name
T = TypeVar("T")


class Retryable(TritonUnavailableError):
    """This endpoint could not run the call (down, or txt2img not ready there); another one may."""


@dataclass(eq=False)
class Endpoint:
    address: str  # HOST:PORT
    client: grpcaio.InferenceServerClient
    in_flight: int = 0
    healthy: bool = True  # in rotation; optimistic until the first health check
    reason: str = ""  # why it is out of rotation


async def resolve(entry: str) -> list[str]:
    """HOST:PORT as is; dns:NAME:PORT -> every address NAME resolves to, with PORT."""
    if not entry.startswith("dns:"):
        return [entry]
    host, port = entry.removeprefix("dns:").rsplit(":", 1)
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]


class GrpcTritonBackend:
    """The TritonBackend (gateway/backend.py) over gRPC to one or more Triton servers."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.entries = parse_endpoints(settings.triton_url)
        self.endpoints: dict[str, Endpoint] = {}
        for entry in self.entries:
            if not entry.startswith("dns:"):
                self._add(entry)
        self._turn = itertools.count()  # breaks ties between endpoints equally in flight
        self._health: asyncio.Task[None] | None = None
        self._served: ServedModel | None = None
        self._served_until = 0.0  # monotonic time of the next re-read
        self._served_lock = asyncio.Lock()
        self._drops: set[asyncio.Task[None]] = set()  # `_drop` calls under way
        self._health_lock = asyncio.Lock()

    def start(self) -> None:
        """The health checks, every `triton_health_interval_s` (call from a running event loop)."""
        self._health = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._drops:  # the drops of requests cancelled by the shutdown itself
            await asyncio.wait(self._drops, timeout=self.settings.triton_probe_timeout_s)
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        for endpoint in self.endpoints.values():
            await endpoint.client.close()

    def _add(self, address: str) -> Endpoint:
        client = grpcaio.InferenceServerClient(address, channel_args=CHANNEL_ARGS)
        endpoint = self.endpoints[address] = Endpoint(address, client)
        self._report(endpoint)
        return endpoint

    def _report(self, endpoint: Endpoint) -> None:
        if self.metrics is not None:
            self.metrics.triton_endpoint_up.labels(endpoint=endpoint.address).set(int(endpoint.healthy))
            self.metrics.triton_endpoint_in_flight.labels(endpoint=endpoint.address).set(endpoint.in_flight)

    # -- health -----------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # noqa: BLE001 - the loop outlives any one round
                log.exception("Triton health check failed")
            await asyncio.sleep(self.settings.triton_health_interval_s)

    async def check_health(self) -> None:
        """Resolve dns: entries again, probe every endpoint, and move endpoints in and out of rotation.
        One round at a time (the loop and /readyz both call it): two would add a new address twice."""
        async with self._health_lock:
            await self._check_health()

    async def _check_health(self) -> None:
        wanted: list[str] = []
        for entry in self.entries:
            try:
                wanted += await resolve(entry)
            except OSError as exc:
                log.warning("Triton endpoint %s: cannot resolve: %s", entry, exc)
        for address in wanted:
            if address not in self.endpoints:
                log.info("Triton endpoint %s: discovered", address)
                self._add(address)
        for address in [a for a in self.endpoints if a not in wanted and wanted]:
            endpoint = self.endpoints.pop(address)
            log.info("Triton endpoint %s: no longer resolved; removed", address)
            await endpoint.client.close()
        endpoints = list(self.endpoints.values())
        results = await asyncio.gather(*(self._probe(e) for e in endpoints))
        for endpoint, (ready, reason) in zip(endpoints, results, strict=True):
            if ready and not endpoint.healthy:
                log.info("Triton endpoint %s: ready again, back in rotation", endpoint.address)
            elif not ready and endpoint.healthy:
                log.warning("Triton endpoint %s: out of rotation: %s", endpoint.address, reason)
            endpoint.healthy, endpoint.reason = ready, "" if ready else reason
            self._report(endpoint)

    async def _probe(self, endpoint: Endpoint) -> tuple[bool, str]:
        timeout = self.settings.triton_probe_timeout_s
        try:
            if not await endpoint.client.is_server_ready(client_timeout=timeout):
                return False, "server not ready"
            if not await endpoint.client.is_model_ready(c.TXT2IMG.name, client_timeout=timeout):
                return False, "txt2img not ready"
        except InferenceServerException as exc:
            return False, exc.message() or str(exc)
        return True, ""

    def endpoint_states(self) -> dict[str, str]:
        return {
            e.address: "ready" if e.healthy else f"out of rotation: {e.reason}"
            for e in self.endpoints.values()
        }

    # -- routing ----------------------------------------------------------------------------------

    def _pick(self, tried: set[str]) -> Endpoint:
        """The least busy endpoint in rotation not tried yet (ties in turn); with none in rotation, the
        least busy of the others (the health check may lag behind)."""
        untried = [e for e in self.endpoints.values() if e.address not in tried]
        if not untried:
            raise TritonUnavailableError(
                f"no Triton endpoint left to try ({', '.join(self.endpoints) or self.settings.triton_url})",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        pool = [e for e in untried if e.healthy] or untried
        limit = self.settings.triton_max_in_flight
        pool = [e for e in pool if e.in_flight < limit]
        if not pool:  # a bounded queue per endpoint: refuse now rather than wait without bound
            if self.metrics is not None:
                self.metrics.rejections.labels(reason="overloaded").inc()
            raise OverloadedError(
                f"overloaded: every Triton endpoint has {limit} requests in flight "
                f"(triton_max_in_flight); try again in {self.settings.retry_after_s} s",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        turn = next(self._turn)
        return min(pool, key=lambda e: (e.in_flight, (pool.index(e) - turn) % len(pool)))

    def _out_of_rotation(self, endpoint: Endpoint, reason: str) -> None:
        if endpoint.healthy:
            log.warning("Triton endpoint %s: out of rotation: %s", endpoint.address, reason)
        endpoint.healthy, endpoint.reason = False, reason
        self._report(endpoint)

    @contextlib.contextmanager
    def _busy(self, tried: set[str]) -> Iterator[Endpoint]:
        """The endpoint `_pick` chooses, counted in flight while the call runs."""
        endpoint = self._pick(tried)
        endpoint.in_flight += 1
        self._report(endpoint)
        try:
            yield endpoint
        finally:
            endpoint.in_flight -= 1
            self._report(endpoint)

    async def _routed(self, what: str, call: Callable[[Endpoint], Awaitable[T]]) -> T:
        """`call` on the least busy endpoint; on a Retryable failure, again on another one."""
        tried: set[str] = set()
        while True:
            with self._busy(tried) as endpoint:
                try:
                    return await call(endpoint)
                except InferenceServerException as exc:
                    error = self._map(exc, what, endpoint)
                    if not self._retry(error, endpoint, tried, what):
                        raise error from None

    def _retry(self, error: Exception, endpoint: Endpoint, tried: set[str], what: str) -> bool:
        """After `error` on `endpoint`: True when another endpoint should take the call (and this one
        leaves rotation until its health check passes)."""
        if not isinstance(error, Retryable):
            return False
        self._out_of_rotation(endpoint, error.message)
        tried.add(endpoint.address)
        if len(tried) > self.settings.triton_retries or all(a in tried for a in self.endpoints):
            return False
        log.warning(
            "%s failed on %s (%s); retrying on another endpoint", what, endpoint.address, error.message
        )
        return True

    def _map(self, exc: InferenceServerException, what: str, endpoint: Endpoint | None = None) -> Exception:
        status, message = str(exc.status()), exc.message() or str(exc)
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        where = endpoint.address if endpoint else self.settings.triton_url
        if status == "StatusCode.DEADLINE_EXCEEDED":  # Triton saw the deadline pass and dropped the work
            return TritonTimeoutError(
                f"Triton at {where} gave no answer ({what}) within triton_timeout_s="
                f"{self.settings.triton_timeout_s:g} s; the request was cancelled there"
            )
        if status in UNAVAILABLE:  # only UNAVAILABLE is worth another endpoint
            kind = Retryable if status == "StatusCode.UNAVAILABLE" else TritonUnavailableError
            return kind(f"Triton at {where} unavailable ({what}): {message}", headers=retry)
        if status in INVALID:
            parsed = InvalidRequest.parse(message, INPUT_NAMES)  # a python step's "FIELD: detail"
            if parsed is not None:
                return InvalidRequestError(f"{parsed.json_field}: {parsed.detail}", field=parsed.json_field)
            # Triton's own checks name an input in quotes ("missing required input(s) ['PROMPT']")
            named = next((name for name in INPUT_NAMES if f"'{name}'" in message), None)
            field = None if named is None else named.lower()
            return InvalidRequestError(message.removeprefix("in ensemble 'txt2img', "), field=field)
        if any(words in message for words in NOT_READY):
            return Retryable(f"Triton at {where}: {message}", headers=retry)
        return TritonError(f"Triton error ({what}): {message}")

    async def ready(self) -> bool:
        """Some endpoint is ready now (every endpoint is probed)."""
        await self.check_health()
        return any(e.healthy for e in self.endpoints.values())

    async def served_model(self) -> ServedModel:
        """What txt2img serves, from Triton's configs: re-read every `served_model_refresh_s` and after
        a failed txt2img call, so a swapped engine shows (its `fingerprint` changes)."""
        async with self._served_lock:  # one re-read at a time; the others wait for it
            if self._served is None or time.monotonic() >= self._served_until:
                served = await self._read_served_model()
                if self._served is None or served.fingerprint != self._served.fingerprint:
                    log.info(
                        "serving %s via Triton at %s (fingerprint %s)",
                        served.model, self.settings.triton_url, served.fingerprint[:12],
                    )  # fmt: skip
                self._served = served
                self._served_until = time.monotonic() + self.settings.served_model_refresh_s
            return self._served

    async def _read_served_model(self) -> ServedModel:
        return await self._routed("reading model configs", self._read_from)

    async def _read_from(self, endpoint: Endpoint) -> ServedModel:
        timeout, client = self.settings.triton_probe_timeout_s, endpoint.client
        index = await client.get_model_repository_index(as_json=True, client_timeout=timeout)
        versions: dict[str, list[str]] = {}
        for model in index.get("models", []):
            if model.get("state") == "READY":
                versions.setdefault(model["name"], []).append(str(model.get("version", "")))
        names = [name for name in c.MODELS if name in versions or name == c.TXT2IMG.name]
        responses = await asyncio.gather(
            *(client.get_model_config(name, as_json=True, client_timeout=timeout) for name in names)
        )
        configs = {name: response["config"] for name, response in zip(names, responses, strict=True)}
        served = ServedModel.from_configs(configs)
        return dataclasses.replace(served, fingerprint=config_fingerprint(configs, versions))

    async def txt2img(self, prompt: str, **params: Any) -> Txt2ImgResult:
        """txt2img with a deadline (`triton_timeout_s`, Triton cancels the request past it). A call
        given up (the deadline passed, or the caller cancelled: its client went away) also has its
        denoise loop dropped (`_drop`)."""
        outputs = [InferRequestedOutput(t.name) for t in c.TXT2IMG.outputs]
        inputs = txt2img_inputs(prompt, **params)
        request_id = f"gw-{secrets.token_hex(8)}"

        async def call(endpoint: Endpoint) -> Any:
            timeout = self.settings.triton_timeout_s
            try:
                return await endpoint.client.infer(
                    c.TXT2IMG.name, inputs, outputs=outputs, request_id=request_id, client_timeout=timeout
                )
            except asyncio.CancelledError:
                self._drop_later(endpoint, request_id, "its client went away")
                raise
            except InferenceServerException as exc:
                if str(exc.status()) == "StatusCode.DEADLINE_EXCEEDED":
                    self._drop_later(endpoint, request_id, "past its deadline")
                raise

        try:
            result = await self._routed("txt2img", call)
        except (TritonError, TritonUnavailableError, TritonTimeoutError):
            self._served_until = 0.0  # re-read the configs next time: the model may have changed
            raise
        return self._noted(parse_result(result))

    def _drop_later(self, endpoint: Endpoint, request_id: str, why: str) -> None:
        task = asyncio.create_task(self._drop(endpoint, request_id, why))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _drop(self, endpoint: Endpoint, request_id: str, why: str) -> None:
        """Ask the endpoint's denoise model to drop a txt2img request's loop. Triton cancels an
        ensemble request only between its steps, never inside the running denoise step, which
        would otherwise run all its UNet steps for nobody; the request id reaches that step."""
        drop = [infer_input(c.CANCEL, np.array([request_id.encode()], dtype=np.object_))]
        where = f"txt2img {request_id} on {endpoint.address} ({why})"
        timeout = self.settings.triton_probe_timeout_s
        try:
            await endpoint.client.infer(c.DENOISE.name, drop, client_timeout=timeout)
        except InferenceServerException as exc:
            log.warning("%s: could not drop it: %s", where, exc)
            return
        log.info("%s: dropped", where)

    def _noted(self, result: Txt2ImgResult) -> Txt2ImgResult:
        """A result's UNet version other than the configs said: an engine swap; re-read them next time."""
        known = self._served.engines.get(c.UNET.name) if self._served else None
        if result.engines and known is not None and result.engines[-1].get("version") != known.version:
            self._served_until = 0.0
        return result

    async def txt2img_stream(
        self, prompt: str, preview: bool = False, **params: Any
    ) -> AsyncGenerator[Progress | Txt2ImgResult, None]:
        """txt2img_stream over gRPC streaming: a Progress per denoising step, then the result.
        Closing the generator early (a cancelled job) cancels the stream, and Triton drops the
        request before its next step. An endpoint lost mid-stream: the request starts again on
        another one (progress from step 1)."""
        inputs = txt2img_inputs(prompt, **params)
        if preview:
            inputs.append(infer_input(c.PREVIEW, np.array([True])))
        tried: set[str] = set()
        while True:
            with self._busy(tried) as endpoint:
                try:
                    async for event in self._stream_on(endpoint, inputs):
                        yield event
                    return
                except Retryable as error:
                    if not self._retry(error, endpoint, tried, "txt2img_stream (progress starts again)"):
                        raise

    async def _stream_on(
        self, endpoint: Endpoint, inputs: list[Any]
    ) -> AsyncGenerator[Progress | Txt2ImgResult, None]:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": c.TXT2IMG_STREAM.name, "inputs": inputs}

        stream = endpoint.client.stream_infer(requests(), stream_timeout=self.settings.triton_timeout_s)
        try:
            async for result, error in stream:
                if error is not None:
                    raise self._map(error, "txt2img_stream", endpoint)
                event = parse_stream_response(result)
                if isinstance(event, Txt2ImgResult):
                    yield self._noted(event)
                    return
                yield event
        except InferenceServerException as exc:
            raise self._map(exc, "txt2img_stream", endpoint) from None
        except grpc.aio.AioRpcError as exc:  # tritonclient's stream iterator lets gRPC's own errors through
            error = InferenceServerException(msg=exc.details() or str(exc), status=str(exc.code()))
            raise self._map(error, "txt2img_stream", endpoint) from None
        finally:
            stream.cancel()
        raise Retryable(
            f"Triton at {endpoint.address}: txt2img_stream ended without a result",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )
