"""Step previews: the linear latent -> RGB map fitted at export against the VAE decoder."""

from __future__ import annotations

import numpy as np
import pytest

from sd_triton import contract as c
from sd_triton.export.preview import fit_preview_weights
from sd_triton.pipeline_config import PipelineConfig
from sd_triton.runtime.local import LocalPipeline
from sd_triton.runtime.postprocess import to_uint8_images
from sd_triton.runtime.preview import preview_images


def test_preview_approximates_the_pooled_vae_decode(exported: dict) -> None:
    repo = exported["repo"]
    config = PipelineConfig.load(repo / c.TXT2IMG_STREAM.name / "1" / "pipeline.json")
    assert config.preview_weights is not None
    local = LocalPipeline(repo)
    latents = np.random.default_rng(5).standard_normal((2, config.latent_channels, 6, 5)).astype(np.float32)
    previews = preview_images(latents, config.preview_weights)
    assert previews.shape == (2, 6, 5, 3) and previews.dtype == np.uint8
    decoded = to_uint8_images(local._run(c.VAE_DECODER.name, latents / config.vae_scaling_factor))
    pooled = decoded.reshape(2, 6, 8, 5, 8, 3).mean(axis=(2, 4))
    error = np.abs(previews.astype(float) - pooled).mean()
    # a cheap map, not a decoder: closer to the real decode than a flat grey image is
    baseline = np.abs(pooled - pooled.mean()).mean()
    assert error < baseline, (error, baseline)
    # the same weights again from the same export (stable, so re-exports do not churn)
    refit = fit_preview_weights(
        repo / c.VAE_DECODER.name / "1" / "model.onnx",
        config.latent_channels,
        config.vae_scale_factor,
        config.vae_scaling_factor,
    )
    assert refit == config.preview_weights


def test_preview_weights_must_match_the_channels() -> None:
    with pytest.raises(ValueError, match="5x3 for 4 channels"):
        preview_images(np.zeros((1, 4, 2, 2), np.float32), [[0.0, 0.0, 0.0]] * 3)
