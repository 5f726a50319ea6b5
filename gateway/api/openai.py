"""POST /v1/images/generations: the OpenAI Images API, errors in OpenAI's shape."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from sd_triton.gateway.api.generate import ERRORS
from sd_triton.gateway.deps import AccessDep, BaseUrlDep, GeneratorDep, StorageDep
from sd_triton.gateway.errors import OPENAI_PATH, InvalidRequestError, OpenAIInvalidRequestError
from sd_triton.gateway.schemas import (
    SIZE,
    GenerationOptions,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)

router = APIRouter(tags=["openai"])

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    **{k: v for k, v in ERRORS.items() if k != 422},
    400: {"description": "OpenAI's invalid_request_error: {error: {message, type, param, code}}"},
}
OPENAI_FIELDS = {"num_images": "n", "width": "size", "height": "size"}  # our field -> OpenAI's


@router.post(OPENAI_PATH, response_model=OpenAIImagesResponse, responses=OPENAI_ERRORS)
async def openai_generations(
    body: OpenAIImageRequest,
    generator: GeneratorDep,
    storage: StorageDep,
    base_url: BaseUrlDep,
    access: AccessDep,
) -> OpenAIImagesResponse:
    """The OpenAI Images API: point an OpenAI client's base URL at this gateway."""
    width = height = None
    if body.size is not None:
        match = SIZE.match(body.size)
        assert match is not None  # checked by the schema
        width, height = int(match.group(1)), int(match.group(2))
    params = GenerationOptions(width=width, height=height, num_images=body.n)
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
        result = await storage.with_urls(result, base_url)
    data = [OpenAIImage(b64_json=image.base64, url=image.url) for image in result.images]
    return OpenAIImagesResponse(created=int(time.time()), data=data)
