"""The seed-aware result cache: the gateway in-process over a fake Triton that counts its calls, shared
through a real Redis by two gateways, bypassed when Redis is down; the key and the fingerprint at unit
level; the served model re-read from a real Triton."""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sd_triton.gateway.cache import ResultCache, cache_key
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.schemas import GenerateResponse, GenerationOptions
from sd_triton.gateway.service import Job
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.state import MemoryStore
from sd_triton.gateway.triton.backend import GrpcTritonBackend
from sd_triton.requests import GenerationParams as CheckedParams
from sd_triton.served_model import config_fingerprint
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port
from tests.gateway.access_support import sample
from tests.gateway.inprocess import FakeTriton, gateway_client

FAST = {"steps": 3, "width": 64, "height": 48}


@pytest.fixture(scope="module")
def cached() -> Iterator[tuple[httpx.Client, FakeTriton]]:
    """The gateway in-process with its memory cache, over a fake Triton that counts its calls."""
    backend = FakeTriton()
    with gateway_client(backend, redis_url=None) as http:
        yield http, backend


def unique(prompt: str) -> str:
    return f"{prompt} {uuid.uuid4().hex[:8]}"


def test_seeded_repeat_is_a_hit_without_triton(cached) -> None:
    http, backend = cached
    body = {"prompt": unique("a red fox"), **FAST, "seed": 77, "num_images": 2}
    before = len(backend.calls)
    first = http.post("/v1/generate", json=body).json()
    assert first["cache"] == "miss" and len(backend.calls) == before + 1
    second = http.post("/v1/generate", json=body).json()
    assert second["cache"] == "hit"
    assert len(backend.calls) == before + 1  # no Triton call
    assert [i["base64"] for i in second["images"]] == [i["base64"] for i in first["images"]]
    assert [i["seed"] for i in second["images"]] == [77, 78]
    assert second["provenance"] == first["provenance"] and second["truncation"] == first["truncation"]
    assert second["timings"]["inference_ms"] == 0.0
    # a batch is cached as a whole, too
    batch = {"prompts": [unique("a hen"), unique("a cow")], **FAST, "seed": 3}
    assert http.post("/v1/generate/batch", json=batch).json()["cache"] == "miss"
    calls = len(backend.calls)  # one txt2img call per prompt
    again = http.post("/v1/generate/batch", json=batch).json()
    assert again["cache"] == "hit" and len(backend.calls) == calls == before + 3
    assert [i["seed"] for i in again["images"]] == [3, 4]


def test_no_cache_header_asks_for_a_fresh_generation(cached) -> None:
    http, backend = cached
    body = {"prompt": unique("a fresh one"), **FAST, "seed": 5}
    assert http.post("/v1/generate", json=body).json()["cache"] == "miss"
    calls = len(backend.calls)
    bypassed = sample(http, "gateway_cache_lookups_total", result="bypass")
    fresh = http.post("/v1/generate", json=body, headers={"Cache-Control": "no-cache"}).json()
    assert fresh["cache"] == "bypass" and len(backend.calls) == calls + 1
    assert sample(http, "gateway_cache_lookups_total", result="bypass") == bypassed + 1
    assert sample(http, "cache_bypasses_total") == bypassed + 1  # the product total, same count
    assert http.post("/v1/generate", json=body).json()["cache"] == "hit"  # and stored again
    # an unseeded request is never a cache candidate: no-cache changes nothing for it
    unseeded = {k: v for k, v in body.items() if k != "seed"}
    answer = http.post("/v1/generate", json=unseeded, headers={"Cache-Control": "no-cache"}).json()
    assert answer["cache"] == "miss"


def test_unseeded_never_hits(cached) -> None:
    http, backend = cached
    body = {"prompt": unique("a boat"), **FAST}
    calls = len(backend.calls)
    answers = [http.post("/v1/generate", json=body).json() for _ in range(2)]
    assert [a["cache"] for a in answers] == ["miss", "miss"]
    assert len(backend.calls) == calls + 2
    # reusing the drawn seed explicitly is a new (seeded) request: a miss the first time
    seeded = http.post("/v1/generate", json={**body, "seed": answers[0]["images"][0]["seed"]}).json()
    assert seeded["cache"] == "miss" and seeded["images"][0]["base64"] == answers[0]["images"][0]["base64"]


