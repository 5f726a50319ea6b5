"""`loras` in the gateway over the in-process backend: checked against the model's library at submission
(every route and jobs), passed to the model's txt2img, in the provenance and the cache key with the
adapters' hashes; GET /v1/loras lists them."""

from __future__ import annotations

import dataclasses

from tests.gateway.inprocess import FakeTriton, fake_served_model, gateway_client

STYLE = {"name": "style", "sha256": "ab" * 32, "rank": 4, "components": {"unet": 8}, "format": "diffusers"}
SKETCH = {"name": "sketch", "sha256": "cd" * 32, "rank": 2, "components": {"unet": 4}, "format": "kohya"}


def _backend() -> FakeTriton:
    return FakeTriton(served=dataclasses.replace(fake_served_model(), loras=[SKETCH, STYLE]))


def test_adapters_reach_the_model_with_their_hashes() -> None:
    backend = _backend()
    with gateway_client(backend) as client:
        body = {"prompt": "a fox", "steps": 2, "seed": 1, "loras": [{"name": "style", "scale": 0.5}]}
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        assert backend.calls[-1]["loras"] == [{"name": "style", "scale": 0.5}]
        assert response.json()["provenance"]["loras"] == [
            {"name": "style", "scale": 0.5, "sha256": "ab" * 32}
        ]
        assert client.post("/v1/generate", json=body).json()["cache"] == "hit"
        # the same request once the library holds another file under that name: not the cached images
        backend.served = dataclasses.replace(backend.served, loras=[{**STYLE, "sha256": "ef" * 32}])
        assert client.post("/v1/generate", json=body).json()["cache"] != "hit"
        plain = client.post("/v1/generate", json={"prompt": "a fox", "steps": 2, "seed": 1})
        assert "loras" not in backend.calls[-1] and plain.json()["provenance"]["loras"] == []
        listing = client.get("/v1/loras").json()["data"]
        assert [(c["model"], c["name"], c["rank"]) for c in listing] == [("fake", "style", 4)]


def test_unknown_adapters_and_bad_lists_are_422s_at_submission() -> None:
    backend = _backend()
    with gateway_client(backend) as client:
        for loras, words in (
            ([{"name": "nope"}], "no adapter 'nope' in fake's library (adapters: sketch, style"),
            ([{"name": "style"}] * 5, "at most 4"),
            ([{"name": "style", "scale": -4.5}], "greater than or equal to -4"),
            ([{"name": ""}], "at least 1 character"),
            ([{"name": "style", "weight": 1}], "unknown field"),
        ):
            for path in ("/v1/generate", "/v1/jobs"):
                response = client.post(path, json={"prompt": "a fox", "loras": loras})
                assert response.status_code == 422, (loras, response.text)
                error = response.json()["error"]
                assert error["field"].startswith("loras") and words.lower() in error["message"].lower(), error
        assert backend.calls == []
        assert client.get("/v1/loras", params={"model": "nope"}).status_code == 422
