"""Per-key rate limits, quotas and concurrency, by the gateway in-process over a fake Triton: exactly at
the limit, with their headers; shared by two gateways on one real Redis; failing open when Redis dies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sd_triton.gateway.access.keys import CreatedKey, create_key
from sd_triton.gateway.access.limits import Limiter
from sd_triton.gateway.errors import ConcurrencyLimitedError, QuotaExceededError
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.state import MemoryStore, RedisStore
from tests.conftest import RedisServer
from tests.gateway.access_support import CHEAP, bearer, sample
from tests.gateway.inprocess import FakeTriton, gateway_client

INVALID = {"prompt": "a fox", "steps": 0}  # refused by the schema (422): counts, costs Triton nothing


# --- the limiter alone (the API the jobs code uses) ---


def test_slots_and_charges_release_and_refund_once() -> None:
    async def run() -> None:
        limiter = Limiter(MemoryStore(), GatewayMetrics())
        slot = await limiter.acquire("k", 2)
        async with await limiter.acquire("k", 2):
            with pytest.raises(ConcurrencyLimitedError, match="at most 2 requests at once"):
                await limiter.acquire("k", 2)
        await slot.release()
        await slot.release()  # idempotent: frees one slot, once
        assert await limiter.store.get("conc:k") == b"0"
        charge = await limiter.charge("k", 5, 4)
        with pytest.raises(QuotaExceededError, match="5 images per UTC day for this key; 4 used today"):
            await limiter.charge("k", 5, 2)
        await charge.refund()
        await charge.refund()  # once
        assert (await limiter.charge("k", 5, 5)).images == 5
        assert (await limiter.acquire("k", None)).limiter is None  # unlimited: nothing held

    asyncio.run(run())


def test_unreachable_store_fails_open_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> GatewayMetrics:
        metrics = GatewayMetrics()
        limiter = Limiter(RedisStore("redis://127.0.0.1:1/0"), metrics)
        for _ in range(3):
            assert await limiter.hit("k", 1) is None
            assert (await limiter.charge("k", 1, 10)).images == 0
            slot = await limiter.acquire("k", 1)
            await slot.release()
        return metrics

    with caplog.at_level(logging.WARNING, logger="sd_triton.gateway.access.limits"):
        metrics = asyncio.run(run())
    for use in ("rate_limit", "quota", "concurrency"):
        assert metrics.state_errors.labels(use=use)._value.get() == 3
    assert [r.message.split(":")[0] for r in caplog.records] == [
        "shared state unavailable, serving without rate_limit limits (fail open)"
    ]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One gateway (memory store) and a key per limit; each denoising step takes 20 ms."""
    path = tmp_path_factory.mktemp("limits") / "keys.json"
    keys = {
        "rate": create_key(path, "rate", rate_limit_per_min=3),
        "quota": create_key(path, "quota", images_per_day=3),
        "concurrency": create_key(path, "concurrency", max_concurrency=1),
    }
    with gateway_client(FakeTriton(step_s=0.02), keys_file=str(path), redis_url=None) as http:
        yield {"http": http, **{name: bearer(k.token) for name, k in keys.items()}}


def rate_headers(response: httpx.Response) -> tuple[int, int, int]:
    h = response.headers
    return int(h["X-RateLimit-Limit"]), int(h["X-RateLimit-Remaining"]), int(h["X-RateLimit-Reset"])


def test_rate_limit_exactly_at_the_limit(limited: dict) -> None:
    http, headers = limited["http"], limited["rate"]
    before = sample(http, "gateway_rejections_total", reason="rate_limit")
    # every /v1 request counts, whatever its answer; each carries the window's headers
    responses = [
        http.post("/v1/generate", json={"prompt": "a fox", **CHEAP}, headers=headers),
        http.post("/v1/generate", json=INVALID, headers=headers),
        http.get("/v1/no-such-route", headers=headers),
    ]
    assert [r.status_code for r in responses] == [200, 422, 404]
    for remaining, response in zip((2, 1, 0), responses, strict=True):
        limit, left, reset = rate_headers(response)
        assert (limit, left) == (3, remaining) and 1 <= reset <= 60

    refused = http.post("/v1/generate", json={"prompt": "a fox", **CHEAP}, headers=headers)  # the 4th
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "rate_limited" and "3 requests per minute" in error["message"]
    limit, left, reset = rate_headers(refused)
    assert (limit, left) == (3, 0) and 1 <= reset <= 60
    assert int(refused.headers["Retry-After"]) == reset
    assert sample(http, "gateway_rejections_total", reason="rate_limit") == before + 1
    # another key has its own window; a request outside /v1 has no limit
    assert http.post("/v1/generate", json=INVALID, headers=limited["quota"]).status_code == 422
    assert "X-RateLimit-Limit" not in http.get("/healthz", headers=headers).headers


