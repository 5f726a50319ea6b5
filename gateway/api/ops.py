"""What operators and machines ask: /healthz, /readyz, /metrics, and /openapi.json with the served
model's limits (gateway/openapi.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sd_triton.gateway.deps import BackendDep, GeneratorDep, SettingsDep
from sd_triton.gateway.errors import GatewayError
from sd_triton.gateway.openapi import with_served_limits

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Triton or txt2img not ready"}})
async def readyz(backend: BackendDep, settings: SettingsDep) -> JSONResponse:
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


@router.get("/metrics", response_class=Response)
async def prometheus(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency, images, in flight, cache, GPU memory."""
    await request.app.state.triton_metrics.scrape()  # GPU memory, from Triton's metrics endpoint
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request, generator: GeneratorDep, settings: SettingsDep) -> JSONResponse:
    """FastAPI's document plus the default model's limits; the static one while Triton cannot say what it
    serves. `create_app` turns FastAPI's own /openapi.json off for this one."""
    schema = request.app.openapi()
    try:
        served = await generator.served()
    except GatewayError:
        return JSONResponse(schema)
    return JSONResponse(with_served_limits(schema, served, settings))
