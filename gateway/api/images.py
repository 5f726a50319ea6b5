"""GET /v1/images/{name}: a stored image by its signed link (no API key)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from sd_triton.gateway.deps import StorageDep
from sd_triton.gateway.errors import NotFoundError
from sd_triton.gateway.images import CONTENT_TYPES
from sd_triton.gateway.storage import LocalStorage

router = APIRouter(tags=["images"])


@router.get(
    "/v1/images/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {t: {} for t in CONTENT_TYPES.values()}, "description": "the image"},
        403: {"description": "signature missing or wrong"},
        404: {"description": "no such image, or expired"},
    },
)
async def stored_image(
    storage: StorageDep,
    name: str,
    expires: Annotated[str | None, Query(description="unix seconds, as in the handed-out URL")] = None,
    signature: Annotated[str | None, Query(description="HMAC of name and expiry")] = None,
) -> FileResponse:
    """A stored image by its signed link (no API key needed). Links to S3 go to the bucket instead."""
    if not isinstance(storage, LocalStorage):
        raise NotFoundError(f"image {name!r}: images are stored in S3; use the presigned URL")
    path = await asyncio.to_thread(storage.resolve, name, expires, signature)
    max_age = max(0, int(expires or 0) - int(time.time()))
    ext = name.rsplit(".", 1)[1]
    return FileResponse(
        path, media_type=CONTENT_TYPES[ext], headers={"Cache-Control": f"private, max-age={max_age}"}
    )
