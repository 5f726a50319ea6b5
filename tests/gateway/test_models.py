"""Several served pipelines behind one gateway (gateway/routing.py): `model` routes a request (JSON routes,
jobs, OpenAI's routes), GET /v1/models lists each with its facts and the default first, an unknown model
is a 4xx naming the field and the served ids, and the default is configurable."""

from __future__ import annotations

import dataclasses
import time

import pytest

from sd_triton import contract as c
from sd_triton.contract import Limits
from tests.gateway.inprocess import FakeTriton, fake_served_model, gateway_client

XL = dataclasses.replace(
    fake_served_model(),
    model="xl",
    pipeline="xl",
    architecture="sdxl",
    native_height=128,
    native_width=96,
    limits=Limits(max_steps=40, max_side=256, max_num_images=2),
    default_scheduler="EulerDiscreteScheduler",
    fingerprint="xl-fingerprint",
)


def _two() -> FakeTriton:
    return FakeTriton(more=[XL])


def test_the_served_pipelines_are_found_by_their_txt2img() -> None:
    names = ["unet", "txt2img", "xl_txt2img", "xl_unet", "b-2_txt2img", "Bad_txt2img", "denoise"]
    assert c.pipelines(names) == ["", "b-2", "xl"]
    assert c.pipelines(["xl_txt2img", "xl_denoise"]) == ["xl"]
    assert c.pipelines(["unet"]) == []


def test_models_lists_each_pipeline_with_its_facts_the_default_first() -> None:
    with gateway_client(_two()) as client:
        cards = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["default"]) for m in cards] == [("fake", True), ("xl", False)]
    fake, xl = cards
    assert (xl["native_width"], xl["native_height"], xl["architecture"]) == (96, 128, "sdxl")
    assert (
        xl["limits"]["max_steps"] == 40
        and xl["limits"]["max_images"] == 2
        and xl["limits"]["max_side"] == 256
    )
    assert fake["limits"]["max_steps"] == Limits().max_steps
    assert xl["default_scheduler_class"] == "EulerDiscreteScheduler" and "ddim" in xl["schedulers"]


def test_the_default_model_is_configurable() -> None:
    with gateway_client(_two(), default_model="xl") as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["xl", "fake"]
        assert client.get("/v1/info").json()["model"] == "xl"
        response = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2})
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["width"] == 96  # xl's native size
        assert client.app.state.backend.calls[-1]["pipeline"] == "xl"
    with gateway_client(_two(), default_model="gone") as client:
        response = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2})
        assert response.status_code == 503
        assert "default_model 'gone'" in response.text and "fake, xl" in response.text
        # a request naming a served model still gets it
        named = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2, "model": "fake"})
        assert named.status_code == 200, named.text


def test_model_routes_a_request_and_its_limits_are_that_models() -> None:
    backend = _two()
    with gateway_client(backend) as client:
        plain = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2, "seed": 1})
        xl = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2, "seed": 1, "model": "xl"})
        assert plain.status_code == 200 and xl.status_code == 200, (plain.text, xl.text)
        assert [call["pipeline"] for call in backend.calls] == ["", "xl"]
        assert plain.json()["provenance"]["model"] == "fake" and xl.json()["provenance"]["model"] == "xl"
        assert (xl.json()["images"][0]["width"], xl.json()["images"][0]["height"]) == (96, 128)
        # xl's own limit: 40 steps (the plain model takes 150)
        over = client.post("/v1/generate", json={"prompt": "a fox", "steps": 41, "model": "xl"})
        assert over.status_code == 422 and over.json()["error"]["field"] == "steps", over.text
        assert "40" in over.json()["error"]["message"]
        assert client.post("/v1/generate", json={"prompt": "a fox", "steps": 41}).status_code == 200
        # the same seeded request on two models: two cache entries, not one
        again = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2, "seed": 1, "model": "xl"})
        assert again.json()["cache"] == "hit" and again.json()["provenance"]["model"] == "xl"
        batch = client.post("/v1/generate/batch", json={"prompts": ["a", "b"], "steps": 2, "model": "xl"})
        assert batch.status_code == 200 and [c["pipeline"] for c in backend.calls[-2:]] == ["xl", "xl"]
        info = client.get("/v1/info", params={"model": "xl"}).json()
        assert (info["model"], info["native_width"], info["limits"]["max_steps"]) == ("xl", 96, 40)


