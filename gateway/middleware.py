"""Checks before a request reaches a route: JSON content type and the body size limit."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, PayloadTooLargeError, UnsupportedMediaTypeError


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = self._check_headers(headers)
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        # read the (small) body up front, so a chunked body past the limit is refused here too
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                error = self._too_large(f"more than {self.max_body_bytes}")
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, got: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"body: at most {self.max_body_bytes} bytes, got {got}", field="body")

    def _check_headers(self, headers: Headers) -> GatewayError | None:
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return UnsupportedMediaTypeError(
                f"content-type: must be application/json, got {media_type or 'none'}", field="content-type"
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return PayloadTooLargeError(
                    f"content-length: not a number: {length!r}", field="content-length"
                )
            if int(length) > self.max_body_bytes:
                return self._too_large(length)
        return None
