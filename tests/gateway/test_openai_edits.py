"""POST /v1/images/edits with the official `openai` client and raw multipart forms, in-process over the
fake Triton: what reaches Triton (the repaint mask from transparency), OpenAI's error shape."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.gateway.inprocess import gateway_client

EDITS = "/v1/images/edits"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rgba(width: int, height: int, transparent: tuple[slice, slice] | None = None) -> np.ndarray:
    image = np.random.default_rng(width).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image[..., 3] = 255
    if transparent is not None:
        image[transparent + (3,)] = 0
    return image


def test_the_official_client_edits_with_a_mask_and_without() -> None:
    openai = pytest.importorskip("openai")
    picture = rgba(48, 40)[..., :3]
    mask = rgba(48, 40, (slice(0, 20), slice(None)))  # the top half transparent: repainted
    with gateway_client() as http:
        client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http)
        with_mask = client.images.edit(
            image=("in.png", png(picture), "image/png"), mask=("m.png", png(mask), "image/png"),
            prompt="a red sky", n=2, size="64x48", response_format="b64_json",
        )  # fmt: skip
        masked_call = http.app.state.backend.calls[-1]
        alone = client.images.edit(image=("in.png", png(picture), "image/png"), prompt="a red sky")
        plain_call = http.app.state.backend.calls[-1]
    assert len(with_mask.data) == 2 and len(alone.data) == 1
    sizes = {Image.open(io.BytesIO(__import__("base64").b64decode(d.b64_json))).size for d in with_mask.data}
    assert sizes == {(64, 48)}
    assert (masked_call["width"], masked_call["height"], masked_call["num_images"]) == (64, 48, 2)
    expected = np.where(np.arange(40) < 20, 255, 0).astype(np.uint8)[:, None].repeat(48, 1)
    grey = Image.fromarray(expected).resize((64, 48), resample=Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(masked_call["mask"], np.asarray(grey))
    # no mask and an opaque image: the whole image redrawn, at its own size
    assert "mask" not in plain_call and plain_call["image"].shape == (40, 48, 3)


def test_without_a_mask_the_images_own_transparency_is_edited() -> None:
    picture = rgba(32, 32, (slice(None), slice(16, None)))  # the right half transparent
    with gateway_client() as http:
        files = {"image": ("in.png", png(picture), "image/png")}
        response = http.post(EDITS, files=files, data={"prompt": "a door", "response_format": "b64_json"})
        assert response.status_code == 200, response.text
        call = http.app.state.backend.calls[-1]
    assert (call["mask"][:, 16:] == 255).all() and (call["mask"][:, :16] == 0).all()
    np.testing.assert_array_equal(call["image"], picture[..., :3])  # alpha dropped


IMAGE = ("a.png", png(rgba(16, 16)), "image/png")
BAD_EDITS = [
    ({}, {"prompt": "x"}, "image", "Field required"),
    ({"image": IMAGE}, {}, "prompt", "Field required"),
    ({"image": ("a.txt", b"not an image", "text/plain")}, {"prompt": "x"}, "image", "not an image"),
    (
        {"image": IMAGE, "mask": ("m.png", png(rgba(8, 8, (0, 0))), "image/png")},
        {"prompt": "x"},
        "mask",
        "8x8",
    ),
    (
        {"image": IMAGE, "mask": ("m.png", png(rgba(16, 16)[..., :3]), "image/png")},
        {"prompt": "x"},
        "mask",
        "transp",
    ),
    ({"image": IMAGE}, {"prompt": "x", "size": "big"}, "size", "512x512"),
    ({"image": IMAGE}, {"prompt": "x", "n": "0"}, "n", "greater than"),
    ({"image": IMAGE}, {"prompt": "x", "strength": "2"}, "strength", "less"),
    (
        {"image": ("a.png", png(rgba(12, 12)), "image/png")},
        {"prompt": "x", "size": "12x12"},
        "size",
        "multiple of 8",
    ),
]


@pytest.mark.parametrize(("files", "data", "param", "words"), BAD_EDITS)
def test_bad_edits_name_the_part_in_openais_shape(files: dict, data: dict, param: str, words: str) -> None:
    with gateway_client() as http:
        response = http.post(EDITS, files=files or {"unrelated": ("u", b"", "text/plain")}, data=data)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        assert words in error["message"], error
        assert http.get("/readyz").status_code == 200


def test_edits_take_a_form_and_other_routes_json() -> None:
    with gateway_client(max_body_bytes=4096) as http:
        as_json = http.post(EDITS, json={"prompt": "x"})
        assert as_json.status_code == 415 and "multipart/form-data" in as_json.text
        big = {"image": ("a.png", png(rgba(64, 64)), "image/png")}
        assert http.post(EDITS, files=big, data={"prompt": "x"}).status_code == 413