def test_different_parameters_miss(cached) -> None:
    http, backend = cached
    base = {"prompt": unique("a castle"), **FAST, "seed": 1}
    assert http.post("/v1/generate", json=base).json()["cache"] == "miss"
    assert http.post("/v1/generate", json=base).json()["cache"] == "hit"
    for change in (
        {"prompt": base["prompt"] + "!"},
        {"negative_prompt": "fog"},
        {"width": 56},
        {"height": 56},
        {"steps": 4},
        {"guidance_scale": 3.0},
        {"seed": 2},
        {"scheduler": "ddim"},
        {"num_images": 2},
        {"output_format": "jpeg"},
    ):
        calls = len(backend.calls)
        answer = http.post("/v1/generate", json={**base, **change})
        assert answer.status_code == 200, answer.text
        assert answer.json()["cache"] == "miss", change
        assert len(backend.calls) == calls + 1, change
    # the response format is presentation only: a URL request is served from the same entry
    assert http.post("/v1/generate", json={**base, "response_format": "url"}).json()["cache"] == "hit"


def test_two_gateways_share_one_cache_through_redis(redis_url: str) -> None:
    body = {"prompt": unique("a lighthouse"), **FAST, "seed": 42}
    one, two = FakeTriton(), FakeTriton()
    with gateway_client(one, redis_url=redis_url) as a, gateway_client(two, redis_url=redis_url) as b:
        stored = a.post("/v1/generate", json=body).json()
        assert stored["cache"] == "miss" and len(one.calls) == 1
        shared = b.post("/v1/generate", json=body).json()
        assert shared["cache"] == "hit" and two.calls == []
        assert shared["images"] == stored["images"]


