"""The playground: a plain HTML/JS page at `/` (files in `gateway/static/`, no build step, nothing
from outside the gateway) and `GET /v1/info`, what the page needs to build its form from the served
model, and `GET /v1/models` (the OpenAI list shape). The page itself talks to the async jobs API."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd_triton.contract import MAX_LORA_SCALE, MAX_LORAS, SCHEDULERS
from sd_triton.gateway.deps import BackendDep, GeneratorDep, SettingsDep
from sd_triton.gateway.routing import listed, pick
from sd_triton.gateway.schemas import GenerationOptions
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.served_model import ServedModel

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"  # gateway/static: package data
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# the page is small and changes with the gateway: the browser revalidates it on every load
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter()


class InfoLimits(BaseModel):
    max_side: int = Field(..., description="largest width or height")
    spatial_multiple: int = Field(..., description="width and height must be multiples of it")
    max_steps: int
    max_images: int = Field(..., description="largest num_images")
    max_pixels: int = Field(..., description="largest width x height (the gateway's own limit)")
    max_prompt_chars: int
    max_loras: int = Field(MAX_LORAS, description="LoRA adapters per request at most")
    max_lora_scale: float = Field(MAX_LORA_SCALE, description="an adapter's scale is within ± this")


class InfoDefaults(BaseModel):
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    num_images: int
    output_format: str


class ModelFacts(BaseModel):
    """A served model's facts, as /v1/info and each /v1/models entry give them."""

    native_width: int
    native_height: int
    limits: InfoLimits
    schedulers: list[str]
    default_scheduler_class: str = Field(
        ..., examples=["PNDMScheduler"], description="the checkpoint's own scheduler: what `default` runs"
    )
    architecture: str = Field(
        "sd", examples=["sd", "sdxl"], description="sdxl: the model takes the size-conditioning fields"
    )
    controlnets: list[dict[str, Any]] = Field(
        default_factory=list,
        description="the ControlNets requests may name in `controlnets`: name, sha256, conditioning_channels",
    )
    max_clip_skip: int = Field(
        0, description="clip_skip at most (its text encoder's layers before the usual)"
    )
    embeddings: list[dict[str, Any]] = Field(
        default_factory=list,
        description="its textual-inversion embeddings (`sd-triton embeddings add`): a prompt writing `token` "
        "gets the learned vectors; token, sha256, vectors, format, source, created",
    )


class InfoResponse(ModelFacts):
    model: str = Field(..., examples=["sd-1.5"])
    defaults: InfoDefaults


class ModelCard(ModelFacts):
    """One entry of GET /v1/models (the OpenAI list shape, with the served model's own facts)."""

    id: str = Field(..., examples=["sd-1.5"], description="what a request's `model` names")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sd-triton"
    default: bool = Field(..., description="what a request without `model` gets")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _static_file(name: str) -> Path:
    """A file directly in `static/` with a known type; anything else (a path, a dotfile) is a 404."""
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise StarletteHTTPException(404, f"no static file {name!r}")
    return path


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=NO_CACHE)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    path = _static_file(name)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)


def _facts(served: ServedModel, settings: GatewaySettings) -> dict[str, Any]:
    """ModelFacts' fields for a served model."""
    limits = InfoLimits(
        max_side=served.limits.max_side,
        spatial_multiple=served.spatial_multiple,
        max_steps=served.limits.max_steps,
        max_images=served.limits.max_num_images,
        max_pixels=settings.max_pixels,
        max_prompt_chars=settings.max_prompt_chars,
    )
    return {
        "native_width": served.native_width,
        "native_height": served.native_height,
        "limits": limits,
        "schedulers": list(SCHEDULERS),
        "default_scheduler_class": served.default_scheduler,
        "architecture": served.architecture,
        "controlnets": served.controlnets,
        "max_clip_skip": served.max_clip_skip,
        "embeddings": served.embeddings,
    }


@router.get("/v1/info", response_model=InfoResponse, tags=["info"])
async def info(
    generator: GeneratorDep,
    settings: SettingsDep,
    model: str | None = Query(None, description="a served model's id; default: the default model"),
) -> InfoResponse:
    """A served model, its request limits, the schedulers and the defaults: what a client needs to
    build a form (the playground at `/` does)."""
    served = await generator.served(model)
    defaults = GenerationOptions()  # every field has its default: the same a request without it gets
    return InfoResponse(
        model=served.model,
        **_facts(served, settings),
        defaults=InfoDefaults(
            width=served.native_width,
            height=served.native_height,
            steps=defaults.steps,
            guidance_scale=defaults.guidance_scale,
            scheduler=defaults.scheduler,
            num_images=defaults.num_images,
            output_format=defaults.output_format,
        ),
    )


@router.get("/v1/models", response_model=ModelList, tags=["info"])
async def models(backend: BackendDep, settings: SettingsDep) -> ModelList:
    """Every served model in the OpenAI models-list shape (`client.models.list()`), the default first,
    each with its native size, limits, the scheduler names and the class `default` runs."""
    served = listed(await backend.served_models(), settings)
    cards = [
        ModelCard(id=model.model, default=index == 0, **_facts(model, settings))
        for index, model in enumerate(served)
    ]
    return ModelList(data=cards)


class LoraCard(BaseModel):
    """One adapter of a served model's library (`sd-triton lora add`)."""

    model: str = Field(..., description="the model whose library holds it (what `model` names)")
    name: str = Field(..., description="what a request's `loras` names")
    sha256: str = Field(..., description="of the file added")
    rank: int
    components: dict[str, int] = Field(..., description="targeted weights per checkpoint component")
    format: str = Field(..., examples=["diffusers", "kohya"])
    source: str = Field("", description="the file's name when added")
    created: str = ""


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]


@router.get("/v1/loras", response_model=LoraList, tags=["info"])
async def loras(
    backend: BackendDep,
    settings: SettingsDep,
    model: str | None = Query(None, description="one served model's; default: every model's"),
) -> LoraList:
    """The LoRA adapters requests may name in `loras`, per served model (read with the model configs)."""
    served = await backend.served_models()
    chosen = [pick(served, model, settings)] if model else listed(served, settings)
    fields = set(LoraCard.model_fields) - {"model"}
    cards = [
        LoraCard(model=m.model, **{k: v for k, v in adapter.items() if k in fields})
        for m in chosen
        for adapter in m.loras
    ]
    return LoraList(data=cards)
