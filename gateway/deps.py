"""The route dependencies, as `Annotated` aliases: what each route gets from the app made by `create_app`
(its lifespan puts the resources on `app.state`). Tests override none of these: they pass their own
backend and store to `create_app` instead. Every one is `async def` though none awaits: FastAPI runs a
plain `def` dependency in its thread pool, a thread hop per dependency per request (issue 20)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request

from sd_triton.gateway.access.control import Access, AccessControl, key_context
from sd_triton.gateway.backend import TritonBackend
from sd_triton.gateway.jobs.manager import JobManager
from sd_triton.gateway.service import Generator
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.storage import ImageStorage


def _state(attribute: str) -> Any:
    """A dependency on one of the resources `create_app`'s lifespan put on `app.state`."""

    async def resource(request: Request) -> Any:
        return getattr(request.app.state, attribute)

    resource.__name__ = f"get_{attribute}"
    return Depends(resource)


async def get_access(request: Request) -> Access:
    control: AccessControl = request.app.state.access
    return Access(control, key_context(request))


async def cache_allowed(cache_control: Annotated[str | None, Header()] = None) -> bool:
    """`Cache-Control: no-cache` asks for a fresh generation (benchmarks, a retry after a bad image): no
    lookup, the fresh result stored; the response says `cache: "bypass"`."""
    return "no-cache" not in (cache_control or "").lower()


async def base_url(request: Request) -> str:
    """The base of links handed out (signed image URLs, job event URLs): the request's own."""
    return str(request.base_url)


SettingsDep = Annotated[GatewaySettings, _state("settings")]
BackendDep = Annotated[TritonBackend, _state("backend")]
GeneratorDep = Annotated[Generator, _state("generator")]
StorageDep = Annotated[ImageStorage, _state("storage")]
JobsDep = Annotated[JobManager, _state("jobs")]
AccessDep = Annotated[Access, Depends(get_access)]
CacheAllowedDep = Annotated[bool, Depends(cache_allowed)]
BaseUrlDep = Annotated[str, Depends(base_url)]
