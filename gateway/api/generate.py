"""POST /v1/generate and /v1/generate/batch: images for one prompt or several, in one response."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from sd_triton.gateway.deps import AccessDep, BaseUrlDep, CacheAllowedDep, GeneratorDep, StorageDep
from sd_triton.gateway.schemas import BatchRequest, ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter(tags=["generate"])

ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "body over the size limit"},
    415: {"model": ErrorResponse, "description": "not application/json"},
    422: {"model": ErrorResponse, "description": "a field out of its limits; the message names both"},
    502: {"model": ErrorResponse, "description": "Triton answered with an error"},
    503: {"model": ErrorResponse, "description": "Triton unreachable or not ready; see Retry-After"},
}


async def _generate(
    prompts: list[str],
    field: str,
    body: GenerateRequest | BatchRequest,
    generator: GeneratorDep,
    storage: StorageDep,
    base_url: str,
    access: AccessDep,
    use_cache: bool,
) -> GenerateResponse:
    """Admitted by the key's limits (errors name `field`), generated, then stored and linked when
    `response_format` is `url`."""
    async with access.generation(prompts, body.num_images, field=field):
        result = await generator.generate(prompts, body, use_cache=use_cache)
    if body.response_format == "url":
        return await storage.with_urls(result, base_url)
    return result


@router.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(
    body: GenerateRequest,
    generator: GeneratorDep,
    storage: StorageDep,
    base_url: BaseUrlDep,
    access: AccessDep,
    use_cache: CacheAllowedDep,
) -> GenerateResponse:
    """Images for one prompt. A seeded request may be answered from the cache (`cache: hit`)
    unless it sends `Cache-Control: no-cache`."""
    return await _generate([body.prompt], "prompt", body, generator, storage, base_url, access, use_cache)


@router.post("/v1/generate/batch", response_model=GenerateResponse, responses=ERRORS)
async def generate_batch(
    body: BatchRequest,
    generator: GeneratorDep,
    storage: StorageDep,
    base_url: BaseUrlDep,
    access: AccessDep,
    use_cache: CacheAllowedDep,
) -> GenerateResponse:
    """Images for several prompts, in prompt order (`prompt_index`); prompt j's images use seeds
    from seed + j * num_images. The prompts are sent to Triton together."""
    return await _generate(body.prompts, "prompts", body, generator, storage, base_url, access, use_cache)
