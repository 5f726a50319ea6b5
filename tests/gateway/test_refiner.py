"""SDXL base + refiner in the gateway (`refiner`, `denoising_end`), over the in-process backend: the base is
called with the hand-off and asked for its latents, the refiner gets them with the same prompt, seed and
steps; a job streams both halves as one count; bad combinations are 422s naming the field."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from tests.gateway.inprocess import FakeTriton, fake_served_model, gateway_client

BASE = dataclasses.replace(
    fake_served_model(), model="xl", pipeline="xl", architecture="sdxl", fingerprint="xl-fingerprint"
)
REFINER = dataclasses.replace(
    fake_served_model(), model="refiner", pipeline="refiner", architecture="sdxl-refiner", fingerprint="r-fp"
)
BODY = {"prompt": "a fox", "model": "xl", "refiner": "refiner", "steps": 10, "seed": 7, "scheduler": "euler"}


def _backend() -> FakeTriton:
    return FakeTriton(more=[BASE, REFINER])


def test_the_base_hands_off_its_latents_to_the_refiner() -> None:
    backend = _backend()
    with gateway_client(backend) as client:
        response = client.post(
            "/v1/generate", json={**BODY, "num_images": 2, "aesthetic_score": 7.0, "negative_prompt": "blur"}
        )
        assert response.status_code == 200, response.text
        base, refiner = backend.calls
        assert base["pipeline"] == "xl" and base["denoising_end"] == 0.8  # diffusers' documented default
        assert "aesthetic_score" not in base and "start_latents" not in base
        assert refiner["pipeline"] == "refiner" and refiner["denoising_start"] == 0.8
        assert refiner["start_latents"].shape == (2, 4, 8, 8)  # the base's latents, passed on
        for key in (
            "prompt",
            "negative_prompt",
            "seed",
            "steps",
            "scheduler",
            "guidance_scale",
            "num_images",
        ):
            assert base[key] == refiner[key], key
        assert refiner["aesthetic_score"] == 7.0 and refiner["size_conditioning"] == [64, 64, 0, 0, 64, 64]
        body = response.json()
        assert body["provenance"]["model"] == "xl" and body["provenance"]["refiner"] == "refiner"
        assert body["provenance"]["denoising_end"] == 0.8
        assert len(body["provenance"]["unet_engines"]) == 2  # the base's UNet, then the refiner's
        assert len(body["images"]) == 2 and [i["seed"] for i in body["images"]] == [7, 8]
        # a different hand-off point is a different result (not a cache hit of the first)
        other = client.post("/v1/generate", json={**BODY, "num_images": 2, "denoising_end": 0.6})
        assert other.json()["cache"] != "hit" and backend.calls[-2]["denoising_end"] == 0.6
        # a drawn seed is the same for both halves
        client.post("/v1/generate", json={**BODY, "seed": None})
        assert backend.calls[-1]["seed"] == backend.calls[-2]["seed"]


def test_a_job_streams_both_halves_as_one_count() -> None:
    backend = _backend()
    with gateway_client(backend) as client:
        job = client.post("/v1/jobs", json={**BODY, "denoising_end": 0.7}).json()
        deadline = time.monotonic() + 10
        while (state := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        assert state["status"] == "completed", state
        assert state["progress"]["step"] == state["progress"]["steps"] == 10  # 7 base steps + 3 refiner steps
        events = client.get(f"/v1/jobs/{job['id']}/events").text
        steps = [line for line in events.splitlines() if line.startswith("data:") and '"step"' in line]
        assert '"step":1,"steps":10' in steps[0].replace(" ", "") and len(steps) >= 10, steps[:3]
        assert state["result"]["provenance"]["refiner"] == "refiner"


def test_bad_hand_offs_name_the_field() -> None:
    backend = _backend()
    with gateway_client(backend) as client:
        for body, field, words in (
            ({**BODY, "refiner": "nope"}, "refiner", "not served"),
            ({**BODY, "refiner": "xl"}, "refiner", "not an SDXL refiner"),
            ({**BODY, "model": "fake"}, "refiner", "from an SDXL base"),
            ({**BODY, "model": "refiner"}, "refiner", "from an SDXL base"),
            ({**BODY, "refiner": None, "denoising_end": 0.5}, "denoising_end", "applies with a refiner"),
            ({**BODY, "denoising_end": 1.0}, "denoising_end", "less than 1"),
            ({**BODY, "denoising_end": 0}, "denoising_end", "greater than 0"),
            ({**BODY, "image": _png()}, "refiner", "starts from text"),
            ({**BODY, "refiner": "x" * 201}, "refiner", "at most 200"),
        ):
            response = client.post("/v1/generate", json=body)
            assert response.status_code == 422, (body, response.text)
            error = response.json()["error"]
            assert error["field"] == field and words in error["message"], (body, error)
            assert client.post("/v1/jobs", json=body).status_code == 422
        assert backend.calls == []
        assert client.get("/readyz").status_code == 200


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
