"""UINT8 NHWC images to and from the VAE, the arithmetic of diffusers' image processor."""

from __future__ import annotations

import numpy as np


def to_uint8_images(decoded: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] float in about [-1, 1] -> [N, H, W, 3] uint8."""
    images = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def from_uint8_images(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32 in [-1, 1], the VAE encoder's input."""
    scaled = images.astype(np.float32) / 255.0
    return np.ascontiguousarray((scaled * 2.0 - 1.0).transpose(0, 3, 1, 2))