def test_an_unknown_model_names_the_field_and_the_served_ids() -> None:
    backend = _two()
    with gateway_client(backend) as client:
        for path, body in (
            ("/v1/generate", {"prompt": "a fox", "model": "sd-9"}),
            ("/v1/generate/batch", {"prompts": ["a fox"], "model": "sd-9"}),
            ("/v1/jobs", {"prompt": "a fox", "model": "sd-9"}),
        ):
            response = client.post(path, json=body)
            assert response.status_code == 422, (path, response.text)
            error = response.json()["error"]
            assert error["field"] == "model" and "'sd-9'" in error["message"], error
            assert "fake, xl" in error["message"], error
        info = client.get("/v1/info", params={"model": "sd-9"})
        assert info.status_code == 422 and info.json()["error"]["field"] == "model"
        openai = client.post("/v1/images/generations", json={"prompt": "a fox", "model": "sd-9"})
        assert openai.status_code == 400 and openai.json()["error"]["param"] == "model", openai.text
        assert "fake, xl" in openai.json()["error"]["message"]
        assert client.post("/v1/generate", json={"prompt": "a fox", "model": "x" * 201}).status_code == 422
        assert backend.calls == []  # nothing reached Triton
        assert client.get("/readyz").status_code == 200


def test_openai_model_names_go_to_the_default_and_aliases_route() -> None:
    backend = _two()
    with gateway_client(backend, model_aliases={"dall-e-3": "xl", "fast": "fake"}) as client:
        for model, pipeline in (("dall-e-3", "xl"), ("xl", "xl"), ("fast", ""), (None, "")):
            body = {"prompt": "a fox", **({} if model is None else {"model": model})}
            response = client.post("/v1/images/generations", json=body)
            assert response.status_code == 200, response.text
            assert backend.calls[-1]["pipeline"] == pipeline, model
        # OpenAI's own names are not aliased here any more: dall-e-2 is unknown
        assert (
            client.post("/v1/images/generations", json={"prompt": "a", "model": "dall-e-2"}).status_code
            == 400
        )
    with gateway_client(_two()) as client:  # by default every OpenAI name goes to the default model
        for model in ("dall-e-2", "dall-e-3", "gpt-image-1"):
            response = client.post("/v1/images/generations", json={"prompt": "a fox", "model": model})
            assert response.status_code == 200, response.text
            assert client.app.state.backend.calls[-1]["pipeline"] == ""


def test_a_job_runs_on_its_model() -> None:
    backend = _two()
    with gateway_client(backend) as client:
        job = client.post("/v1/jobs", json={"prompt": "a fox", "steps": 3, "model": "xl"})
        assert job.status_code in (200, 202), job.text
        url = f"/v1/jobs/{job.json()['id']}"
        deadline = time.monotonic() + 10
        while (state := client.get(url).json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        assert state["status"] == "completed", state
        assert backend.calls[-1]["pipeline"] == "xl" and state["result"]["provenance"]["model"] == "xl"


@pytest.mark.parametrize("form_model, pipeline", [("xl", "xl"), (None, "")])
def test_openai_edits_route_by_model(form_model: str | None, pipeline: str) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    backend = _two()
    with gateway_client(backend) as client:
        data = {"prompt": "a fox", **({} if form_model is None else {"model": form_model})}
        response = client.post(
            "/v1/images/edits", data=data, files={"image": ("in.png", buffer.getvalue(), "image/png")}
        )
        assert response.status_code == 200, response.text
        assert backend.calls[-1]["pipeline"] == pipeline
        bad = client.post(
            "/v1/images/edits",
            data={"prompt": "a fox", "model": "nope"},
            files={"image": ("in.png", buffer.getvalue(), "image/png")},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model", bad.text
