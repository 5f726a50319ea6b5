"""`prompt_syntax` in the gateway over the in-process backend: sent to the model as asked, the gateway's
default_prompt_syntax when absent, part of the cache key; an unknown syntax is a 422 naming the field."""

from __future__ import annotations

import dataclasses
import time

from tests.gateway.inprocess import FakeTriton, fake_served_model, gateway_client


def test_the_syntax_reaches_the_model_and_the_cache_key() -> None:
    backend = FakeTriton()
    with gateway_client(backend) as client:
        body = {"prompt": "a (fox:1.3)", "steps": 2, "seed": 1}
        assert client.post("/v1/generate", json=body).status_code == 200
        assert backend.calls[-1]["prompt_syntax"] == "plain"  # the default
        response = client.post("/v1/generate", json={**body, "prompt_syntax": "a1111"})
        assert response.status_code == 200 and response.json()["cache"] != "hit"  # read otherwise: new key
        assert backend.calls[-1]["prompt_syntax"] == "a1111"
        assert client.post("/v1/generate", json={**body, "prompt_syntax": "plain"}).json()["cache"] == "hit"
        bad = client.post("/v1/generate", json={**body, "prompt_syntax": "comfy"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "prompt_syntax", bad.text
        calls = len(backend.calls)
        for field in ("prompt", "negative_prompt"):  # a weight that is no number, at submission (jobs too)
            for path in ("/v1/generate", "/v1/jobs"):
                sent = {**body, field: "a (fox:1.2.3)", "prompt_syntax": "a1111"}
                bad = client.post(path, json=sent)
                assert bad.status_code == 422 and bad.json()["error"]["field"] == field, bad.text
                assert "'1.2.3' at character 7 is not a number" in bad.json()["error"]["message"]
        assert len(backend.calls) == calls
        assert (
            client.post("/v1/generate", json={**body, "prompt": "a (fox:1.2.3)"}).status_code == 200
        )  # plain
    backend = FakeTriton()
    with gateway_client(backend, default_prompt_syntax="a1111") as client:
        job = client.post("/v1/jobs", json={"prompt": "a (fox)", "steps": 2})
        assert job.status_code in (200, 202), job.text
        url, deadline = f"/v1/jobs/{job.json()['id']}", time.monotonic() + 10
        while (state := client.get(url).json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        assert state["status"] == "completed" and backend.calls[-1]["prompt_syntax"] == "a1111"


def test_clip_skip_reaches_the_model_and_the_cache_key() -> None:
    backend = FakeTriton(served=dataclasses.replace(fake_served_model(), max_clip_skip=2))
    with gateway_client(backend) as client:
        body = {"prompt": "a fox", "steps": 2, "seed": 1}
        assert client.post("/v1/generate", json=body).status_code == 200
        response = client.post("/v1/generate", json={**body, "clip_skip": 2})
        assert response.status_code == 200 and response.json()["cache"] != "hit"  # another layer: new key
        assert backend.calls[-1]["clip_skip"] == 2
        assert client.post("/v1/generate", json={**body, "clip_skip": 2}).json()["cache"] == "hit"
        for value, words in ((-1, "greater than or equal to 0"), (3, "allows 0 to 2")):
            for path in ("/v1/generate", "/v1/jobs"):
                bad = client.post(path, json={**body, "clip_skip": value})
                assert bad.status_code == 422 and bad.json()["error"]["field"] == "clip_skip", bad.text
                assert words in bad.json()["error"]["message"]
        assert client.get("/v1/models").json()["data"][0]["max_clip_skip"] == 2


def test_embeddings_are_listed_and_part_of_the_cache_key() -> None:
    """/v1/models lists the model's embeddings; a prompt using a token (in any case) keys the cache by its
    file's hash, so a token re-added with another file is another key; other prompts keep their keys."""
    learned = {"token": "<style>", "sha256": "aa" * 32, "vectors": 2, "format": "a1111"}
    backend = FakeTriton(served=dataclasses.replace(fake_served_model(), embeddings=[learned]))
    with gateway_client(backend) as client:
        assert client.get("/v1/models").json()["data"][0]["embeddings"] == [learned]
        body = {"prompt": "a fox, <Style>", "steps": 2, "seed": 1}
        plain = {**body, "prompt": "a fox"}
        assert client.post("/v1/generate", json=body).json()["cache"] != "hit"
        assert client.post("/v1/generate", json=plain).json()["cache"] != "hit"
        assert client.post("/v1/generate", json=body).json()["cache"] == "hit"
        backend.served = dataclasses.replace(backend.served, embeddings=[{**learned, "sha256": "bb" * 32}])
        assert client.post("/v1/generate", json=body).json()["cache"] != "hit"  # the token's new file
        assert client.post("/v1/generate", json=plain).json()["cache"] == "hit"
