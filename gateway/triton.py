"""The gateway's one gRPC channel to Triton (tritonclient.grpc.aio), with a deadline on every call
and Triton's errors mapped onto the gateway's."""

from __future__ import annotations

import logging
from typing import Any

import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferRequestedOutput
from tritonclient.utils import InferenceServerException

from gateway.errors import InvalidRequestError, TritonError, TritonUnavailableError
from gateway.settings import GatewaySettings
from sd_triton import contract as c
from sd_triton.served_model import ServedModel
from sd_triton.txt2img_client import Txt2ImgResult, parse_result, txt2img_inputs

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
        """What txt2img serves, read once from Triton's configs (again after a failure)."""
        if self._served is None:
            configs: dict[str, Any] = {}
            try:
                for name in (c.TXT2IMG.name, *c.ENGINE_MODELS):
                    response = await self.client.get_model_config(
                        name, as_json=True, client_timeout=self.settings.triton_probe_timeout_s
                    )
                    configs[name] = response["config"]
            except InferenceServerException as exc:
                raise self._map(exc, "reading model configs") from None
            self._served = ServedModel.from_configs(configs)
            log.info("serving %s via Triton at %s", self._served.model, self.settings.triton_url)
        return self._served

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
            raise self._map(exc, "txt2img") from None
        return parse_result(result)


def _field_of(message: str) -> str | None:
    """The JSON field behind a Triton input named in an INVALID_ARG message."""
    for spec in c.TXT2IMG.inputs:
        if f"{spec.name}:" in message or f"'{spec.name}'" in message:
            return spec.name.lower()
    return None