def test_redis_down_bypasses_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    body = {"prompt": unique("a mill"), **FAST, "seed": 8}
    backend = FakeTriton()
    with (
        caplog.at_level(logging.WARNING),
        gateway_client(backend, redis_url=f"redis://127.0.0.1:{free_port()}/0") as http,
    ):
        answers = [http.post("/v1/generate", json=body) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.json()["cache"] for a in answers] == ["miss", "miss", "miss"]
        assert len(backend.calls) == 3
        metrics = http.get("/metrics").text
        assert 'gateway_cache_lookups_total{result="error"} 3.0' in metrics
    warnings = [r for r in caplog.records if "result cache bypassed" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: once a minute, not once a request
    assert warnings[0].levelname == "WARNING"


# --- unit level: the key, the fingerprint, the size limit ---

CONFIGS: dict[str, dict[str, Any]] = {
    "txt2img": {"platform": "ensemble", "parameters": {"model": {"string_value": "tiny"}}},
    "unet": {"backend": "python", "parameters": {"precision": {"string_value": "fp32"}}},
}


def _jobs(request: GenerationOptions, n: int = 1) -> list[Job]:
    assert request.seed is not None
    params = CheckedParams(
        height=64,
        width=64,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        seed=request.seed,
        scheduler=request.scheduler,
        num_images=request.num_images,
    )
    return [Job("a prompt", params)] * n  # the service's planned jobs (no SDXL conditioning)


def test_fingerprint_follows_the_served_engines() -> None:
    base = config_fingerprint(CONFIGS, {"txt2img": ["1"], "unet": ["1"]})
    assert base == config_fingerprint(copy.deepcopy(CONFIGS), {"unet": ["1"], "txt2img": ["1"]})
    swapped = copy.deepcopy(CONFIGS)
    swapped["unet"] = {"platform": "tensorrt_plan", "parameters": {"precision": {"string_value": "fp16"}}}
    fp16 = copy.deepcopy(CONFIGS)
    fp16["unet"]["parameters"]["precision"] = {"string_value": "fp16"}
    hashed = copy.deepcopy(CONFIGS)
    hashed["unet"]["parameters"]["artifact_sha256"] = {"string_value": "ab12"}
    others = {
        config_fingerprint(swapped, {"txt2img": ["1"], "unet": ["1"]}),
        config_fingerprint(fp16, {"txt2img": ["1"], "unet": ["1"]}),
        config_fingerprint(hashed, {"txt2img": ["1"], "unet": ["1"]}),
        config_fingerprint(CONFIGS, {"txt2img": ["1"], "unet": ["2"]}),
    }
    assert base not in others and len(others) == 4
    scaled = copy.deepcopy(CONFIGS)  # more instances serve the same images
    scaled["unet"]["instance_group"] = [{"count": 4}]
    assert config_fingerprint(scaled, {"txt2img": ["1"], "unet": ["1"]}) == base


def test_key_needs_a_seed_and_covers_the_fingerprint() -> None:
    seeded = GenerationOptions(seed=5)
    assert cache_key("f", ["a"], GenerationOptions(), _jobs(seeded)) is None
    key = cache_key("f", ["a"], seeded, _jobs(seeded))
    assert key is not None and key == cache_key("f", ["a"], seeded, _jobs(seeded))
    assert key != cache_key("g", ["a"], seeded, _jobs(seeded))
    assert key != cache_key("f", ["a", "b"], seeded, _jobs(seeded, 2))
    assert key == cache_key("f", ["a"], GenerationOptions(seed=5, response_format="url"), _jobs(seeded))
    # absent and empty negative prompts are the same (unconditional) generation
    assert key == cache_key("f", ["a"], GenerationOptions(seed=5, negative_prompt=""), _jobs(seeded))


def test_fingerprint_change_misses_and_large_results_are_skipped() -> None:
    response = GenerateResponse.model_validate(
        {
            "images": [{"base64": "aGk=", "seed": 5, "width": 64, "height": 64, "content_type": "image/png"}],
            "timings": {"queue_ms": 1, "inference_ms": 2, "encode_ms": 3, "total_ms": 6},
            "provenance": {
                "model": "tiny",
                "scheduler": {"name": "default", "class_name": "PNDMScheduler"},
                "components": {},
            },
            "truncation": [{"prompt_tokens_cut": 0, "negative_prompt_tokens_cut": 0}],
        }
    )
    request = GenerationOptions(seed=5)

    async def run() -> None:
        metrics = GatewayMetrics()
        cache = ResultCache(MemoryStore(), GatewaySettings(), metrics)
        old, new = (cache_key(f, ["a"], request, _jobs(request)) for f in ("engine-a", "engine-b"))
        assert await cache.put(old, response)
        hit = await cache.get(old)
        assert hit is not None and hit.cache == "hit" and hit.images == response.images
        assert await cache.get(new) is None  # the swapped engine's request is a miss
        tiny = ResultCache(MemoryStore(), GatewaySettings(cache_max_entry_bytes=1024), metrics)
        big = response.model_copy(update={"images": response.images * 20})
        assert not await tiny.put(old, big) and await tiny.get(old) is None
        off = ResultCache(MemoryStore(), GatewaySettings(cache_enabled=False), metrics)
        assert not await off.put(old, response) and await off.get(old) is None

    asyncio.run(run())


def test_served_model_refresh_rereads_triton(triton: TritonServer) -> None:
    """The backend re-reads the configs after `served_model_refresh_s`: a fresh object, same fingerprint."""
    refresh_s = 0.2

    async def run() -> None:
        backend = GrpcTritonBackend(
            GatewaySettings(triton_url=triton.grpc_url, served_model_refresh_s=refresh_s)
        )
        try:
            [first] = await backend.served_models()
            assert (await backend.served_models())[0] is first  # within the refresh interval: the same read
            await asyncio.sleep(refresh_s + 0.05)
            [again] = await backend.served_models()
            assert again is not first and again.fingerprint == first.fingerprint
            assert len(first.fingerprint) == 64 and first.model == "tiny"
        finally:
            await backend.close()

    asyncio.run(run())
