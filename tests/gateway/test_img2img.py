"""Image-to-image at the gateway, in-process over the fake Triton: what reaches Triton (the init image's
pixels at the planned size, the strength), the defaults, the cache key and the provenance."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from sd_triton.contract import DEFAULT_STRENGTH
from tests.gateway.inprocess import gateway_client

GEN = "/v1/generate"


def encoded(pixels: np.ndarray, file_format: str = "PNG", data_uri: bool = False) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=file_format)
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/{file_format.lower()};base64,{text}" if data_uri else text


def pixels(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def test_the_image_reaches_triton_at_its_own_size_with_the_default_strength() -> None:
    image = pixels(48, 40)
    with gateway_client() as http:
        response = http.post(GEN, json={"prompt": "a barn", "image": encoded(image), "steps": 10, "seed": 3})
        assert response.status_code == 200, response.text
        call = http.app.state.backend.calls[-1]
    np.testing.assert_array_equal(call["image"], image)  # PNG is lossless, no resize at its own size
    assert (call["width"], call["height"], call["strength"]) == (48, 40, DEFAULT_STRENGTH)
    body = response.json()
    assert body["provenance"]["mode"] == "image-to-image"
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (48, 40)


def test_another_size_resizes_like_diffusers_and_sides_round_down_to_eight() -> None:
    image = pixels(50, 43, seed=1, channels=4)  # RGBA: alpha dropped
    with gateway_client() as http:
        for body, size in (({"width": 64, "height": 32}, (64, 32)), ({}, (48, 40))):
            request = {"prompt": "x", "image": encoded(image, "WEBP", data_uri=True), "strength": 0.5, **body}
            assert http.post(GEN, json=request).status_code == 200
            call = http.app.state.backend.calls[-1]
            sent = Image.open(io.BytesIO(base64.b64decode(request["image"].split(",", 1)[1]))).convert("RGB")
            expected = np.asarray(sent.resize(size, resample=Image.Resampling.LANCZOS))
            np.testing.assert_array_equal(call["image"], expected)
            assert (call["width"], call["height"], call["strength"]) == (*size, 0.5)


def test_text_to_image_sends_no_image_and_says_so() -> None:
    with gateway_client() as http:
        body = http.post(GEN, json={"prompt": "x", "steps": 4}).json()
        call = http.app.state.backend.calls[-1]
    assert "image" not in call and call["strength"] is None
    assert body["provenance"]["mode"] == "text-to-image"


def test_the_cache_key_holds_the_pixels_and_the_strength() -> None:
    request = {"prompt": "x", "steps": 4, "seed": 9, "width": 32, "height": 32}
    first, other = encoded(pixels(32, 32, seed=5)), encoded(pixels(32, 32, seed=6))
    with gateway_client() as http:
        calls = http.app.state.backend.calls
        for body in (
            {},  # text-to-image
            {"image": first},
            {"image": first},  # the same: a hit
            {"image": encoded(pixels(32, 32, seed=5), data_uri=True)},  # same pixels, another encoding: a hit
            {"image": other},
            {"image": first, "strength": 0.5},
        ):
            http.post(GEN, json={**request, **body}).raise_for_status()
        assert len(calls) == 4, [("image" in c, c["strength"]) for c in calls]


def test_inpainting_sends_the_grey_mask_at_the_planned_size() -> None:
    image, mask = pixels(48, 40, seed=2), pixels(48, 40, seed=3, channels=4)  # an RGBA mask: grey, no alpha
    with gateway_client() as http:
        body = {"prompt": "x", "image": encoded(image), "mask": encoded(mask), "width": 64, "height": 48}
        response = http.post(GEN, json=body)
        assert response.status_code == 200, response.text
        call = http.app.state.backend.calls[-1]
        calls = http.app.state.backend.calls
        for extra in ({}, {"mask": encoded(255 - mask)}):  # the mask is in the cache key
            http.post(GEN, json={**body, "seed": 5, **extra}).raise_for_status()
        assert len(calls) == 3
    grey = Image.fromarray(mask).convert("L").resize((64, 48), resample=Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(call["mask"], np.asarray(grey))
    assert call["image"].shape == (48, 64, 3) and call["strength"] == DEFAULT_STRENGTH
    assert response.json()["provenance"]["mode"] == "inpainting"
