"""Checks before a request reaches a route: JSON content type (a multipart form on the routes that take
uploads) and the body size limit; and a POST whose client goes away before its response is cancelled
(with its Triton call, which Triton drops)."""

from __future__ import annotations

import asyncio
import logging

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd_triton.gateway.errors import GatewayError, PayloadTooLargeError, UnsupportedMediaTypeError

log = logging.getLogger(__name__)
DISCONNECTED = "sd_triton.client_disconnected"  # set in the scope of a request cancelled that way
FORM_ROUTES = frozenset({"/v1/images/edits"})  # OpenAI's image uploads: multipart/form-data, not JSON


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = self._check_headers(headers, scope["path"] in FORM_ROUTES)
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
        await self._cancelled_on_disconnect(scope, b"".join(chunks), receive, send)

    async def _cancelled_on_disconnect(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Run the app on the body read, while watching the connection: a client gone before the
        response ends cancels the request (its Triton call is cancelled and Triton drops the work)."""
        gone, replayed, responded = asyncio.Event(), False, False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def sent(message: Message) -> None:
            nonlocal responded
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        request = asyncio.ensure_future(self.app(scope, replay, sent))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({request, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not request.done() and not responded:
                scope[DISCONNECTED] = True
                log.info("%s %s: the client went away; request cancelled", scope["method"], scope["path"])
                request.cancel()
            try:
                await request
            except asyncio.CancelledError:
                if not scope.get(DISCONNECTED):
                    raise
        finally:
            watcher.cancel()
            if not request.done():  # this middleware itself cancelled (server shutting down)
                request.cancel()

    def _too_large(self, got: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"body: at most {self.max_body_bytes} bytes, got {got}", field="body")

    def _check_headers(self, headers: Headers, form: bool = False) -> GatewayError | None:
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        expected = "multipart/form-data" if form else "application/json"
        if media_type != expected:
            return UnsupportedMediaTypeError(
                f"content-type: must be {expected}, got {media_type or 'none'}", field="content-type"
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
