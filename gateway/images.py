"""Image encoding, off the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "png": {"format": "PNG"},
    "jpeg": {"format": "JPEG", "quality": 92},
    "webp": {"format": "WEBP", "quality": 92},
}


def encode(image: np.ndarray[Any, Any], output_format: str) -> str:
    """uint8 [H, W, 3] -> base64 of the encoded file."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **_SAVE_OPTIONS[output_format])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ImageEncoder:
    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode")

    async def encode_all(self, images: list[np.ndarray[Any, Any]], output_format: str) -> list[str]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, encode, image, output_format) for image in images]
        return list(await asyncio.gather(*jobs))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
