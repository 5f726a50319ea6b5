"""Malformed requests: each gets a 4xx naming the field, never a 5xx, and the gateway keeps serving.
Validation is the gateway's own: it runs in-process over a fake Triton with the tiny export's limits."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.gateway.inprocess import gateway_client

OK = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64}
GEN, BATCH, OPENAI = "/v1/generate", "/v1/generate/batch", "/v1/images/generations"
MAX_BODY, MAX_IMAGE_PIXELS = 65536, 64 * 64  # this module's gateway settings


def picture(size: tuple[int, int], file_format: str = "PNG") -> bytes:
    pixels = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=file_format)
    return buffer.getvalue()


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


IMAGE = b64(picture((48, 40)))

# (id, route, body (dict -> JSON; str/bytes sent raw), headers, expected status, words in the message)
CASES: list[tuple[str, str, object, dict[str, str] | None, int, list[str]]] = [
    ("no-prompt", GEN, {"steps": 3}, None, 422, ["prompt", "required"]),
    ("empty-prompt", GEN, {**OK, "prompt": ""}, None, 422, ["prompt", "at least 1"]),
    ("prompt-not-string", GEN, {**OK, "prompt": 5}, None, 422, ["prompt", "string"]),
    ("prompt-huge", GEN, {**OK, "prompt": "word " * 1000}, None, 422, ["prompt", "2000"]),
    ("negative-huge", GEN, {**OK, "negative_prompt": "x" * 2001}, None, 422, ["negative_prompt", "2000"]),
    ("negative-not-string", GEN, {**OK, "negative_prompt": ["a"]}, None, 422, ["negative_prompt"]),
    ("width-string", GEN, {**OK, "width": "wide"}, None, 422, ["width", "integer"]),
    ("width-float", GEN, {**OK, "width": 64.5}, None, 422, ["width", "integer"]),
    ("width-zero", GEN, {**OK, "width": 0}, None, 422, ["width", "greater than or equal to 1"]),
    ("width-not-multiple", GEN, {**OK, "width": 70}, None, 422, ["width", "multiple of 8", "70"]),
    ("height-over-limit", GEN, {**OK, "height": 1032}, None, 422, ["height", "1024", "1032"]),
    ("pixels-over-limit", GEN, {**OK, "width": 1024, "height": 1024 + 8}, None, 422, ["height", "1024"]),
    ("steps-zero", GEN, {**OK, "steps": 0}, None, 422, ["steps", "greater than or equal to 1"]),
    ("steps-over", GEN, {**OK, "steps": 151}, None, 422, ["steps", "150", "151"]),
    ("steps-negative", GEN, {**OK, "steps": -4}, None, 422, ["steps"]),
    ("steps-bool-string", GEN, {**OK, "steps": "many"}, None, 422, ["steps", "integer"]),
    ("guidance-negative", GEN, {**OK, "guidance_scale": -1}, None, 422, ["guidance_scale", "0"]),
    ("guidance-string", GEN, {**OK, "guidance_scale": "high"}, None, 422, ["guidance_scale", "number"]),
    ("guidance-nan", GEN, '{"prompt": "a", "guidance_scale": NaN}', None, 422, ["guidance_scale", "finite"]),
    (
        "guidance-inf",
        GEN,
        '{"prompt": "a", "guidance_scale": Infinity}',
        None,
        422,
        ["guidance_scale", "finite"],
    ),
    ("guidance-neg-inf", GEN, '{"prompt": "a", "guidance_scale": -Infinity}', None, 422, ["guidance_scale"]),
    ("seed-negative", GEN, {**OK, "seed": -1}, None, 422, ["seed", "greater than or equal to 0"]),
    ("seed-huge", GEN, {**OK, "seed": 2**64}, None, 422, ["seed"]),
    (
        "seed-last-image-overflows",
        GEN,
        {**OK, "seed": 2**63 - 1, "num_images": 2},
        None,
        422,
        ["seed", "between 0 and"],
    ),
    ("scheduler-unknown", GEN, {**OK, "scheduler": "k_euler"}, None, 422, ["scheduler", "euler_a"]),
    (
        "num-images-zero",
        GEN,
        {**OK, "num_images": 0},
        None,
        422,
        ["num_images", "greater than or equal to 1"],
    ),
    ("num-images-over", GEN, {**OK, "num_images": 5}, None, 422, ["num_images", "between 1 and 4"]),
    ("output-format-gif", GEN, {**OK, "output_format": "gif"}, None, 422, ["output_format", "png"]),
    ("unknown-field", GEN, {**OK, "sampler": "x"}, None, 422, ["sampler", "unknown field"]),
    ("body-array", GEN, [OK], None, 422, ["body"]),
    ("body-null", GEN, "null", None, 422, ["body"]),
    ("invalid-json", GEN, '{"prompt": "a",', None, 422, ["body", "invalid JSON"]),
    ("not-utf8-json", GEN, b'{"prompt": "\xff"}', None, 400, ["body"]),
    (
        "wrong-content-type",
        GEN,
        "prompt=a",
        {"content-type": "text/plain"},
        415,
        ["content-type", "application/json"],
    ),
    (
        "form-content-type",
        GEN,
        "prompt=a",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        ["content-type"],
    ),
    ("huge-body", GEN, {**OK, "negative_prompt": "x" * 70_000}, None, 413, ["body", "65536"]),
    # image-to-image: the init image and the strength
    ("image-not-base64", GEN, {**OK, "image": "not base64!"}, None, 422, ["image", "base64"]),
    ("image-not-an-image", GEN, {**OK, "image": b64(b"hello there")}, None, 422, ["image", "not an image"]),
    ("image-gif", GEN, {**OK, "image": b64(picture((8, 8), "GIF"))}, None, 422, ["image", "GIF", "PNG"]),
    ("image-damaged", GEN, {**OK, "image": b64(picture((48, 40))[:300])}, None, 422, ["image", "damaged"]),
    (
        "image-over-pixels",
        GEN,
        {**OK, "image": b64(picture((80, 60)))},
        None,
        422,
        ["image", "4096", "80x60"],
    ),
    ("image-data-uri-raw", GEN, {**OK, "image": "data:image/png,abc"}, None, 422, ["image", "data URI"]),
    ("image-not-string", GEN, {**OK, "image": 7}, None, 422, ["image", "string"]),
    ("image-too-small", GEN, {"prompt": "a", "image": b64(picture((4, 4)))}, None, 422, ["image", "4x4"]),
    ("strength-zero", GEN, {**OK, "image": IMAGE, "strength": 0}, None, 422, ["strength", "greater than 0"]),
    (
        "strength-over",
        GEN,
        {**OK, "image": IMAGE, "strength": 1.5},
        None,
        422,
        ["strength", "less than or equal"],
    ),
    ("strength-word", GEN, {**OK, "image": IMAGE, "strength": "high"}, None, 422, ["strength", "number"]),
    ("strength-nan", GEN, '{"prompt": "a", "strength": NaN}', None, 422, ["strength", "finite"]),
    ("strength-no-image", GEN, {**OK, "strength": 0.5}, None, 422, ["strength", "init image"]),
    (
        "strength-no-step",
        GEN,
        {**OK, "image": IMAGE, "strength": 0.2},
        None,
        422,
        ["strength", "runs no step"],
    ),
    ("mask-no-image", GEN, {**OK, "mask": IMAGE}, None, 422, ["mask", "init image"]),
    (
        "mask-other-size",
        GEN,
        {**OK, "image": IMAGE, "mask": b64(picture((40, 48)))},
        None,
        422,
        ["mask", "40x48", "48x40"],
    ),
    (
        "mask-not-an-image",
        GEN,
        {**OK, "image": IMAGE, "mask": b64(b"a mask")},
        None,
        422,
        ["mask", "not an image"],
    ),
    ("batch-strength-no-image", BATCH, {"prompts": ["a"], "strength": 0.5}, None, 422, ["strength", "image"]),
    ("batch-empty", BATCH, {"prompts": [], "steps": 3}, None, 422, ["prompts", "at least 1"]),
    ("batch-too-many", BATCH, {"prompts": ["a"] * 17, "steps": 3}, None, 422, ["prompts", "16"]),
    ("batch-not-list", BATCH, {"prompts": "a cat"}, None, 422, ["prompts", "list"]),
    ("batch-prompt-huge", BATCH, {"prompts": ["a", "b" * 2001]}, None, 422, ["prompts", "2000"]),
    ("openai-bad-size", OPENAI, {"prompt": "a", "size": "big"}, None, 400, ["size", "512x512"]),
    (
        "openai-size-not-multiple",
        OPENAI,
        {"prompt": "a", "size": "65x64"},
        None,
        400,
        ["size", "multiple of 8"],
    ),
    ("openai-n-zero", OPENAI, {"prompt": "a", "n": 0}, None, 400, ["n", "greater than or equal to 1"]),
    ("openai-n-over", OPENAI, {"prompt": "a", "n": 9, "size": "64x64"}, None, 400, ["n", "between 1 and 4"]),
    ("openai-unknown-field", OPENAI, {"prompt": "a", "foo": 1}, None, 400, ["foo"]),
]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with gateway_client(max_body_bytes=MAX_BODY, max_image_pixels=MAX_IMAGE_PIXELS) as client:
        yield client


def send(http: httpx.Client, route: str, body: object, headers: dict[str, str] | None) -> httpx.Response:
    if isinstance(body, (dict, list)):
        content: bytes = json.dumps(body).encode()
    else:
        content = body if isinstance(body, bytes) else str(body).encode()
    return http.post(route, content=content, headers=headers or {"content-type": "application/json"})


def test_enough_cases() -> None:
    assert len(CASES) >= 30
    assert sum(1 for c in CASES if "image" in c[0] or "strength" in c[0]) >= 15


@pytest.mark.parametrize(
    ("route", "body", "headers", "status", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_request(http: httpx.Client, route, body, headers, status: int, words: list[str]) -> None:
    response = send(http, route, body, headers)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message


def test_still_serving_after_the_table(http: httpx.Client) -> None:
    for _, route, body, headers, _, _ in CASES:
        assert send(http, route, body, headers).status_code < 500
    response = http.post(GEN, json=OK)
    assert response.status_code == 200 and len(response.json()["images"]) == 1


def test_chunked_body_over_the_limit(http: httpx.Client) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    response = http.post(GEN, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "65536" in response.json()["error"]["message"]


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"
    wrong = http.get(GEN)
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    assert wrong.json()["error"]["type"] == "invalid_request"
