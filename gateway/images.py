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


def encode(image: np.ndarray[Any, Any], output_format: str, png_compress_level: int = 1) -> str:
    """uint8 [H, W, 3] -> base64 of the encoded file. PNG is lossless at every zlib level; level 1
    (the gateway's default) encoded a 512x512 photograph in 22 ms here where Pillow's default 6 took
    76 ms, for a file 7 % larger (README, `PNG_COMPRESS_LEVEL`)."""
    buffer = io.BytesIO()
    options = _SAVE_OPTIONS[output_format]
    if output_format == "png":
        options = {**options, "compress_level": png_compress_level}
    Image.fromarray(image).save(buffer, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ImageEncoder:
    def __init__(self, workers: int, png_compress_level: int = 1) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode")
        self.png_compress_level = png_compress_level

    async def encode_all(self, images: list[np.ndarray[Any, Any]], output_format: str) -> list[str]:
        loop = asyncio.get_running_loop()
        level = self.png_compress_level
        jobs = [loop.run_in_executor(self.pool, encode, image, output_format, level) for image in images]
        return list(await asyncio.gather(*jobs))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
