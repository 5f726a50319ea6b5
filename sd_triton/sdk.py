"""Python SDK for the sd-triton gateway. Needs only httpx (and Pillow for `to_pil`).

from sd_triton.sdk import Client
client = Client("http://localhost:8080")
result = client.generate("a lighthouse at dawn", steps=20, seed=42)
result.images[0].save("lighthouse.png")
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 300.0


class SDTritonError(Exception):
    """An error answer from the gateway (or none at all)."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field


class BadRequestError(SDTritonError):
    """4xx: the request was wrong; `field` names the culprit."""


class ServiceUnavailableError(SDTritonError):
    """503 or no connection: retry later (`retry_after` seconds, when the gateway said)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class APIError(SDTritonError):
    """Any other failure of the gateway or of Triton behind it."""


def decode_image(b64: str) -> bytes:
    """The encoded image file (PNG, JPEG or WebP) from its base64."""
    return base64.b64decode(b64, validate=True)


def to_pil(b64: str) -> Any:
    """A PIL image from its base64."""
    from PIL import Image as PILImage

    image = PILImage.open(io.BytesIO(decode_image(b64)))
    image.load()
    return image


@dataclass(frozen=True)
class GeneratedImage:
    base64: str | None  # None when asked for response_format="url"
    seed: int
    width: int
    height: int
    content_type: str
    prompt_index: int = 0
    url: str | None = None  # a signed link that expires, with response_format="url"

    def _base64(self) -> str:
        if self.base64 is None:
            raise ValueError(f"this image came as a URL, not base64: fetch {self.url}")
        return self.base64

    @property
    def data(self) -> bytes:
        return decode_image(self._base64())

    def to_pil(self) -> Any:
        return to_pil(self._base64())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class Generation:
    images: list[GeneratedImage]
    timings: dict[str, float]
    provenance: dict[str, Any]
    truncation: list[dict[str, int]] = field(default_factory=list)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Generation:
        return cls(
            images=[GeneratedImage(**image) for image in body["images"]],
            timings=body["timings"],
            provenance=body["provenance"],
            truncation=body.get("truncation", []),
        )


def _params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        message, field_name = str(error["message"]), error.get("field")
    except (ValueError, KeyError, TypeError):
        message, field_name = response.text or response.reason_phrase, None
    if response.status_code == 503:
        retry = response.headers.get("Retry-After")
        raise ServiceUnavailableError(message, 503, float(retry) if retry else None)
    if 400 <= response.status_code < 500:
        raise BadRequestError(message, response.status_code, field_name)
    raise APIError(message, response.status_code)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise ServiceUnavailableError(f"gateway unreachable: {exc}") from exc
        _raise_for(response)
        return response.json()  # type: ignore[no-any-return]

    def generate(self, prompt: str, **params: Any) -> Generation:
        """params: negative_prompt, width, height, steps, guidance_scale, seed, scheduler,
        num_images, output_format."""
        return Generation.from_json(self._post("/v1/generate", {"prompt": prompt, **_params(params)}))

    def generate_batch(self, prompts: list[str], **params: Any) -> Generation:
        return Generation.from_json(self._post("/v1/generate/batch", {"prompts": prompts, **_params(params)}))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(path, json=body)
        except httpx.TransportError as exc:
            raise ServiceUnavailableError(f"gateway unreachable: {exc}") from exc
        _raise_for(response)
        return response.json()  # type: ignore[no-any-return]

    async def generate(self, prompt: str, **params: Any) -> Generation:
        return Generation.from_json(await self._post("/v1/generate", {"prompt": prompt, **_params(params)}))

    async def generate_batch(self, prompts: list[str], **params: Any) -> Generation:
        body = {"prompts": prompts, **_params(params)}
        return Generation.from_json(await self._post("/v1/generate/batch", body))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
