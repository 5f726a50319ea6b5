"""The two state stores behave the same: counters with expiry, values, prefix listing, pub/sub."""

from __future__ import annotations

import asyncio

import pytest

from sd_triton.gateway.state import MemoryStore, RedisStore, StateStore, StateUnavailable


async def _exercise(store: StateStore) -> None:
    assert await store.incr("a", 1, ttl_s=0.3) == 1
    assert await store.incr("a", 2, ttl_s=10) == 3  # the expiry is the creating call's
    left = await store.ttl("a")
    assert left is not None and 0 < left <= 0.3
    await store.set("b", b"x", ttl_s=5)
    assert await store.get("b") == b"x"
    assert sorted(await store.keys("")) == ["a", "b"]
    async with store.subscribe("ch") as messages:
        await store.publish("ch", b"hello")
        assert await asyncio.wait_for(anext(messages), 3) == b"hello"
    await asyncio.sleep(0.35)
    assert await store.get("a") is None
    await store.delete("b")
    assert await store.get("b") is None
    # lists: a FIFO queue with removal from the middle
    for item in (b"j1", b"j2", b"j3"):
        await store.rpush("q", item, ttl_s=10)
    assert await store.lrange("q") == [b"j1", b"j2", b"j3"]
    assert await store.lrange("q", 1, 1) == [b"j2"]
    assert await store.lrem("q", b"j2") == 1
    assert await store.lpop("q") == b"j1"
    assert await store.lpop("q") == b"j3"
    assert await store.lpop("q") is None
    assert await store.lrange("q") == []


def test_memory_store() -> None:
    asyncio.run(_exercise(MemoryStore()))


def test_memory_store_is_bounded() -> None:
    """Without Redis, the store holding the result cache cannot grow without limit: expired entries
    are swept without being read, and past max_bytes the oldest expiring entries are evicted, never
    an entry without expiry (the job queue)."""

    async def run() -> None:
        store = MemoryStore(max_bytes=10_000)
        store.SWEEP_S = 0.0
        await store.rpush("jobs:queue", b"j" * 100)  # no expiry
        for i in range(50):  # 50 kB of cached results, 1 kB each
            await store.set(f"cache:{i}", bytes(1000), ttl_s=3600)
        assert store._bytes <= 10_000
        assert await store.get("cache:0") is None and await store.get("cache:49") == bytes(1000)
        assert await store.lrange("jobs:queue") == [b"j" * 100]
        await store.set("short", bytes(500), ttl_s=0.01)
        await asyncio.sleep(0.02)
        await store.set("other", b"x", ttl_s=60)  # any write sweeps: "short" goes unread
        assert "short" not in store._values

    asyncio.run(run())


def test_redis_store(redis_url: str) -> None:
    async def run() -> None:
        store = RedisStore(redis_url)
        await store.client.flushdb()
        await _exercise(store)
        await store.close()

    asyncio.run(run())


def test_unreachable_redis_raises_state_unavailable() -> None:
    async def run() -> None:
        store = RedisStore("redis://127.0.0.1:1/0")
        with pytest.raises(StateUnavailable, match="Redis at"):
            await store.ping()
        with pytest.raises(StateUnavailable):
            await store.incr("x")

    asyncio.run(run())
