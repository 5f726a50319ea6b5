"""Python SDK for the sd-triton gateway. Needs only httpx (and Pillow for `to_pil`).

from sd_triton.sdk import Client
client = Client("http://localhost:8080")
result = client.generate("a lighthouse at dawn", steps=20, seed=42)
result.images[0].save("lighthouse.png")
again = client.generate("the lighthouse at night", image="lighthouse.png", strength=0.6)  # image-to-image

job = client.submit_job("a lighthouse at dawn", steps=30, preview=True)
for event in client.job_events(job.id):  # queued, step (i / N, eta_s, preview), completed
    print(event.event, event.data.get("step"))
"""

from __future__ import annotations

import base64
import io
import json
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 300.0


class APIError(Exception):
    """Every error of this SDK: an error answer from the gateway (or none at all). `status` is the HTTP
    status (None without an answer), `type` the gateway's error type, `field` the request field at fault."""

    def __init__(
        self, message: str, status: int | None = None, field: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field
        self.type = type


SDTritonError = APIError  # the base's name before the hierarchy below


class _RetryLater(APIError):
    def __init__(
        self,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message, status, type=type)
        self.retry_after = retry_after  # seconds, when the gateway said (Retry-After)


class BadRequestError(APIError):
    """4xx but 401 and 429: the request was wrong (422 a field out of its limits, 400 the body or the
    content policy, 404, 413, 415); `field` names the culprit."""


class AuthenticationError(APIError):
    """401: no API key, or a wrong or revoked one."""


class RateLimitError(_RetryLater):
    """429 for this API key: `type` is rate_limited, quota_exceeded or concurrency_limited; retry after
    `retry_after` seconds."""


class ServiceUnavailableError(_RetryLater):
    """503, 429 `overloaded` (every Triton endpoint full) or no connection: retry later."""


class InternalServerError(APIError):
    """Another 5xx: Triton answered with an error (502), or the deadline passed (504)."""


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
    cache: str = "miss"  # hit: answered from the gateway's cache; bypass: asked not to be (no-cache)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Generation:
        return cls(
            images=[GeneratedImage(**image) for image in body["images"]],
            timings=body["timings"],
            provenance=body["provenance"],
            truncation=body.get("truncation", []),
            cache=body.get("cache", "miss"),
        )


class JobFailedError(APIError):
    """The job ended failed or cancelled: `job_id`, `job_status` ("failed" or "cancelled"), `error` (the
    job's error body, {type, message}; `type` and `message` are also the exception's own)."""

    def __init__(self, job_id: str, job_status: str, error: dict[str, Any] | None = None) -> None:
        self.job_id, self.job_status, self.error = job_id, job_status, error or {}
        detail = self.error.get("message") or job_status
        super().__init__(f"job {job_id} {job_status}: {detail}", type=self.error.get("type"))


@dataclass(frozen=True)
class Job:
    id: str
    status: str  # queued, running, completed, failed, cancelled
    queue_position: int | None = None
    progress: dict[str, Any] | None = None  # {step, steps, eta_s, elapsed_s}
    result: Generation | None = None
    error: dict[str, Any] | None = None
    events_url: str = ""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        result = body.get("result")
        return cls(
            id=body["id"],
            status=body["status"],
            queue_position=body.get("queue_position"),
            progress=body.get("progress"),
            result=None if result is None else Generation.from_json(result),
            error=body.get("error"),
            events_url=body.get("events_url", ""),
        )


@dataclass(frozen=True)
class JobEvent:
    """One Server-Sent Event of a job: `event` is queued, step, completed, failed or cancelled."""

    id: int
    event: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in ("completed", "failed", "cancelled")

    def generation(self) -> Generation:
        """The result of a `completed` event; JobFailedError for `failed` and `cancelled`."""
        if self.event == "completed":
            return Generation.from_json(self.data["result"])
        raise JobFailedError(str(self.data.get("id", "")), self.event, self.data.get("error"))


class _SSEParser:
    """Lines of a text/event-stream in, JobEvents out (comments and unknown fields skipped)."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def feed(self, line: str) -> JobEvent | None:
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(":")
                self.fields[name] = value.removeprefix(" ")
            return None
        fields, self.fields = self.fields, {}
        if "data" not in fields:
            return None
        return JobEvent(
            int(fields.get("id", "0")), fields.get("event", "message"), json.loads(fields["data"])
        )


def _parse_sse(lines: Iterable[str]) -> Iterator[JobEvent]:
    parser = _SSEParser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event
            if event.terminal:
                return


def _events_headers(last_event_id: int | None) -> dict[str, str]:
    return {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}


IMAGE_FIELDS = ("image", "mask")  # request fields that carry an uploaded image


def _a_file(text: str) -> bool:
    try:
        return len(text) < 4096 and not text.startswith("data:") and Path(text).is_file()
    except OSError:  # not a name this system takes: base64
        return False


def image_field(value: Any) -> str:
    """An image for a request field: a path (str or Path) to a file, its bytes, or a PIL image (sent as
    PNG) -> base64; any other str is sent as it is (base64 already, or a data URI)."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Path) or (isinstance(value, str) and _a_file(value)):
        return base64.b64encode(Path(value).read_bytes()).decode("ascii")
    if isinstance(value, str):
        return value
    if hasattr(value, "save"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    raise TypeError(f"an image must be a path, bytes, a PIL image or base64 text, got {type(value).__name__}")


def _params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: image_field(v) if k in IMAGE_FIELDS else v for k, v in params.items() if v is not None}


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        message, field_name, error_type = str(error["message"]), error.get("field"), error.get("type")
    except (ValueError, KeyError, TypeError):
        message, field_name, error_type = response.text or response.reason_phrase, None, None
    status, retry = response.status_code, response.headers.get("Retry-After")
    retry_after = float(retry) if retry else None
    if status == 503 or (status == 429 and error_type == "overloaded"):  # the servers are full or away
        raise ServiceUnavailableError(message, status, retry_after, type=error_type)
    if status == 429:
        raise RateLimitError(message, status, retry_after, type=error_type)
    if status == 401:
        raise AuthenticationError(message, status, field_name, error_type)
    if 400 <= status < 500:
        raise BadRequestError(message, status, field_name, error_type)
    raise InternalServerError(message, status, field_name, error_type)


def _loras_path(model: str | None) -> str:
    return "/v1/loras" if model is None else "/v1/loras?" + urllib.parse.urlencode({"model": model})


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise ServiceUnavailableError(f"gateway unreachable: {exc}") from exc
        _raise_for(response)
        return response.json()  # type: ignore[no-any-return]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", path, body)

    def submit_job(self, prompt: str, **params: Any) -> Job:
        """The generate parameters, plus preview (step events carry a preview image) and webhook_url."""
        return Job.from_json(self._post("/v1/jobs", {"prompt": prompt, **_params(params)}))

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._call("GET", f"/v1/jobs/{job_id}"))

    def loras(self, model: str | None = None) -> list[dict[str, Any]]:
        """The LoRA adapters served (GET /v1/loras): every model's, or `model`'s."""
        return self._call("GET", _loras_path(model))["data"]  # type: ignore[no-any-return]

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_json(self._call("DELETE", f"/v1/jobs/{job_id}"))

    def job_events(self, job_id: str, last_event_id: int | None = None) -> Iterator[JobEvent]:
        """The job's events in order (those so far first), ending with its terminal event."""
        headers = _events_headers(last_event_id)
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            yield from _parse_sse(response.iter_lines())

    def wait_job(self, job_id: str) -> Generation:
        """Follow the job to its end: its result, or JobFailedError."""
        for event in self.job_events(job_id):
            if event.terminal:
                return event.generation()
        raise APIError(f"job {job_id}: the event stream ended early")

    def generate(self, prompt: str, **params: Any) -> Generation:
        """params: the JSON fields of /v1/generate: sd_triton.requests.GenerationParams' names
        (width, height, steps, guidance_scale, seed, scheduler, num_images, strength), negative_prompt,
        output_format, response_format, and `image` for image-to-image, `mask` with it for inpainting
        (each a path, bytes, a PIL image or base64: `image_field`). An unknown one is the gateway's 422
        naming it."""
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

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise ServiceUnavailableError(f"gateway unreachable: {exc}") from exc
        _raise_for(response)
        return response.json()  # type: ignore[no-any-return]

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", path, body)

    async def submit_job(self, prompt: str, **params: Any) -> Job:
        return Job.from_json(await self._post("/v1/jobs", {"prompt": prompt, **_params(params)}))

    async def get_job(self, job_id: str) -> Job:
        return Job.from_json(await self._call("GET", f"/v1/jobs/{job_id}"))

    async def loras(self, model: str | None = None) -> list[dict[str, Any]]:
        return (await self._call("GET", _loras_path(model)))["data"]  # type: ignore[no-any-return]

    async def cancel_job(self, job_id: str) -> Job:
        return Job.from_json(await self._call("DELETE", f"/v1/jobs/{job_id}"))

    async def job_events(self, job_id: str, last_event_id: int | None = None) -> AsyncIterator[JobEvent]:
        headers = _events_headers(last_event_id)
        async with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            parser = _SSEParser()
            async for line in response.aiter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event
                    if event.terminal:
                        return

    async def wait_job(self, job_id: str) -> Generation:
        async for event in self.job_events(job_id):
            if event.terminal:
                return event.generation()
        raise APIError(f"job {job_id}: the event stream ended early")

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
