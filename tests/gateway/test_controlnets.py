"""`controlnets` in the gateway over the in-process backend: each control image decoded, checked to be the
output's size and preprocessed (none: the image; canny: OpenCV's edges) into the map the model gets with
the ControlNets' settings; in the provenance and the cache key; /v1/models lists each model's ControlNets;
bad ControlNet fields are 422s naming them, at submission (jobs too)."""

from __future__ import annotations

import base64
import dataclasses
import io

import cv2
import numpy as np
from PIL import Image

from tests.gateway.inprocess import FakeTriton, fake_served_model, gateway_client

EDGES = {"name": "edges", "sha256": "12" * 32, "conditioning_channels": 3}
DEPTH = {"name": "depth", "sha256": "34" * 32, "conditioning_channels": 3}


def _backend() -> FakeTriton:
    return FakeTriton(served=dataclasses.replace(fake_served_model(), controlnets=[DEPTH, EDGES]))


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _picture(height: int = 64, width: int = 64) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[16:48, 20:44] = (200, 80, 40)
    return pixels


def test_control_maps_reach_the_model_with_their_settings() -> None:
    backend = _backend()
    picture = _picture()
    controls = [
        {"name": "edges", "image": _png(picture), "preprocess": "canny", "low_threshold": 50, "scale": 0.7},
        {"name": "depth", "image": _png(picture), "start": 0.2, "end": 0.9},
    ]
    with gateway_client(backend) as client:
        body = {"prompt": "a fox", "steps": 2, "seed": 1, "controlnets": controls}
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        call = backend.calls[-1]
        assert call["controlnets"] == [
            {"name": "edges", "scale": 0.7, "start": 0.0, "end": 1.0},
            {"name": "depth", "scale": 1.0, "start": 0.2, "end": 0.9},
        ]
        maps = call["control_images"]
        assert maps.shape == (2, 64, 64, 3) and maps.dtype == np.uint8
        edges = cv2.Canny(picture, 50, 200)
        assert np.array_equal(maps[0], np.repeat(edges[:, :, None], 3, axis=2)) and edges.max() == 255
        assert np.array_equal(maps[1], picture)  # none: the image is the map
        provenance = response.json()["provenance"]["controlnets"]
        assert [(p["name"], p["sha256"], p["preprocess"]) for p in provenance] == [
            ("edges", "12" * 32, "canny"),
            ("depth", "34" * 32, "none"),
        ]
        assert client.post("/v1/generate", json=body).json()["cache"] == "hit"
        other = {**body, "controlnets": [controls[0], {**controls[1], "image": _png(picture // 2)}]}
        assert client.post("/v1/generate", json=other).json()["cache"] != "hit"  # another map's pixels
        models = client.get("/v1/models").json()["data"]
        assert [c["name"] for c in models[0]["controlnets"]] == ["depth", "edges"]
        assert client.post("/v1/jobs", json={**body, "seed": 2}).status_code == 202


def test_bad_controlnets_are_422s_naming_the_field() -> None:
    backend = _backend()
    good = {"name": "edges", "image": _png(_picture())}
    with gateway_client(backend) as client:
        for controls, field, words in (
            (
                [{**good, "name": "pose"}],
                "controlnets",
                "no ControlNet 'pose' in fake (ControlNets: depth, edges",
            ),
            ([{**good, "image": "bm90IGFuIGltYWdl"}], "controlnets[0].image", "not an image"),
            ([{**good, "image": _png(_picture(64, 96))}], "controlnets[0].image", "96x64, the output 64x64"),
            ([{**good, "start": 0.5, "end": 0.5}], "controlnets", "start (0.5) must be below end (0.5)"),
            ([good] * 4, "controlnets", "at most 3"),
            ([{**good, "scale": 2.5}], "controlnets", "less than or equal to 2"),
            ([good, good], "controlnets", "named twice"),
            ([{**good, "preprocess": "depth"}], "controlnets", "'none' or 'canny'"),
        ):
            for path in ("/v1/generate", "/v1/jobs"):
                response = client.post(path, json={"prompt": "a fox", "controlnets": controls})
                assert response.status_code == 422, (controls, response.text)
                error = response.json()["error"]
                assert error["field"].startswith(field) and words.lower() in error["message"].lower(), error
        assert backend.calls == []
        with_lora = {"prompt": "a fox", "controlnets": [good], "loras": [{"name": "x"}]}
        assert client.post("/v1/generate", json=with_lora).status_code == 422
