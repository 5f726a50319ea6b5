"""Who may call, how often and what: API keys, per-key limits and the prompt policy, in one place.

- `AccessMiddleware` authenticates every /v1 request (except stored image URLs, which carry their own
  signature), counts it against the key's rate limit, and puts the caller's `KeyContext` into the
  request state; every response to a keyed request gets the X-RateLimit-* headers, errors included.
- `AccessDep` (gateway/deps.py) gives a route the caller's `Access`: `generation(prompts, n)`
  checks the policy, holds a concurrency slot and charges the quota around the generation.
- The jobs route uses `admit` at submission (policy and quota). Running jobs hold no concurrency slot:
  they are bounded by the job queue (docs/jobs.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd_triton.gateway.access.keys import ApiKey, KeyRegistry
from sd_triton.gateway.access.limits import Charge, Limiter, RateState, Slot
from sd_triton.gateway.access.policy import Rules, check, load_policy_file
from sd_triton.gateway.errors import ContentPolicyError, GatewayError, OpenAIContentPolicyError
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.state import StateStore

log = logging.getLogger(__name__)

# OpenAI-shaped routes under /v1/images/ (everything else there is a signed image URL: no key)
OPENAI_IMAGE_ROUTES = frozenset({"/v1/images/generations", "/v1/images/edits", "/v1/images/variations"})


def needs_key(path: str) -> bool:
    """/v1 routes need a key, except stored image URLs; /healthz, /readyz, /metrics, the docs and
    the playground (`/`, `/static/*`) never do."""
    if not path.startswith("/v1/"):
        return False
    return not path.startswith("/v1/images/") or path in OPENAI_IMAGE_ROUTES


def token_of(headers: Headers) -> str | None:
    """`Authorization: Bearer <token>`, else `X-API-Key: <token>`."""
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip() or None


@dataclass(frozen=True)
class KeyContext:
    """The caller: its key (None while the gateway runs open) and its rate-limit window."""

    key: ApiKey | None = None
    rate: RateState | None = None
    openai: bool = False  # errors in the OpenAI shape

    @property
    def key_id(self) -> str | None:
        return None if self.key is None else self.key.id


class AccessControl:
    """Keys, policy and limits of one app (`app.state.access`); the limiter comes with the store."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        # both raise ValueError naming the file / the bad regex: a startup error, not an open gateway
        self.registry = KeyRegistry(settings.keys_file)
        self.policy = load_policy_file(settings.policy_file)
        self.metrics = metrics
        self._limiter: Limiter | None = None

    def start(self, store: StateStore) -> None:
        """Called in `lifespan` once the app's state store exists."""
        self._limiter = Limiter(store, self.metrics)
        if self.registry.open:
            log.warning(
                "no API keys in %s: the gateway runs OPEN, /v1 requests need no key "
                "(create one with `sd-triton keys create --name NAME --keys-file %s`)",
                self.registry.path.resolve(),
                self.registry.path.resolve(),
            )
        else:
            log.info("API keys required (%s)", self.registry.path.resolve())

    @property
    def limiter(self) -> Limiter:
        if self._limiter is None:
            raise RuntimeError("AccessControl.start(store) was not called (app lifespan)")
        return self._limiter

    # --- per request ---

    async def authorize(self, headers: Headers, path: str) -> KeyContext:
        """The caller's key, counted against its rate limit; UnauthorizedError / RateLimitedError."""
        openai = path in OPENAI_IMAGE_ROUTES
        self.registry.refresh()
        if self.registry.open:
            return KeyContext(openai=openai)
        try:
            key = self.registry.authenticate(token_of(headers))
        except GatewayError:
            self.metrics.rejections.labels(reason="auth").inc()
            raise
        rate = await self.limiter.hit(key.id, key.rate_limit_per_min)
        return KeyContext(key, rate, openai)

    def rules(self, ctx: KeyContext) -> tuple[Rules, ...]:
        return (self.policy,) if ctx.key is None else (self.policy, self.registry.rules(ctx.key.id))

    def check_policy(self, ctx: KeyContext, prompts: Sequence[str], field: str | None = None) -> None:
        """ContentPolicyError (400) for the first prompt a rule refuses; `negative_prompt` is not checked."""
        violation = check(prompts, *self.rules(ctx))
        if violation is None:
            return
        field = field or ("prompt" if len(prompts) == 1 else "prompts")
        where = field if field == "prompt" else f"{field}[{violation.index}]"
        self.metrics.rejections.labels(reason="content_policy").inc()
        error = OpenAIContentPolicyError if ctx.openai else ContentPolicyError
        raise error(f"{where}: refused by the content policy (rule {violation.rule})", field=field)

    async def admit(
        self, ctx: KeyContext, prompts: Sequence[str], num_images: int, field: str | None = None
    ) -> Charge:
        """Policy, then quota: charge num_images x len(prompts) images, or refuse the whole request."""
        self.check_policy(ctx, prompts, field)
        return await self._charge(ctx, len(prompts) * num_images)

    async def _charge(self, ctx: KeyContext, images: int) -> Charge:
        if ctx.key is None:
            return Charge()
        return await self.limiter.charge(ctx.key.id, ctx.key.images_per_day, images)

    async def acquire_slot(self, key_id: str | None) -> Slot:
        """One of the key's concurrency slots (limit read from the registry now); a no-op slot for no
        key or an unlimited one. ConcurrencyLimitedError when all are held."""
        key = None if key_id is None else self.registry.get(key_id)
        if key is None:
            return Slot()
        return await self.limiter.acquire(key.id, key.max_concurrency)

    def webhook_secret(self, key_id: str) -> str | None:
        """The secret that signs webhooks of this key's jobs (None: no such key)."""
        self.registry.refresh()
        return self.registry.webhook_secret(key_id)

    @asynccontextmanager
    async def generation(
        self, ctx: KeyContext, prompts: Sequence[str], num_images: int, field: str | None = None
    ) -> AsyncIterator[Charge]:
        """Around a synchronous generation: policy, a concurrency slot, the quota charge; the charge
        is refunded when the block raises (no images delivered), the slot released in any case."""
        self.check_policy(ctx, prompts, field)
        slot = await self.acquire_slot(ctx.key_id)
        try:
            charge = await self._charge(ctx, len(prompts) * num_images)
            try:
                yield charge
            except Exception:
                await charge.refund()
                raise
        finally:
            await slot.release()


