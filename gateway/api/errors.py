"""The gateway's errors as HTTP answers, in one place: its own hierarchy (gateway/errors.py), the state
store being away, and FastAPI's and pydantic's own 4xx, all in the shape {"error": {type, message,
field}}; on the OpenAI routes in OpenAI's shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd_triton.gateway.errors import (
    OPENAI_PATHS,
    GatewayError,
    InvalidRequestError,
    OpenAIInvalidRequestError,
    StateStoreUnavailableError,
)
from sd_triton.gateway.state import StateUnavailable

log = logging.getLogger("sd_triton.gateway")


def _validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    parts, first_field = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        elif error.get("type") == "json_invalid":
            field, message = "body", f"invalid JSON: {error.get('ctx', {}).get('error', message)}"
        first_field = first_field or field
        parts.append(f"{field}: {message}")
    return "; ".join(parts), first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StateUnavailable)
    async def state_unavailable(request: Request, exc: StateUnavailable) -> JSONResponse:
        # limits, quotas and the cache fail open on their own; what gets here needs the store (jobs)
        headers = {"Retry-After": str(request.app.state.settings.retry_after_s)}
        return await gateway_error(
            request, StateStoreUnavailableError(f"state store: {exc}", headers=headers)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 4xx (an unparseable body, an unknown route, a wrong method), in our shape
        message = f"body: {exc.detail}" if exc.status_code == 400 else str(exc.detail)
        kind = "invalid_request" if exc.status_code < 500 else "internal_error"
        body = {"error": {"type": kind, "message": message}}
        if request.url.path in OPENAI_PATHS and exc.status_code < 500:
            field = "body" if exc.status_code == 400 else None
            body = OpenAIInvalidRequestError(message, field=field).body()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def validation_error(
        request: Request, exc: RequestValidationError | ValidationError
    ) -> JSONResponse:
        message, field = _validation_message(exc)
        error_class = OpenAIInvalidRequestError if request.url.path in OPENAI_PATHS else InvalidRequestError
        return await gateway_error(request, error_class(message, field=field))
