"""Per-key limits on the shared state store (`gateway/state.py`): one store, so gateway replicas
sharing Redis share every limit.

- rate limit: requests per minute in a fixed window that starts with the key's first request
  (counter `rl:<id>`, expiring 60 s after it was created); every /v1 request counts.
- quota: images per UTC day (counter `quota:<id>:<YYYY-MM-DD>`), charged at admission, refunded when
  the generation fails; a request that would go over it is refused whole.
- concurrency: requests (or jobs) of a key being served at once (counter `conc:<id>`).

A store outage fails OPEN (availability first): the request is served unlimited, the error is counted
in `gateway_state_errors_total{use}` and logged as a WARNING at most once per 30 s.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sd_triton.gateway.errors import ConcurrencyLimitedError, QuotaExceededError, RateLimitedError
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.state import StateStore, StateUnavailable

log = logging.getLogger(__name__)

WINDOW_S = 60
# a concurrency counter expires this long after it was created, so slots held by a gateway that
# died without releasing them free themselves (see docs/access.md)
SLOT_TTL_S = 3600.0
WARN_INTERVAL_S = 30.0


def _ceil_s(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def seconds_to_utc_midnight(now: datetime | None = None) -> float:
    now = now or datetime.now(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


class StateErrors:
    """Counts store failures by use and warns about them at most once per `interval_s`; `message`
    (with `{use}`) says what the caller does without the store."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        message: str = "shared state unavailable, serving without {use} limits (fail open)",
        interval_s: float = WARN_INTERVAL_S,
        logger: logging.Logger = log,
    ) -> None:
        self.metrics = metrics
        self.message = message
        self.interval_s = interval_s
        self.log = logger
        self._warned_at = -math.inf
        self._suppressed = 0

    def record(self, use: str, exc: StateUnavailable) -> None:
        self.metrics.state_errors.labels(use=use).inc()
        now = time.monotonic()
        if now - self._warned_at < self.interval_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
        self.log.warning("%s: %s%s", self.message.format(use=use), exc, more)
        self._warned_at, self._suppressed = now, 0


@dataclass(frozen=True)
class RateState:
    """Where a key stands in its rate-limit window, for the X-RateLimit-* headers."""

    limit: int
    remaining: int
    reset_s: int  # seconds until the window resets (delta seconds, like Retry-After)

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }


@dataclass
class Charge:
    """Images charged to a key's daily quota; `refund()` gives them back (once)."""

    limiter: Limiter | None = None
    counter: str = ""
    images: int = 0
    _refunded: bool = field(default=False, repr=False)

    async def refund(self) -> None:
        if self.limiter is None or self.images == 0 or self._refunded:
            return
        self._refunded = True
        await self.limiter._add(self.counter, -self.images, "quota", ttl_s=seconds_to_utc_midnight() + 3600)


@dataclass
class Slot:
    """One concurrency slot of a key; `release()` frees it (once). Also an async context manager."""

    limiter: Limiter | None = None
    counter: str = ""
    _released: bool = field(default=False, repr=False)

    async def release(self) -> None:
        if self.limiter is None or self._released:
            return
        self._released = True
        value = await self.limiter._add(self.counter, -1, "concurrency", ttl_s=SLOT_TTL_S)
        if value is not None and value < 0:  # the counter expired while slots were held: back to 0
            await self.limiter._add(self.counter, -value, "concurrency", ttl_s=SLOT_TTL_S)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class Limiter:
    def __init__(self, store: StateStore, metrics: GatewayMetrics, errors: StateErrors | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.errors = errors or StateErrors(metrics)

    async def _add(self, counter: str, amount: int, use: str, ttl_s: float | None) -> int | None:
        """incr on the store; None when the store is unavailable (counted, maybe logged)."""
        try:
            return await self.store.incr(counter, amount, ttl_s=ttl_s)
        except StateUnavailable as exc:
            self.errors.record(use, exc)
            return None

    async def hit(self, key_id: str, limit: int | None) -> RateState | None:
        """Count one request in the key's window; RateLimitedError past `limit` (None: unlimited, and
        None comes back, as it does when the store is unavailable)."""
        if limit is None:
            return None
        counter = f"rl:{key_id}"
        count = await self._add(counter, 1, "rate_limit", ttl_s=WINDOW_S)
        if count is None:
            return None
        try:
            left = await self.store.ttl(counter)
        except StateUnavailable as exc:
            self.errors.record("rate_limit", exc)
            left = None
        state = RateState(limit, max(0, limit - count), _ceil_s(WINDOW_S if left is None else left))
        if count > limit:
            self.metrics.rejections.labels(reason="rate_limit").inc()
            raise RateLimitedError(
                f"rate limit: {limit} requests per minute for this key; "
                f"the window resets in {state.reset_s} s",
                headers={"Retry-After": str(state.reset_s), **state.headers()},
            )
        return state

    async def charge(self, key_id: str, limit: int | None, images: int) -> Charge:
        """Charge `images` to today's (UTC) quota; QuotaExceededError, charging nothing, when the whole
        request does not fit."""
        if limit is None:
            return Charge()
        counter = f"quota:{key_id}:{datetime.now(timezone.utc).date().isoformat()}"
        reset = seconds_to_utc_midnight()
        used = await self._add(counter, images, "quota", ttl_s=reset + 3600)
        if used is None:
            return Charge()
        if used > limit:
            await self._add(counter, -images, "quota", ttl_s=reset + 3600)
            self.metrics.rejections.labels(reason="quota").inc()
            before = used - images
            raise QuotaExceededError(
                f"quota: {limit} images per UTC day for this key; {before} used today, "
                f"this request needs {images}; resets at 00:00 UTC",
                headers={"Retry-After": str(_ceil_s(reset))},
            )
        return Charge(self, counter, images)

    async def acquire(self, key_id: str, limit: int | None, retry_after_s: int = 1) -> Slot:
        """Hold one of the key's `limit` concurrency slots; ConcurrencyLimitedError when all are held.
        Release with `await slot.release()` (or `async with`)."""
        if limit is None:
            return Slot()
        counter = f"conc:{key_id}"
        held = await self._add(counter, 1, "concurrency", ttl_s=SLOT_TTL_S)
        if held is None:
            return Slot()
        if held > limit:
            await self._add(counter, -1, "concurrency", ttl_s=SLOT_TTL_S)
            self.metrics.rejections.labels(reason="concurrency").inc()
            raise ConcurrencyLimitedError(
                f"concurrency: at most {limit} requests at once for this key; all {limit} are in progress",
                headers={"Retry-After": str(retry_after_s)},
            )
        return Slot(self, counter)