@dataclass(frozen=True)
class Access:
    """What a route gets from `AccessDep`: the caller and the app's access control."""

    control: AccessControl
    ctx: KeyContext

    def generation(
        self, prompts: Sequence[str], num_images: int, field: str | None = None
    ) -> AbstractAsyncContextManager[Charge]:
        return self.control.generation(self.ctx, prompts, num_images, field)

    async def admit(self, prompts: Sequence[str], num_images: int, field: str | None = None) -> Charge:
        return await self.control.admit(self.ctx, prompts, num_images, field)


def key_context(request: Request) -> KeyContext:
    """The caller, as `AccessMiddleware` found it (routes outside /v1: no key)."""
    ctx = getattr(request.state, "access", None)
    return ctx if isinstance(ctx, KeyContext) else KeyContext(openai=request.url.path in OPENAI_IMAGE_ROUTES)


class AccessMiddleware:
    """Authentication and the rate limit for every /v1 request, before routing; the X-RateLimit-*
    headers on every response to a keyed request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        control: AccessControl = scope["app"].state.access
        try:
            ctx = await control.authorize(Headers(scope=scope), scope["path"])
        except GatewayError as exc:
            _label_route(scope)
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["access"] = ctx
        if ctx.rate is None:
            await self.app(scope, receive, send)
            return
        rate_headers = ctx.rate.headers()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in rate_headers.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _label_route(scope: Scope) -> None:
    """Name the route of a request refused before routing, for the request metrics."""
    app = scope["app"]
    for route in getattr(app, "routes", ()):
        match, child = route.matches(scope)
        if match == Match.FULL:
            scope["route"] = child.get("route", route)
            return
