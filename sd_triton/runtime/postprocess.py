"""VAE output to UINT8 NHWC images, the arithmetic of diffusers' image processor."""

from __future__ import annotations

import numpy as np


def to_uint8_images(decoded: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] float in about [-1, 1] -> [N, H, W, 3] uint8."""
    images = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
