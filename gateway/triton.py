"""The gateway's one gRPC channel to Triton (tritonclient.grpc.aio), with a deadline on every call
and Triton's errors mapped onto the gateway's."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferRequestedOutput
from tritonclient.utils import InferenceServerException

from gateway.errors import InvalidRequestError, TritonError, TritonUnavailableError
from gateway.settings import GatewaySettings
from sd_triton import contract as c
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
UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
INVALID = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE"}


class TritonBackend:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.client = grpcaio.InferenceServerClient(settings.triton_url, channel_args=CHANNEL_ARGS)
        self._served: ServedModel | None = None
        self._served_until = 0.0  # monotonic time of the next re-read
        self._served_lock = asyncio.Lock()

    async def close(self) -> None:
        await self.client.close()

    def _map(self, exc: InferenceServerException, what: str) -> Exception:
        status, message = str(exc.status()), exc.message() or str(exc)
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if status in UNAVAILABLE:
            return TritonUnavailableError(
                f"Triton at {self.settings.triton_url} unavailable ({what}): {message}", headers=retry
            )
        if status in INVALID:
            return InvalidRequestError(
                message.removeprefix("in ensemble 'txt2img', "), field=_field_of(message)
            )
        if "not found" in message or "unavailable" in message or "not ready" in message:
            return TritonUnavailableError(f"Triton: {message}", headers=retry)
        return TritonError(f"Triton error ({what}): {message}")

    async def ready(self) -> bool:
        timeout = self.settings.triton_probe_timeout_s
        try:
            return bool(
                await self.client.is_server_ready(client_timeout=timeout)
                and await self.client.is_model_ready(c.TXT2IMG.name, client_timeout=timeout)
            )
        except InferenceServerException:
            return False

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
        timeout = self.settings.triton_probe_timeout_s
        try:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=timeout)
            versions: dict[str, list[str]] = {}
            for model in index.get("models", []):
                if model.get("state") == "READY":
                    versions.setdefault(model["name"], []).append(str(model.get("version", "")))
            names = [name for name in c.MODELS if name in versions or name == c.TXT2IMG.name]
            responses = await asyncio.gather(
                *(self.client.get_model_config(name, as_json=True, client_timeout=timeout) for name in names)
            )
        except InferenceServerException as exc:
            raise self._map(exc, "reading model configs") from None
        configs = {name: response["config"] for name, response in zip(names, responses, strict=True)}
        served = ServedModel.from_configs(configs)
        return dataclasses.replace(served, fingerprint=config_fingerprint(configs, versions))

    async def txt2img(self, prompt: str, **params: Any) -> Txt2ImgResult:
        outputs = [InferRequestedOutput(t.name) for t in c.TXT2IMG.outputs]
        try:
            result = await self.client.infer(
                c.TXT2IMG.name,
                txt2img_inputs(prompt, **params),
                outputs=outputs,
                client_timeout=self.settings.triton_timeout_s,
            )
        except InferenceServerException as exc:
            error = self._map(exc, "txt2img")
            if not isinstance(error, InvalidRequestError):
                self._served_until = 0.0  # re-read the configs next time: the model may have changed
            raise error from None
        return self._noted(parse_result(result))

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
        request before its next step."""
        inputs = txt2img_inputs(prompt, **params)
        if preview:
            inputs.append(infer_input(c.PREVIEW, np.array([True])))

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": c.TXT2IMG_STREAM.name, "inputs": inputs}

        stream = self.client.stream_infer(requests(), stream_timeout=self.settings.triton_timeout_s)
        try:
            async for result, error in stream:
                if error is not None:
                    raise self._map(error, "txt2img_stream")
                event = parse_stream_response(result)
                if isinstance(event, Txt2ImgResult):
                    yield self._noted(event)
                    return
                yield event
        except InferenceServerException as exc:
            raise self._map(exc, "txt2img_stream") from None
        finally:
            stream.cancel()
        raise TritonUnavailableError(
            f"Triton at {self.settings.triton_url}: txt2img_stream ended without a result",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )


def _field_of(message: str) -> str | None:
    """The JSON field behind a Triton input named in an INVALID_ARG message."""
    for spec in c.TXT2IMG.inputs:
        if f"{spec.name}:" in message or f"'{spec.name}'" in message:
            return spec.name.lower()
    return None
