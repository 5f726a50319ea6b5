"""The FastAPI app: routes, resources made in `lifespan`, dependencies, errors mapped in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd_triton import __version__
from sd_triton.gateway.access import Access, AccessControl, AccessDep, AccessMiddleware
from sd_triton.gateway.backend import TritonBackend
from sd_triton.gateway.cache import CacheAllowedDep, ResultCache
from sd_triton.gateway.errors import (
    GatewayError,
    InvalidRequestError,
    OpenAIInvalidRequestError,
    StateStoreUnavailableError,
)
from sd_triton.gateway.images import ImageEncoder
from sd_triton.gateway.jobs import JobManager
from sd_triton.gateway.jobs_api import router as jobs_router
from sd_triton.gateway.metrics import (
    GatewayMetrics,
    MetricsMiddleware,
    TritonMetricsScraper,
    triton_metrics_url,
)
from sd_triton.gateway.middleware import RequestGuardMiddleware
from sd_triton.gateway.openapi import with_served_limits
from sd_triton.gateway.playground import router as playground_router
from sd_triton.gateway.schemas import (
    SIZE,
    BatchRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationParams,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from sd_triton.gateway.service import Generator
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.state import StateStore, StateUnavailable, make_store
from sd_triton.gateway.storage import ImageStorage, make_storage, request_base_url
from sd_triton.gateway.storage import router as storage_router
from sd_triton.gateway.triton import GrpcTritonBackend

log = logging.getLogger("sd_triton.gateway")

ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "body over the size limit"},
    415: {"model": ErrorResponse, "description": "not application/json"},
    422: {"model": ErrorResponse, "description": "a field out of its limits; the message names both"},
    502: {"model": ErrorResponse, "description": "Triton answered with an error"},
    503: {"model": ErrorResponse, "description": "Triton unreachable or not ready; see Retry-After"},
}


OPENAI_PATH = "/v1/images/generations"
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    **{k: v for k, v in ERRORS.items() if k != 422},
    400: {"description": "OpenAI's invalid_request_error: {error: {message, type, param, code}}"},
}
OPENAI_FIELDS = {"num_images": "n", "width": "size", "height": "size"}


def get_generator(request: Request) -> Generator:
    return request.app.state.generator  # type: ignore[no-any-return]


def get_backend(request: Request) -> TritonBackend:
    return request.app.state.backend  # type: ignore[no-any-return]


def get_store(request: Request) -> StateStore:
    return request.app.state.store  # type: ignore[no-any-return]


def get_storage(request: Request) -> ImageStorage:
    return request.app.state.storage  # type: ignore[no-any-return]


StoreDep = Annotated[StateStore, Depends(get_store)]


GeneratorDep = Annotated[Generator, Depends(get_generator)]
StorageDep = Annotated[ImageStorage, Depends(get_storage)]
BackendDep = Annotated[TritonBackend, Depends(get_backend)]


def _validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    parts, first_field = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        elif error.get("type") == "json_invalid":
            field, message = "body", f"invalid JSON: {error.get('ctx', {}).get('error', message)}"
        first_field = first_field or field
        parts.append(f"{field}: {message}")
    return "; ".join(parts), first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StateUnavailable)
    async def state_unavailable(request: Request, exc: StateUnavailable) -> JSONResponse:
        # limits, quotas and the cache fail open on their own; what gets here needs the store (jobs)
        headers = {"Retry-After": str(request.app.state.settings.retry_after_s)}
        return await gateway_error(
            request, StateStoreUnavailableError(f"state store: {exc}", headers=headers)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 4xx (an unparseable body, an unknown route, a wrong method), in our shape
        message = f"body: {exc.detail}" if exc.status_code == 400 else str(exc.detail)
        kind = "invalid_request" if exc.status_code < 500 else "internal_error"
        body = {"error": {"type": kind, "message": message}}
        if request.url.path == OPENAI_PATH and exc.status_code < 500:
            field = "body" if exc.status_code == 400 else None
            body = OpenAIInvalidRequestError(message, field=field).body()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def validation_error(
        request: Request, exc: RequestValidationError | ValidationError
    ) -> JSONResponse:
        message, field = _validation_message(exc)
        error_class = OpenAIInvalidRequestError if request.url.path == OPENAI_PATH else InvalidRequestError
        return await gateway_error(request, error_class(message, field=field))


async def _generate(
    prompts: list[str],
    field: str,
    body: GenerateRequest | BatchRequest,
    generator: Generator,
    storage: ImageStorage,
    request: Request,
    access: Access,
    use_cache: bool,
) -> GenerateResponse:
    """The generate routes: admitted by the key's limits (errors name `field`), generated, then stored
    and linked when `response_format` is `url`."""
    async with access.generation(prompts, body.num_images, field=field):
        result = await generator.generate(prompts, body, use_cache=use_cache)
    if body.response_format == "url":
        return await storage.with_urls(result, request_base_url(request))
    return result


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
        triton = backend or GrpcTritonBackend(settings, metrics)
        triton.start()  # health checks: endpoints in and out of rotation
        encoder = ImageEncoder(settings.encode_workers)
        state = store or make_store(settings.redis_url, settings.memory_store_max_bytes)
        app.state.store = state
        access.start(state)  # per-key limits on the shared store
        app.state.backend = triton
        storage = make_storage(settings)
        app.state.storage = storage
        cleanup = asyncio.create_task(storage.run_cleanup(settings.storage_cleanup_interval_s))
        scraper_url = triton_metrics_url(settings.triton_url, settings.triton_metrics_url)
        app.state.triton_metrics = TritonMetricsScraper(
            scraper_url, settings.triton_metrics_timeout_s, metrics
        )
        cache = ResultCache(state, settings, metrics)
        app.state.generator = Generator(triton, encoder, settings, metrics, cache)
        jobs = JobManager(state, app.state.generator, settings, metrics, webhook_secret, storage)
        app.state.jobs = jobs
        jobs.start()
        log.info("gateway up; Triton at %s", settings.triton_url)
        try:
            yield
        finally:
            await jobs.close()
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup
            await storage.close()
            await app.state.triton_metrics.close()
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
    app.add_middleware(RequestGuardMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AccessMiddleware)  # API key + rate limit of every /v1 request
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(storage_router)  # GET /v1/images/{id}.{ext}: stored images by signed link
    app.include_router(playground_router)  # the page at /, its files, GET /v1/info
    app.include_router(jobs_router)  # /v1/jobs: async jobs, their events (SSE), cancel

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, tags=["generate"])
    async def generate(
        body: GenerateRequest,
        generator: GeneratorDep,
        storage: StorageDep,
        request: Request,
        access: AccessDep,
        use_cache: CacheAllowedDep,
    ) -> GenerateResponse:
        """Images for one prompt. A seeded request may be answered from the cache (`cache: hit`)
        unless it sends `Cache-Control: no-cache`."""
        return await _generate([body.prompt], "prompt", body, generator, storage, request, access, use_cache)

    @app.post("/v1/generate/batch", response_model=GenerateResponse, responses=ERRORS, tags=["generate"])
    async def generate_batch(
        body: BatchRequest,
        generator: GeneratorDep,
        storage: StorageDep,
        request: Request,
        access: AccessDep,
        use_cache: CacheAllowedDep,
    ) -> GenerateResponse:
        """Images for several prompts, in prompt order (`prompt_index`); prompt j's images use seeds
        from seed + j * num_images. The prompts are sent to Triton together."""
        return await _generate(body.prompts, "prompts", body, generator, storage, request, access, use_cache)

    @app.post(OPENAI_PATH, response_model=OpenAIImagesResponse, responses=OPENAI_ERRORS, tags=["openai"])
    async def openai_generations(
        body: OpenAIImageRequest,
        generator: GeneratorDep,
        storage: StorageDep,
        request: Request,
        access: AccessDep,
    ) -> OpenAIImagesResponse:
        """The OpenAI Images API: point an OpenAI client's base URL at this gateway."""
        width = height = None
        if body.size is not None:
            match = SIZE.match(body.size)
            assert match is not None  # checked by the schema
            width, height = int(match.group(1)), int(match.group(2))
        params = GenerationParams(width=width, height=height, num_images=body.n)
        try:
            async with access.generation([body.prompt], body.n, field="prompt"):
                result = await generator.generate([body.prompt], params)
        except InvalidRequestError as exc:  # name the OpenAI field, not ours
            field = OPENAI_FIELDS.get(exc.field or "", exc.field)
            message = exc.message.replace(f"{exc.field}:", f"{field}:", 1)
            if field and not message.startswith(f"{field}:"):
                message = f"{field}: {message}"
            raise OpenAIInvalidRequestError(message, field=field) from None
        if body.response_format == "url":
            result = await storage.with_urls(result, request_base_url(request))
        data = [OpenAIImage(b64_json=image.base64, url=image.url) for image in result.images]
        return OpenAIImagesResponse(created=int(time.time()), data=data)

    # the OpenAPI document with the served model's limits (gateway/openapi.py) in place of FastAPI's
    # static one, which stays the answer while Triton cannot say what it serves
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != app.openapi_url]

    @app.get(app.openapi_url or "/openapi.json", include_in_schema=False)
    async def openapi_document(backend: BackendDep) -> JSONResponse:
        schema = app.openapi()
        try:
            served = await backend.served_model()
        except GatewayError:
            return JSONResponse(schema)
        return JSONResponse(with_served_limits(schema, served, settings))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "Triton or txt2img not ready"}})
    async def readyz(backend: BackendDep) -> JSONResponse:
        """Some Triton endpoint is reachable with txt2img ready; `endpoints` says which are in rotation."""
        ready = await backend.ready()
        body = {
            "status": "ready" if ready else "not ready",
            "triton_url": settings.triton_url,
            "endpoints": backend.endpoint_states(),
        }
        if ready:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics: requests by route and status, latency, images, in flight, cache, GPU memory."""
        await request.app.state.triton_metrics.scrape()  # GPU memory, from Triton's metrics endpoint
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