def test_quota_exactly_at_the_limit(limited: dict) -> None:
    http, headers = limited["http"], limited["quota"]

    def generate(**body: object) -> httpx.Response:
        return http.post("/v1/generate", json={"prompt": "a fox", **CHEAP, **body}, headers=headers)

    batch = http.post("/v1/generate/batch", json={"prompts": ["a", "b"], **CHEAP}, headers=headers)
    assert batch.status_code == 200 and len(batch.json()["images"]) == 2  # 2 prompts x 1 image: 2 of 3

    too_many = generate(num_images=2)  # 2 + 2 > 3: refused whole, nothing charged
    assert too_many.status_code == 429, too_many.text
    error = too_many.json()["error"]
    assert error["type"] == "quota_exceeded"
    assert (
        "3 images per UTC day" in error["message"]
        and "2 used today, this request needs 2" in error["message"]
    )
    assert 0 < int(too_many.headers["Retry-After"]) <= 86400

    failed = generate(steps=100_000)  # charged at admission, refunded: the model refused it
    assert failed.status_code == 422 and failed.json()["error"]["field"] == "steps"

    assert generate().status_code == 200  # the 3rd image: exactly at the quota
    last = generate()
    assert last.status_code == 429 and "3 used today, this request needs 1" in last.json()["error"]["message"]
    assert sample(http, "gateway_rejections_total", reason="quota") >= 2


def test_concurrency_limit(limited: dict) -> None:
    http, headers = limited["http"], limited["concurrency"]
    slow = {"prompt": "a slow fox", "steps": 60, "num_images": 4, "width": 64, "height": 64}  # 1.2 s
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, "/v1/generate", json=slow, headers=headers)
        deadline = time.monotonic() + 10
        while sample(http, "gateway_in_flight_requests") < 2:  # the slow one and this /metrics call
            assert time.monotonic() < deadline, "the slow request never showed in flight"
            time.sleep(0.02)
        time.sleep(0.2)  # past authentication: it holds the key's one slot
        refused = http.post("/v1/generate", json={"prompt": "a fox", **CHEAP}, headers=headers)
        assert first.result().status_code == 200
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "concurrency_limited" and "at most 1 requests at once" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    # the slot is free again once the first finished
    assert http.post("/v1/generate", json={"prompt": "a fox", **CHEAP}, headers=headers).status_code == 200
    assert sample(http, "gateway_rejections_total", reason="concurrency") == 1


# --- two gateways sharing one Redis; Redis dying ---


@pytest.fixture(scope="module")
def redis_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("redis-limits")
    redis = RedisServer(tmp)
    path = tmp / "keys.json"
    keys: dict[str, CreatedKey] = {
        "rate": create_key(path, "rate", rate_limit_per_min=4),
        "quota": create_key(path, "quota", images_per_day=2),
        "all": create_key(path, "all", rate_limit_per_min=1, images_per_day=1, max_concurrency=1),
    }
    settings = {"keys_file": str(path), "redis_url": redis.url}
    try:
        with gateway_client(**settings) as a, gateway_client(**settings) as b:
            yield {"a": a, "b": b, "redis": redis, "keys": keys}
    finally:
        redis.kill()


def test_two_gateways_share_one_rate_limit(redis_pair: dict) -> None:
    a, b, headers = redis_pair["a"], redis_pair["b"], bearer(redis_pair["keys"]["rate"].token)
    responses = [gateway.post("/v1/generate", json=INVALID, headers=headers) for gateway in (a, b, a, b)]
    assert [r.status_code for r in responses] == [422] * 4
    assert [rate_headers(r)[1] for r in responses] == [3, 2, 1, 0]
    for gateway in (a, b):
        refused = gateway.post("/v1/generate", json=INVALID, headers=headers)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"


def test_two_gateways_share_one_quota(redis_pair: dict) -> None:
    a, b, headers = redis_pair["a"], redis_pair["b"], bearer(redis_pair["keys"]["quota"].token)
    body = {"prompt": "a fox", **CHEAP}
    assert a.post("/v1/generate", json=body, headers=headers).status_code == 200
    assert b.post("/v1/generate", json=body, headers=headers).status_code == 200
    for gateway in (a, b):
        refused = gateway.post("/v1/generate", json=body, headers=headers)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "quota_exceeded"


def test_redis_outage_fails_open(redis_pair: dict, caplog: pytest.LogCaptureFixture) -> None:
    """Run last in this module: it kills the module's Redis."""
    a, token = redis_pair["a"], redis_pair["keys"]["all"].token
    body = {"prompt": "a fox", **CHEAP}
    assert a.post("/v1/generate", json=body, headers=bearer(token)).status_code == 200  # within its limits
    redis_pair["redis"].kill()

    # past every limit of the key (1 request/min, 1 image/day), and still served
    for _ in range(3):
        response = a.post("/v1/generate", json=body, headers=bearer(token))
        assert response.status_code == 200, response.text
        assert "X-RateLimit-Limit" not in response.headers  # no window known
    assert a.post("/v1/generate", json=body, headers=bearer("sdk_0123456789ab_wrong")).status_code == 401

    errors = {
        use: sample(a, "gateway_state_errors_total", use=use)
        for use in ("rate_limit", "quota", "concurrency")
    }
    assert errors == {"rate_limit": 3, "quota": 3, "concurrency": 3}  # one failed call per limit and request
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "shared state unavailable" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings  # at most one warning per 30 s, however many errors
