"""SDXL's size conditioning at the gateway, in-process over the fake Triton: diffusers' field names, its
defaults, what reaches Triton (SIZE_CONDITIONING, NEGATIVE_SIZE_CONDITIONING), the refusals (an SD model,
half a negative pair, a zero size) and the cache key."""

from __future__ import annotations

import dataclasses

import pytest

from sd_triton.gateway.cache import cache_key
from sd_triton.gateway.schemas import GenerateRequest
from sd_triton.gateway.service import Job, size_conditioning
from sd_triton.requests import GenerationParams
from tests.gateway.inprocess import FakeTriton, fake_served_model, gateway_client

GEN = "/v1/generate"
XL = dataclasses.replace(fake_served_model(), architecture="sdxl", model="fake-xl")


def test_sdxl_defaults_are_diffusers_and_overrides_reach_triton() -> None:
    with gateway_client(FakeTriton(served=XL)) as http:
        assert http.get("/v1/models").json()["data"][0]["architecture"] == "sdxl"
        assert http.post(GEN, json={"prompt": "a barn", "width": 64, "height": 48}).status_code == 200
        plain = http.app.state.backend.calls[-1]
        body = {
            "prompt": "a barn", "original_size": [1024, 768], "crops_coords_top_left": [16, 0],
            "negative_original_size": [512, 512], "negative_target_size": [256, 256],
        }  # fmt: skip
        response = http.post(GEN, json=body)
        assert response.status_code == 200, response.text
        sized = http.app.state.backend.calls[-1]
        # the batch route and jobs plan the same way
        assert (
            http.post("/v1/generate/batch", json={"prompts": ["a", "b"], "target_size": [32, 32]}).status_code
            == 200
        )
        batch = http.app.state.backend.calls[-2:]
    assert plain["size_conditioning"] == [48, 64, 0, 0, 48, 64] and "negative_size_conditioning" not in plain
    assert sized["size_conditioning"] == [1024, 768, 16, 0, 64, 64]
    assert sized["negative_size_conditioning"] == [512, 512, 0, 0, 256, 256]
    assert [c["size_conditioning"] for c in batch] == [[64, 64, 0, 0, 32, 32]] * 2


@pytest.mark.parametrize("field", ["original_size", "crops_coords_top_left", "negative_target_size"])
def test_an_sd_model_refuses_them_naming_the_field(field: str) -> None:
    with gateway_client() as http:
        response = http.post(GEN, json={"prompt": "x", field: [64, 64]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and "SDXL models only" in error["message"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"negative_original_size": [64, 64]}, "negative_target_size", "required with"),
        ({"negative_crops_coords_top_left": [0, 8]}, "negative_original_size", "required with"),
        ({"target_size": [0, 64]}, "target_size", ">= 1"),
        ({"original_size": [64, 70000]}, "original_size", "65536"),
        ({"original_size": [64]}, "original_size", ""),
    ],
)
def test_bad_size_conditioning_names_the_field(body: dict, field: str, words: str) -> None:
    with gateway_client(FakeTriton(served=XL)) as http:
        response = http.post(GEN, json={"prompt": "x", **body})
        assert not http.app.state.backend.calls
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert field in (error.get("field") or error["message"]) and words in error["message"], error


def test_the_cache_key_holds_the_conditioning_and_tells_no_negative_from_empty() -> None:
    params = GenerationParams(height=64, width=64, seed=1)

    def key(**fields: object) -> str | None:
        request = GenerateRequest(prompt="x", seed=1, **fields)  # type: ignore[arg-type]
        job = Job("x", params, size_conditioning(request, XL, 64, 64))
        return cache_key("f", ["x"], request, [job])

    keys = [key(), key(negative_prompt=""), key(original_size=(128, 128)), key(target_size=(64, 64))]
    assert len(set(keys[:3])) == 3
    assert keys[3] == keys[0]  # the default spelled out is the same request
    sd = GenerateRequest(prompt="x", seed=1)
    sd_keys = {
        cache_key("f", ["x"], r, [Job("x", params)])
        for r in (sd, GenerateRequest(prompt="x", seed=1, negative_prompt=""))
    }
    assert len(sd_keys) == 1  # SD: no negative prompt and "" are the same images


def test_a_refiner_takes_the_aesthetic_scores_and_the_others_refuse_them() -> None:
    refiner = dataclasses.replace(XL, architecture="sdxl-refiner", model="fake-refiner")
    with gateway_client(FakeTriton(served=refiner)) as http:
        body = {
            "prompt": "x",
            "aesthetic_score": 7.0,
            "negative_aesthetic_score": 1.5,
            "original_size": [96, 96],
        }
        assert http.post(GEN, json=body).status_code == 200
        call = http.app.state.backend.calls[-1]
        assert http.post(GEN, json={"prompt": "x"}).status_code == 200
        plain = http.app.state.backend.calls[-1]
    assert (call["aesthetic_score"], call["negative_aesthetic_score"]) == (7.0, 1.5)
    assert call["size_conditioning"] == [96, 96, 0, 0, 64, 64]
    assert "aesthetic_score" not in plain  # the model's defaults (diffusers': 6.0 and 2.5)
    for served in (XL, fake_served_model()):
        with gateway_client(FakeTriton(served=served)) as http:
            response = http.post(GEN, json={"prompt": "x", "negative_aesthetic_score": 2.0})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "negative_aesthetic_score" and "refiner models only" in error["message"]
