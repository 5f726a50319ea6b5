"""gateway/images.py: PNG results at any zlib level carry the same pixels; the level is a setting."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from pydantic import ValidationError

from sd_triton.gateway.images import encode
from sd_triton.gateway.settings import GatewaySettings
from tests.gateway.test_jobs import png


def test_every_png_level_keeps_the_pixels_and_higher_levels_are_smaller() -> None:
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 96 * 96 * 3).reshape(96, 96, 3)
    image = np.clip(smooth + rng.integers(-3, 4, smooth.shape), 0, 255).astype(np.uint8)
    encoded = {level: encode(image, "png", level) for level in (0, 1, 9)}
    for level, data in encoded.items():
        assert np.array_equal(png(data), image), level
    sizes = {level: len(base64.b64decode(data)) for level, data in encoded.items()}
    assert sizes[9] < sizes[1] < sizes[0], sizes


def test_the_level_is_a_checked_setting() -> None:
    assert GatewaySettings().png_compress_level == 1
    with pytest.raises(ValidationError, match="png_compress_level"):
        GatewaySettings(png_compress_level=10)
