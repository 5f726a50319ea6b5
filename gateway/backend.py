"""What the gateway needs from Triton, as an interface: `GrpcTritonBackend` (gateway/triton/) talks to
real servers; the tests pass an in-memory one to `create_app(backend=...)`.

Errors are the gateway's own (sd_triton.gateway.errors): `TritonUnavailableError` (503, retry later),
`TritonTimeoutError` (504), `OverloadedError` (429), `InvalidRequestError` (422, naming the field),
`TritonError` (502).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from sd_triton.served_model import ServedModel
from sd_triton.txt2img_client import Progress, Txt2ImgResult


class TritonBackend(Protocol):
    def start(self) -> None:
        """Begin background work (health checks); called once the event loop runs."""

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """Some endpoint can serve txt2img now."""

    def endpoint_states(self) -> dict[str, str]:
        """Each endpoint and its state ("ready", or why not), for /readyz."""

    async def served_models(self, fresh: bool = False) -> list[ServedModel]:
        """Each pipeline txt2img serves (the unnamed one first, then by name): name, sizes, limits,
        engines, default scheduler, fingerprint, adapters. `fresh`: read again now, not from the cache."""

    async def txt2img(
        self, prompt: str, pipeline: str = "", latents: bool = False, **params: Any
    ) -> Txt2ImgResult:
        """One prompt's images from `pipeline` (ServedModel.pipeline; `latents`: with its final latents, a
        hand-off's base). `params`: negative_prompt and sd_triton.txt2img_client.txt2img_inputs' arguments."""

    def txt2img_stream(
        self, prompt: str, preview: bool = False, pipeline: str = "", latents: bool = False, **params: Any
    ) -> AsyncGenerator[Progress | Txt2ImgResult, None]:
        """A Progress per denoising step, then the result; closing it early cancels the request."""
