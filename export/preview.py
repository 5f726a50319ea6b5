"""The linear latent -> RGB map behind step previews (sd_triton/runtime/preview.py), fitted by
least squares against the exported VAE decoder: random model-space latents are decoded, the images
average-pooled to latent resolution, and RGB in [0, 1] regressed on the latent channels plus a bias."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sd_triton.runtime.ort_runner import OrtRunner

log = logging.getLogger(__name__)


def fit_preview_weights(
    vae_onnx: Path, latent_channels: int, scale_factor: int, scaling_factor: float, side: int = 16
) -> list[list[float]]:
    """Weights [C + 1][3] (the last row is the bias), rounded to 4 decimals so a re-export is stable."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((4, latent_channels, side, side)).astype(np.float32)
    runner = OrtRunner(vae_onnx, device="cpu")
    decoded = runner.run({"latent_sample": latents / scaling_factor})["sample"]  # [N, 3, H, W], ~[-1, 1]
    rgb = np.clip((decoded + 1) / 2, 0, 1)
    n, _, height, width = rgb.shape
    pooled = rgb.reshape(n, 3, height // scale_factor, scale_factor, width // scale_factor, scale_factor)
    pooled = pooled.mean(axis=(3, 5))  # [N, 3, h, w]
    x = latents.transpose(0, 2, 3, 1).reshape(-1, latent_channels)
    x = np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1)
    y = pooled.transpose(0, 2, 3, 1).reshape(-1, 3)
    weights, *_ = np.linalg.lstsq(x, y, rcond=None)
    fitted = np.clip(x @ weights, 0, 1)
    log.info(
        "  preview map: mean abs error %.3f on [0, 1] RGB at latent resolution", np.abs(fitted - y).mean()
    )
    return [[round(float(v), 4) for v in row] for row in weights]
