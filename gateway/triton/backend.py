"""The TritonBackend (gateway/backend.py) over gRPC (tritonclient.grpc.aio): the calls, each on an
endpoint of the pool (pool.py) with a deadline, and Triton's errors mapped onto the gateway's.

Retries: a call that failed with UNAVAILABLE (connection refused, the server gone mid-call) or because
the endpoint's txt2img is not ready is sent to another endpoint, up to `triton_retries` times. txt2img
is a pure function of its inputs (the gateway fixes the seed before the call), so running it again is
safe; a job's progress restarts from step 1 on the new endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import InferRequestedOutput
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.gateway.errors import (
    InvalidRequestError,
    TritonError,
    TritonTimeoutError,
    TritonUnavailableError,
)
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.triton.pool import Endpoint, EndpointPool, Retryable
from sd_triton.requests import InvalidRequest
from sd_triton.served_model import ServedModel, config_fingerprint
from sd_triton.txt2img_client import (
    Progress,
    Txt2ImgResult,
    infer_input,
    output_names,
    parse_result,
    parse_stream_response,
    txt2img_inputs,
)

log = logging.getLogger(__name__)

UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}
INVALID = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE"}
NOT_READY = ("not found", "unavailable", "not ready")  # Triton's words for a model it cannot run now
GRPC_TRANSPORT_FAILURE = "Internal error from Core"  # grpc's message for a call its connection broke
ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")  # Triton's words before an ensemble step's error
INPUT_NAMES = [t.name for t in c.TXT2IMG_STREAM.inputs]  # what an INVALID_ARG message may name
T = TypeVar("T")


class GrpcTritonBackend:
    """The TritonBackend (gateway/backend.py) over gRPC to one or more Triton servers."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.pool = EndpointPool(settings, metrics)
        self._served: dict[str, ServedModel] = {}  # by pipeline
        self._served_until = 0.0  # monotonic time of the next re-read
        self._served_lock = asyncio.Lock()
        self._drops: set[asyncio.Task[None]] = set()  # `_drop` calls under way

    def start(self) -> None:
        self.pool.start()

    async def close(self) -> None:
        if self._drops:  # the drops of requests cancelled by the shutdown itself
            await asyncio.wait(self._drops, timeout=self.settings.triton_probe_timeout_s)
        await self.pool.close()

    def endpoint_states(self) -> dict[str, str]:
        return self.pool.endpoint_states()

    async def _routed(self, what: str, call: Callable[[Endpoint], Awaitable[T]]) -> T:
        """`call` on the least busy endpoint; on a Retryable failure, again on another one."""
        tried: set[str] = set()
        while True:
            with self.pool.busy(tried) as endpoint:
                try:
                    return await call(endpoint)
                except InferenceServerException as exc:
                    error = self._map(exc, what, endpoint)
                    if not self.pool.retry(error, endpoint, tried, what):
                        raise error from None

    def _map(self, exc: InferenceServerException, what: str, endpoint: Endpoint | None = None) -> Exception:
        status, message = str(exc.status()), exc.message() or str(exc)
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        where = endpoint.address if endpoint else self.settings.triton_url
        if status == "StatusCode.DEADLINE_EXCEEDED":  # Triton saw the deadline pass and dropped the work
            return TritonTimeoutError(
                f"Triton at {where} gave no answer ({what}) within triton_timeout_s="
                f"{self.settings.triton_timeout_s:g} s; the request was cancelled there"
            )
        if status == "StatusCode.INTERNAL" and message.strip() == GRPC_TRANSPORT_FAILURE:
            # gRPC's own words when the connection broke mid-call (a server killed while it streamed):
            # the server never answered, so another endpoint may
            return Retryable(f"Triton at {where} lost ({what}): {message}", headers=retry)
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
            return InvalidRequestError(ENSEMBLE_PREFIX.sub("", message), field=field)
        if any(words in message for words in NOT_READY):
            return Retryable(f"Triton at {where}: {message}", headers=retry)
        return TritonError(f"Triton error ({what}): {message}")

    async def ready(self) -> bool:
        """Some endpoint is ready now (every endpoint is probed)."""
        await self.pool.check_health()
        return any(e.healthy for e in self.pool.endpoints.values())

    async def served_models(self, fresh: bool = False) -> list[ServedModel]:
        """Every pipeline txt2img serves (the unnamed one first), from Triton's configs and each
        pipeline's adapter library: re-read every `served_model_refresh_s`, after a failed txt2img call
        (a swapped engine shows: its `fingerprint` changes), and when `fresh`."""
        async with self._served_lock:  # one re-read at a time; the others wait for it
            if fresh or not self._served or time.monotonic() >= self._served_until:
                served = await self._routed("reading model configs", self._read_from)
                known = {m.pipeline: m.fingerprint for m in self._served.values()}
                for model in served:
                    if known.get(model.pipeline) != model.fingerprint:
                        log.info(
                            "serving %s via Triton at %s (fingerprint %s)",
                            model.model, self.settings.triton_url, model.fingerprint[:12],
                        )  # fmt: skip
                self._served = {m.pipeline: m for m in served}
                self._served_until = time.monotonic() + self.settings.served_model_refresh_s
            return list(self._served.values())

    async def _read_from(self, endpoint: Endpoint) -> list[ServedModel]:
        timeout, client = self.settings.triton_probe_timeout_s, endpoint.client
        index = await client.get_model_repository_index(as_json=True, client_timeout=timeout)
        versions: dict[str, list[str]] = {}
        for model in index.get("models", []):
            if model.get("state") == "READY":
                versions.setdefault(model["name"], []).append(str(model.get("version", "")))
        pipelines = c.pipelines(versions)
        if not pipelines:
            raise InferenceServerException(msg=f"{c.TXT2IMG.name} not ready", status="StatusCode.UNAVAILABLE")
        return list(await asyncio.gather(*(self._read_pipeline(client, p, versions) for p in pipelines)))

    async def _read_pipeline(self, client: Any, pipeline: str, versions: dict[str, list[str]]) -> ServedModel:
        """One pipeline's ServedModel from its models' configs (the names without its prefix)."""
        names = [name for name in c.MODELS if c.model_name(pipeline, name) in versions]
        timeout = self.settings.triton_probe_timeout_s
        responses = await asyncio.gather(
            *(
                client.get_model_config(c.model_name(pipeline, name), as_json=True, client_timeout=timeout)
                for name in names
            )
        )
        configs = {name: response["config"] for name, response in zip(names, responses, strict=True)}
        mine = {name: versions[c.model_name(pipeline, name)] for name in names}
        served = ServedModel.from_configs(configs, pipeline)
        loras = await self._read_library(client, pipeline, c.DENOISE.name, c.LORA_LIBRARY, c.ENGINES)
        embeddings = await self._read_library(
            client, pipeline, c.DENOISE.name, c.EMBEDDING_LIBRARY, c.ENGINES
        )
        fingerprint = config_fingerprint(configs, mine)
        return dataclasses.replace(served, fingerprint=fingerprint, loras=loras, embeddings=embeddings)

    async def _read_library(
        self, client: Any, pipeline: str, model: str, flag: c.TensorSpec, answer: c.TensorSpec
    ) -> list[dict[str, Any]]:
        """A pipeline's library (a control request carrying `flag` to its `model`, the list in its
        `answer` output): LoRA adapters (LORA_LIBRARY), textual-inversion embeddings (EMBEDDING_LIBRARY);
        none from an export before them."""
        try:
            result = await client.infer(
                c.model_name(pipeline, model), [infer_input(flag, np.array([True]))],
                outputs=[InferRequestedOutput(answer.name)],
                client_timeout=self.settings.triton_probe_timeout_s,
            )  # fmt: skip
        except InferenceServerException as exc:
            log.debug("no %s from %s: %s", flag.name, pipeline or "the unnamed pipeline", exc)
            return []
        raw = result.as_numpy(answer.name)
        return [] if raw is None else list(json.loads(raw.reshape(-1)[0]))

    async def txt2img(
        self, prompt: str, pipeline: str = "", latents: bool = False, **params: Any
    ) -> Txt2ImgResult:
        """txt2img (`pipeline`'s; `latents`: the result carries them) with a deadline (`triton_timeout_s`,
        Triton cancels the request past it). A call given up (the deadline passed, or the caller
        cancelled: its client went away) also has its denoise loop dropped (`_drop`)."""
        outputs = [InferRequestedOutput(name) for name in output_names(c.TXT2IMG, latents)]
        inputs = txt2img_inputs(prompt, **params)
        request_id = f"gw-{secrets.token_hex(8)}"
        model = c.model_name(pipeline, c.TXT2IMG.name)

        async def call(endpoint: Endpoint) -> Any:
            timeout = self.settings.triton_timeout_s
            try:
                return await endpoint.client.infer(
                    model, inputs, outputs=outputs, request_id=request_id, client_timeout=timeout
                )
            except asyncio.CancelledError:
                self._drop_later(endpoint, pipeline, request_id, "its client went away")
                raise
            except InferenceServerException as exc:
                if str(exc.status()) == "StatusCode.DEADLINE_EXCEEDED":
                    self._drop_later(endpoint, pipeline, request_id, "past its deadline")
                raise

        try:
            result = await self._routed("txt2img", call)
        except (TritonError, TritonUnavailableError, TritonTimeoutError):
            self._served_until = 0.0  # re-read the configs next time: the model may have changed
            raise
        return self._noted(pipeline, parse_result(result))

    def _drop_later(self, endpoint: Endpoint, pipeline: str, request_id: str, why: str) -> None:
        task = asyncio.create_task(self._drop(endpoint, pipeline, request_id, why))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _drop(self, endpoint: Endpoint, pipeline: str, request_id: str, why: str) -> None:
        """Ask the endpoint's denoise model to drop a txt2img request's loop. Triton cancels an
        ensemble request only between its steps, never inside the running denoise step, which
        would otherwise run all its UNet steps for nobody; the request id reaches that step."""
        drop = [infer_input(c.CANCEL, np.array([request_id.encode()], dtype=np.object_))]
        where = f"txt2img {request_id} on {endpoint.address} ({why})"
        timeout = self.settings.triton_probe_timeout_s
        try:
            await endpoint.client.infer(c.model_name(pipeline, c.DENOISE.name), drop, client_timeout=timeout)
        except InferenceServerException as exc:
            log.warning("%s: could not drop it: %s", where, exc)
            return
        log.info("%s: dropped", where)

    def _noted(self, pipeline: str, result: Txt2ImgResult) -> Txt2ImgResult:
        """A result's UNet version other than the configs said: an engine swap; re-read them next time."""
        served = self._served.get(pipeline)
        known = served.engines.get(c.UNET.name) if served else None
        if result.engines and known is not None and result.engines[-1].get("version") != known.version:
            self._served_until = 0.0
        return result

    async def txt2img_stream(
        self, prompt: str, preview: bool = False, pipeline: str = "", latents: bool = False, **params: Any
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
            with self.pool.busy(tried) as endpoint:
                try:
                    async for event in self._stream_on(endpoint, pipeline, inputs, latents):
                        yield event
                    return
                except Retryable as error:
                    if not self.pool.retry(error, endpoint, tried, "txt2img_stream (progress starts again)"):
                        raise

    async def _stream_on(
        self, endpoint: Endpoint, pipeline: str, inputs: list[Any], latents: bool
    ) -> AsyncGenerator[Progress | Txt2ImgResult, None]:
        outputs = [InferRequestedOutput(name) for name in output_names(c.TXT2IMG_STREAM, latents)]

        async def requests() -> AsyncIterator[dict[str, Any]]:
            model = c.model_name(pipeline, c.TXT2IMG_STREAM.name)
            yield {"model_name": model, "inputs": inputs, "outputs": outputs}

        stream = endpoint.client.stream_infer(requests(), stream_timeout=self.settings.triton_timeout_s)
        try:
            async for result, error in stream:
                if error is not None:
                    raise self._map(error, "txt2img_stream", endpoint)
                event = parse_stream_response(result)
                if isinstance(event, Txt2ImgResult):
                    yield self._noted(pipeline, event)
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
