"""The denoising loop with classifier-free guidance, the arithmetic of diffusers'
StableDiffusionPipeline, over any UNet callable (Triton BLS in production, ONNX Runtime in tests)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from sd_triton.pipeline_config import PipelineConfig
from sd_triton.requests import GenerationParams
from sd_triton.runtime.schedulers import make_scheduler

# (sample [B,C,h,w], timestep [B,1], encoder_hidden_states [B,77,D]) -> noise_pred [B,C,h,w]
UNetFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# (step index, number of steps) -> None
StepCallback = Callable[[int, int], None]


def _embeddings(prompt_embeds: np.ndarray, params: GenerationParams) -> torch.Tensor:
    """Rows [uncond, cond] (or [cond]) -> one row per UNet batch item, uncond images first."""
    embeds = torch.from_numpy(np.ascontiguousarray(prompt_embeds, dtype=np.float32))
    expected = 2 if params.classifier_free_guidance else 1
    if embeds.shape[0] != expected:
        raise ValueError(f"PROMPT_EMBEDS has {embeds.shape[0]} rows, expected {expected}")
    return embeds.repeat_interleave(params.num_images, dim=0)


def _step_kwargs(scheduler: object, generators: list[torch.Generator]) -> dict[str, object]:
    accepted = inspect.signature(scheduler.step).parameters  # type: ignore[attr-defined]
    kwargs: dict[str, object] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def denoise(
    prompt_embeds: np.ndarray,
    params: GenerationParams,
    config: PipelineConfig,
    unet: UNetFn,
    on_step: StepCallback | None = None,
) -> np.ndarray:
    """Latents for `params.num_images` images, divided by the VAE scaling factor.

    Image i is seeded with `params.seed + i` (one generator per image, as diffusers does with a
    list of generators), so any image can be reproduced alone.
    """
    # 1. A fresh scheduler from the checkpoint's config, with the request's number of steps.
    scheduler = make_scheduler(params.scheduler, config.scheduler_config)
    scheduler.set_timesteps(params.steps)
    cfg = params.classifier_free_guidance

    # 2. Text embeddings, one row per UNet batch item.
    embeds = _embeddings(prompt_embeds, params).numpy()

    # 3. Initial noise: one CPU generator per image.
    generators = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(params.num_images)]
    shape = (
        params.num_images,
        config.latent_channels,
        params.height // config.vae_scale_factor,
        params.width // config.vae_scale_factor,
    )
    latents = randn_tensor(shape, generator=generators, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators)

    # 4. The loop: cond and uncond in one UNet batch, guidance, scheduler step.
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        batch = model_input.shape[0]
        timestep = np.full((batch, 1), float(t), dtype=np.float32)
        noise = torch.from_numpy(unet(model_input.numpy(), timestep, embeds))
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + params.guidance_scale * (text - uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        if on_step is not None:
            on_step(i, len(timesteps))

    # 5. Undo the VAE's latent scaling, ready for the decoder.
    return (latents / config.vae_scaling_factor).numpy().astype(np.float32)
