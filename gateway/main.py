"""The FastAPI app: `create_app` makes the resources in its lifespan (a Triton backend, the state store,
storage, jobs) and includes one router per resource (gateway/api/); `serve` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from sd_triton import __version__
from sd_triton.gateway.access.control import AccessControl, AccessMiddleware
from sd_triton.gateway.api import generate, images, jobs, openai, ops, playground
from sd_triton.gateway.api.errors import install_error_handlers
from sd_triton.gateway.backend import TritonBackend
from sd_triton.gateway.cache import ResultCache
from sd_triton.gateway.images import ImageEncoder
from sd_triton.gateway.jobs.manager import JobManager
from sd_triton.gateway.metrics import (
    GatewayMetrics,
    MetricsMiddleware,
    TritonMetricsScraper,
    triton_metrics_url,
)
from sd_triton.gateway.middleware import RequestGuardMiddleware
from sd_triton.gateway.service import Generator
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.state import StateStore, make_store
from sd_triton.gateway.storage import make_storage
from sd_triton.gateway.triton.backend import GrpcTritonBackend

log = logging.getLogger("sd_triton.gateway")


def create_app(
    settings: GatewaySettings | None = None,
    *,
    backend: TritonBackend | None = None,
    store: StateStore | None = None,
) -> FastAPI:
    """The gateway. `backend`: what answers for Triton (default: gRPC to `settings.triton_url`);
    `store`: the shared state (default: Redis when `redis_url` is set, else memory). Both are made,
    started and closed in the app's lifespan."""
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()
    access = AccessControl(settings, metrics)  # a bad keys or policy file stops the startup here

    def webhook_secret(key_id: str | None) -> str | None:
        if key_id is not None:
            return access.webhook_secret(key_id)
        return None if settings.webhook_secret is None else settings.webhook_secret.get_secret_value()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # 1. Triton (health checks: endpoints in and out of rotation) and the shared state.
        app.state.backend = triton = backend or GrpcTritonBackend(settings, metrics)
        triton.start()
        app.state.store = state = store or make_store(settings.redis_url, settings.memory_store_max_bytes)
        access.start(state)  # per-key limits on the shared store
        # 2. Stored images, Triton's metrics, the generator with its cache.
        app.state.storage = storage = make_storage(settings)
        cleanup = asyncio.create_task(storage.run_cleanup(settings.storage_cleanup_interval_s))
        scraper_url = triton_metrics_url(settings.triton_url, settings.triton_metrics_url)
        scraper = TritonMetricsScraper(scraper_url, settings.triton_metrics_timeout_s, metrics)
        app.state.triton_metrics = scraper
        encoder = ImageEncoder(settings.encode_workers, settings.png_compress_level)
        cache = ResultCache(state, settings, metrics)
        app.state.generator = generator = Generator(triton, encoder, settings, metrics, cache)
        # 3. The job runners.
        manager = JobManager(state, generator, settings, metrics, webhook_secret, storage)
        app.state.jobs = manager
        manager.start()
        log.info("gateway up; Triton at %s", settings.triton_url)
        try:
            yield
        finally:
            await manager.close()
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup
            await storage.close()
            await scraper.close()
            encoder.close()
            await triton.close()
            await state.close()

    # FastAPIOffline: /docs and /redoc with their scripts and styles served by the gateway itself (under
    # /static-offline-docs), not from a CDN: they render on a machine without internet
    app = FastAPIOffline(
        title="sd-triton gateway",
        version=__version__,
        description="Text-to-image over NVIDIA Triton: JSON prompts in, images out.",
        lifespan=lifespan,
    )
    app.state.access = access
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(RequestGuardMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AccessMiddleware)  # API key + rate limit of every /v1 request
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    # FastAPI's static /openapi.json gives way to the one with the served model's limits (api/ops.py)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != app.openapi_url]
    for router in (generate.router, openai.router, jobs.router, images.router, playground.router, ops.router):
        # the routes themselves, flat (FastAPI's include_router keeps a lazy router object): the access
        # middleware names the route of a request it refuses before routing, for the request metrics
        app.router.routes.extend(router.routes)
    return app


def serve(settings: GatewaySettings | None = None) -> None:
    """Serve the app with uvicorn (`sd-triton gateway`, `python -m sd_triton.gateway`). At SIGTERM it
    stops accepting connections, lets the requests in flight finish for up to `shutdown_grace_s`
    (later ones are cancelled, their Triton calls with them), lets running jobs finish for up to
    `job_drain_s`, and exits 0."""
    import uvicorn

    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn raises the signal it stopped on again once it is done; handled here, that is exit 0
    signal.signal(signal.SIGTERM, stopped)
    settings = settings or GatewaySettings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
