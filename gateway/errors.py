"""One error hierarchy, mapped to HTTP statuses in one place (`main.install_error_handlers`)."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status = 500
    kind = "internal_error"

    def __init__(self, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class InvalidRequestError(GatewayError):
    status = 422
    kind = "invalid_request"


class PayloadTooLargeError(GatewayError):
    status = 413
    kind = "payload_too_large"


class UnsupportedMediaTypeError(GatewayError):
    status = 415
    kind = "unsupported_media_type"


class TritonUnavailableError(GatewayError):
    status = 503
    kind = "backend_unavailable"


class TritonError(GatewayError):
    status = 502
    kind = "backend_error"


class OpenAIInvalidRequestError(InvalidRequestError):
    """An invalid request on the OpenAI-shaped route: OpenAI's status and error body."""

    status = 400

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.field,
                "code": None,
            }
        }
