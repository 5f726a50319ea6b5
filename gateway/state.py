"""Shared state for limits, quotas, the cache and jobs: in memory (one gateway process) by default,
Redis when `SD_TRITON_REDIS_URL` is set (several gateway replicas share it).

Both stores offer the same few operations; every key is prefixed with `sd-triton:`. A Redis store
that cannot be reached raises `StateUnavailable`; each caller decides whether that fails open or
closed (see docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

PREFIX = "sd-triton:"


class StateUnavailable(Exception):
    """The shared store cannot be reached."""


class StateStore(ABC):
    kind: str

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        """Add `amount` and return the new value; a key created by this call expires after `ttl_s`."""

    @abstractmethod
    async def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires; None when it does not exist or never expires."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    @abstractmethod
    async def delete(self, *keys: str) -> None: ...

    @abstractmethod
    async def keys(self, prefix: str) -> list[str]:
        """Every key starting with `prefix` (without the store's own prefix)."""

    @abstractmethod
    async def rpush(self, key: str, value: bytes, ttl_s: float | None = None) -> int:
        """Append to a list; returns its length. `ttl_s` (re)sets the list's expiry."""

    @abstractmethod
    async def lrange(self, key: str, start: int = 0, end: int = -1) -> list[bytes]:
        """Items start..end, both included (-1: the last)."""

    @abstractmethod
    async def lpop(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def lrem(self, key: str, value: bytes) -> int:
        """Remove every item equal to `value`; returns how many."""

    @abstractmethod
    async def publish(self, channel: str, message: bytes) -> None: ...

    @abstractmethod
    def subscribe(self, channel: str) -> Any:
        """`async with store.subscribe(ch) as messages: async for m in messages` — only messages
        published after the context is entered."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StateUnavailable when the store cannot be reached."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryStore(StateStore):
    """One process's state, bounded: expired entries are removed when read and by a sweep every
    SWEEP_S, and past `max_bytes` of values the entries written longest ago that expire anyway
    (cached results first, in practice) are evicted, as Redis' volatile-lru would."""

    kind = "memory"
    SWEEP_S = 10.0

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._values: dict[str, tuple[Any, float | None]] = {}  # in the order written
        self._bytes = 0  # the size of every value
        self._next_sweep = 0.0
        self._channels: dict[str, set[asyncio.Queue[bytes]]] = {}

    @staticmethod
    def _size(value: Any) -> int:
        if isinstance(value, bytes):
            return len(value)
        return sum(len(item) for item in value) if isinstance(value, list) else 0

    def _put(self, key: str, value: Any, deadline: float | None) -> None:
        self._pop(key)  # written last: the last to be evicted
        self._values[key] = (value, deadline)
        self._bytes += self._size(value)
        self._bound()

    def _pop(self, key: str) -> None:
        entry = self._values.pop(key, None)
        if entry is not None:
            self._bytes -= self._size(entry[0])

    def _bound(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_S
            for key in [
                k for k, (_, deadline) in self._values.items() if deadline is not None and deadline <= now
            ]:
                self._pop(key)
        if self._bytes > self.max_bytes:
            evicted = 0
            for key in [k for k, (_, deadline) in self._values.items() if deadline is not None]:
                if self._bytes <= self.max_bytes:
                    break
                self._pop(key)
                evicted += 1
            log.warning(
                "memory store over %d bytes: %d oldest expiring entries evicted", self.max_bytes, evicted
            )

    def _live(self, key: str) -> tuple[Any, float | None] | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= time.monotonic():
            self._pop(key)
            return None
        return entry

    @staticmethod
    def _deadline(ttl_s: float | None) -> float | None:
        return None if ttl_s is None else time.monotonic() + ttl_s

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        entry = self._live(key)
        value, deadline = (0, self._deadline(ttl_s)) if entry is None else entry
        value = int(value) + amount
        self._put(key, value, deadline)
        return value

    async def ttl(self, key: str) -> float | None:
        entry = self._live(key)
        if entry is None or entry[1] is None:
            return None
        return max(0.0, entry[1] - time.monotonic())

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        if entry is None:
            return None
        value = entry[0]
        return value if isinstance(value, bytes) else str(value).encode()

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._put(key, value, self._deadline(ttl_s))

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._pop(key)

    async def keys(self, prefix: str) -> list[str]:
        return [key for key in list(self._values) if key.startswith(prefix) and self._live(key)]

    def _list(self, key: str) -> list[bytes]:
        entry = self._live(key)
        return [] if entry is None else list(entry[0])

    async def rpush(self, key: str, value: bytes, ttl_s: float | None = None) -> int:
        entry = self._live(key)
        items, deadline = ([], None) if entry is None else entry
        items = [*items, value]
        self._put(key, items, deadline if ttl_s is None else self._deadline(ttl_s))
        return len(items)

    async def lrange(self, key: str, start: int = 0, end: int = -1) -> list[bytes]:
        items = self._list(key)
        return items[start:] if end == -1 else items[start : end + 1]

    async def lpop(self, key: str) -> bytes | None:
        entry = self._live(key)
        if entry is None or not entry[0]:
            return None
        first, *rest = entry[0]
        self._pop(key)
        if rest:
            self._put(key, rest, entry[1])
        return bytes(first)

    async def lrem(self, key: str, value: bytes) -> int:
        entry = self._live(key)
        if entry is None:
            return 0
        kept = [item for item in entry[0] if item != value]
        removed = len(entry[0]) - len(kept)
        self._pop(key)
        if kept:
            self._put(key, kept, entry[1])
        return removed

    async def publish(self, channel: str, message: bytes) -> None:
        for queue in self._channels.get(channel, ()):
            queue.put_nowait(message)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._channels.setdefault(channel, set()).add(queue)

        async def messages() -> AsyncIterator[bytes]:
            while True:
                yield await queue.get()

        try:
            yield messages()
        finally:
            self._channels[channel].discard(queue)
            if not self._channels[channel]:
                del self._channels[channel]

    async def ping(self) -> None:
        return None


class RedisStore(StateStore):
    """Redis (redis-py's asyncio client); every call has a short socket timeout so an outage shows
    as StateUnavailable quickly instead of hanging a request."""

    kind = "redis"

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        import redis.asyncio as redis  # only needed when configured

        self.url = redacted(url)  # what messages and logs show
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=5
        )

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        try:
            yield
        except self._errors as exc:
            raise StateUnavailable(f"Redis at {self.url}: {exc}") from exc

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        async with self._call():
            pipe = self.client.pipeline(transaction=True)
            pipe.incrby(PREFIX + key, amount)
            if ttl_s is not None:  # NX: only a key this call created gets the expiry
                pipe.pexpire(PREFIX + key, max(1, math.ceil(ttl_s * 1000)), nx=True)
            value, *_ = await pipe.execute()
            return int(value)

    async def ttl(self, key: str) -> float | None:
        async with self._call():
            millis = await self.client.pttl(PREFIX + key)
        return None if millis < 0 else millis / 1000

    async def get(self, key: str) -> bytes | None:
        async with self._call():
            value = await self.client.get(PREFIX + key)
        return None if value is None else _bytes(value)

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else max(1, math.ceil(ttl_s * 1000))
        async with self._call():
            await self.client.set(PREFIX + key, value, px=px)

    async def delete(self, *keys: str) -> None:
        if keys:
            async with self._call():
                await self.client.delete(*(PREFIX + key for key in keys))

    async def keys(self, prefix: str) -> list[str]:
        async with self._call():
            found = [key async for key in self.client.scan_iter(match=PREFIX + prefix + "*", count=500)]
        return [(k.decode() if isinstance(k, bytes) else k).removeprefix(PREFIX) for k in found]

    async def rpush(self, key: str, value: bytes, ttl_s: float | None = None) -> int:
        async with self._call():
            pipe = self.client.pipeline(transaction=True)
            pipe.rpush(PREFIX + key, value)
            if ttl_s is not None:
                pipe.pexpire(PREFIX + key, max(1, math.ceil(ttl_s * 1000)))
            length, *_ = await pipe.execute()
            return int(length)

    async def lrange(self, key: str, start: int = 0, end: int = -1) -> list[bytes]:
        async with self._call():
            return [_bytes(item) for item in await self.client.lrange(PREFIX + key, start, end)]

    async def lpop(self, key: str) -> bytes | None:
        async with self._call():
            value: Any = await self.client.lpop(PREFIX + key)
        return None if value is None else _bytes(value)

    async def lrem(self, key: str, value: bytes) -> int:
        async with self._call():
            return int(await self.client.lrem(PREFIX + key, 0, value))  # type: ignore[arg-type]

    async def publish(self, channel: str, message: bytes) -> None:
        async with self._call():
            await self.client.publish(PREFIX + channel, message)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        pubsub = self.client.pubsub()
        async with self._call():
            await pubsub.subscribe(PREFIX + channel)

        async def messages() -> AsyncIterator[bytes]:
            while True:
                async with self._call():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    yield bytes(message["data"])

        try:
            yield messages()
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            except self._errors:
                pass

    async def ping(self) -> None:
        async with self._call():
            await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def redacted(url: str) -> str:
    """A URL without its password (redis://user:***@host), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def make_store(redis_url: str | None, memory_max_bytes: int = 256 * 1024 * 1024) -> StateStore:
    if redis_url:
        log.info("shared state in Redis at %s", redacted(redis_url))
        return RedisStore(redis_url)
    log.info("state in memory: limits, quotas, cache and jobs are this process's own")
    return MemoryStore(memory_max_bytes)
