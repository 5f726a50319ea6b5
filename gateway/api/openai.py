"""POST /v1/images/generations and /v1/images/edits: the OpenAI Images API, errors in OpenAI's shape."""

from __future__ import annotations

import base64
import contextlib
import io
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile

from sd_triton.gateway.api.generate import ERRORS
from sd_triton.gateway.deps import AccessDep, BaseUrlDep, GeneratorDep, SettingsDep, StorageDep
from sd_triton.gateway.errors import (
    OPENAI_EDITS_PATH,
    OPENAI_PATH,
    InvalidRequestError,
    OpenAIInvalidRequestError,
)
from sd_triton.gateway.images import open_image
from sd_triton.gateway.schemas import (
    SIZE,
    GenerateResponse,
    GenerationOptions,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from sd_triton.gateway.storage import ImageStorage

router = APIRouter(tags=["openai"])

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    **{k: v for k, v in ERRORS.items() if k != 422},
    400: {"description": "OpenAI's invalid_request_error: {error: {message, type, param, code}}"},
}
OPENAI_FIELDS = {"num_images": "n", "width": "size", "height": "size"}  # our field -> OpenAI's


def _size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" -> (width, height); None: the default."""
    if size is None:
        return None, None
    match = SIZE.match(size)
    if match is None:
        raise OpenAIInvalidRequestError(f'size: must look like "512x512", got {size!r}', field="size")
    return int(match.group(1)), int(match.group(2))


@contextlib.contextmanager
def _openai_fields() -> Iterator[None]:
    """Our InvalidRequestError as OpenAI's, naming OpenAI's field for ours."""
    try:
        yield
    except InvalidRequestError as exc:
        field = OPENAI_FIELDS.get(exc.field or "", exc.field)
        message = exc.message.replace(f"{exc.field}:", f"{field}:", 1)
        if field and not message.startswith(f"{field}:"):
            message = f"{field}: {message}"
        raise OpenAIInvalidRequestError(message, field=field) from None


async def _openai_response(
    result: GenerateResponse, response_format: str, storage: ImageStorage, base_url: str
) -> OpenAIImagesResponse:
    if response_format == "url":
        result = await storage.with_urls(result, base_url)
    data = [OpenAIImage(b64_json=image.base64, url=image.url) for image in result.images]
    return OpenAIImagesResponse(created=int(time.time()), data=data)


@router.post(OPENAI_PATH, response_model=OpenAIImagesResponse, responses=OPENAI_ERRORS)
async def openai_generations(
    body: OpenAIImageRequest,
    generator: GeneratorDep,
    storage: StorageDep,
    base_url: BaseUrlDep,
    access: AccessDep,
) -> OpenAIImagesResponse:
    """The OpenAI Images API: point an OpenAI client's base URL at this gateway."""
    width, height = _size(body.size)
    with _openai_fields():
        params = GenerationOptions(model=body.model, width=width, height=height, num_images=body.n)
        async with access.generation([body.prompt], body.n, field="prompt"):
            result = await generator.generate([body.prompt], params)
    return await _openai_response(result, body.response_format, storage, base_url)


def edit_mask(image: bytes, mask: bytes | None, max_pixels: int) -> str | None:
    """OpenAI's edit mask as ours (base64 PNG, white repainted): the transparent pixels (alpha < 128) of
    `mask`, or of the image itself without one; None (the whole image redrawn, image-to-image) when
    neither has transparency."""
    source = open_image(base64.b64encode(mask or image).decode(), "mask" if mask else "image", max_pixels)
    if "A" not in source.getbands() and source.info.get("transparency") is None:
        if mask is None:
            return None
        raise InvalidRequestError(
            "mask: must have transparency (its transparent pixels are edited)", field="mask"
        )
    alpha = source.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda a: 255 if a < 128 else 0)
    buffer = io.BytesIO()
    repaint.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@router.post(OPENAI_EDITS_PATH, response_model=OpenAIImagesResponse, responses=OPENAI_ERRORS)
async def openai_edits(
    generator: GeneratorDep,
    storage: StorageDep,
    base_url: BaseUrlDep,
    access: AccessDep,
    settings: SettingsDep,
    image: Annotated[
        UploadFile,
        File(description="PNG, JPEG or WebP; its transparent pixels are edited when no mask is sent"),
    ],
    prompt: Annotated[str, Form(min_length=1)],
    mask: Annotated[UploadFile | None, File(description="same size; transparent pixels are edited")] = None,
    n: Annotated[int, Form(ge=1)] = 1,
    size: Annotated[str | None, Form(description='"WIDTHxHEIGHT"; default: the image\'s')] = None,
    response_format: Annotated[Literal["b64_json", "url"], Form()] = "b64_json",
    strength: Annotated[float | None, Form(gt=0.0, le=1.0, description="ours: as on /v1/generate")] = None,
    model: Annotated[str | None, Form(max_length=200, description="as on /v1/images/generations")] = None,
    user: Annotated[str | None, Form()] = None,
) -> OpenAIImagesResponse:
    """OpenAI's image edit (`images.edit` of the official clients): the image and a mask whose
    transparent pixels are repainted (inpainting), or the image's own transparency; with neither, the
    whole image redrawn (image-to-image). Every upload is checked as on /v1/generate."""
    width, height = _size(size)
    image_bytes, mask_bytes = await image.read(), (await mask.read()) if mask is not None else None
    with _openai_fields():
        repaint = await generator.encoder.run(edit_mask, image_bytes, mask_bytes, settings.max_image_pixels)
        params = GenerationOptions(
            model=model,
            width=width,
            height=height,
            num_images=n,
            image=base64.b64encode(image_bytes).decode(),
            mask=repaint,
            strength=strength,
        )
        async with access.generation([prompt], n, field="prompt"):
            result = await generator.generate([prompt], params)
    return await _openai_response(result, response_format, storage, base_url)
