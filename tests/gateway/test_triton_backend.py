"""The gRPC backend's mapping of Triton's errors onto the gateway's (no server needed)."""

from __future__ import annotations

import asyncio

import pytest
from tritonclient.utils import InferenceServerException

from sd_triton.gateway.errors import (
    InvalidRequestError,
    TritonError,
    TritonTimeoutError,
    TritonUnavailableError,
)
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.triton.backend import GrpcTritonBackend
from sd_triton.gateway.triton.pool import Retryable


@pytest.mark.parametrize(
    ("status", "message", "expected", "field", "text"),
    [
        # a python step's InvalidRequest: the field and its detail, as the gateway's own 422 says them
        ("StatusCode.INVALID_ARGUMENT", "in ensemble 'txt2img', HEIGHT: must be a multiple of 8, got 70",
         InvalidRequestError, "height", "height: must be a multiple of 8, got 70"),
        # Triton's own input check names the input in quotes
        ("StatusCode.INVALID_ARGUMENT", "expected 9 inputs but got 8, missing required input(s) ['PROMPT']",
         InvalidRequestError, "prompt", "missing required input(s) ['PROMPT']"),
        ("StatusCode.INVALID_ARGUMENT", "in ensemble 'txt2img', something else", InvalidRequestError, None,
         "something else"),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", TritonTimeoutError, None, "triton_timeout_s"),
        ("StatusCode.CANCELLED", "Cancelled", TritonUnavailableError, None, "unavailable"),
        ("StatusCode.INTERNAL", "a model broke", TritonError, None, "a model broke"),
        # gRPC's words for a connection that broke mid-call (a server killed while it streamed): another
        # endpoint may answer
        ("StatusCode.INTERNAL", "Internal error from Core", Retryable, None, "lost"),
    ],
)  # fmt: skip
def test_triton_errors_become_the_gateways(status, message, expected, field, text) -> None:
    async def mapped() -> Exception:
        backend = GrpcTritonBackend(GatewaySettings(triton_url="localhost:1"))  # its channels need a loop
        try:
            return backend._map(InferenceServerException(msg=message, status=status), "txt2img")
        finally:
            await backend.close()

    error = asyncio.run(mapped())
    assert type(error) is expected and error.field == field
    assert text in error.message
