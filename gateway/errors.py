"""One error hierarchy, mapped to HTTP statuses in one place (gateway/api/errors.py)."""

from __future__ import annotations

from typing import Any

OPENAI_PATH = "/v1/images/generations"
OPENAI_EDITS_PATH = "/v1/images/edits"
OPENAI_PATHS = frozenset({OPENAI_PATH, OPENAI_EDITS_PATH})  # errors on these routes take OpenAI's shape


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


class TritonTimeoutError(GatewayError):
    """The call passed its deadline (`triton_timeout_s`); Triton was told and dropped the request."""

    status = 504
    kind = "timeout"


class NotFoundError(GatewayError):
    """An unknown (or expired, or another key's) job or stored image."""

    status = 404
    kind = "not_found"


class BadSignatureError(GatewayError):
    status = 403
    kind = "forbidden"


class StorageError(GatewayError):
    status = 502
    kind = "storage_error"


class StateStoreUnavailableError(GatewayError):
    """The shared store (Redis) cannot be reached and the request needs it (async jobs)."""

    status = 503
    kind = "state_unavailable"


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


# --- API keys, limits, content policy (gateway/access/) ---


class UnauthorizedError(GatewayError):
    """A /v1 request without a valid API key: 401 with `WWW-Authenticate: Bearer`."""

    status = 401
    kind = "unauthorized"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer", **(headers or {})})


class RateLimitedError(GatewayError):
    """429 with Retry-After; `kind` says which limit (rate_limited, quota_exceeded, concurrency_limited)."""

    status = 429
    kind = "rate_limited"


class QuotaExceededError(RateLimitedError):
    kind = "quota_exceeded"


class ConcurrencyLimitedError(RateLimitedError):
    kind = "concurrency_limited"


class OverloadedError(RateLimitedError):
    """Every Triton endpoint has `triton_max_in_flight` requests outstanding: try again later."""

    kind = "overloaded"


class ContentPolicyError(GatewayError):
    """A prompt refused by the content policy, before any Triton work."""

    status = 400
    kind = "content_policy"

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["code"] = "content_policy"
        return body


class OpenAIContentPolicyError(GatewayError):
    """The content policy refusal on the OpenAI-shaped route, in OpenAI's shape and code (not an
    InvalidRequestError: the route's own field renaming must not catch it)."""

    status = 400
    kind = "content_policy"

    def body(self) -> dict[str, Any]:
        body = OpenAIInvalidRequestError(self.message, field=self.field).body()
        body["error"]["code"] = "content_policy_violation"
        return body
