"""Closed-form steps for the schedulers whose update is linear in the latents and the model output.

DDIM (eta 0, no clipping or thresholding) and Euler (no churn) step as
`latents' = a[i] * latents + b[i] * output`, the UNet fed `latents / divisor[i]`, with a, b and the
divisor depending only on the step i and the scheduler's config. `LinearStep` holds those numbers for
one request's steps, computed once from the scheduler's own arrays (its alphas or sigmas, so every
timestep spacing, beta schedule, Karras sigmas or zero-SNR rescale the config asks for carries over);
`sd_triton.runtime.denoise.advance_jobs` then steps every such request of a UNet call in one array
operation instead of one diffusers `step` call each (0.13-0.27 ms of Python per request and step).
Every other scheduler, or any option outside these formulas, steps through diffusers. A test
checks the two against each other for each supported config (tests/sd_triton/test_runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler


@dataclass(frozen=True)
class LinearStep:
    divisor: np.ndarray  # float32 [steps]: the UNet's input is latents / divisor[i]
    a: np.ndarray  # float32 [steps]: the next latents are a[i] * latents + b[i] * guided output
    b: np.ndarray


def linear_step(scheduler: object, eta: float = 0.0) -> LinearStep | None:
    """The closed form of `scheduler`'s steps after `set_timesteps`, or None where it has none."""
    if type(scheduler) is DDIMScheduler:
        return _ddim(scheduler, eta)
    if type(scheduler) is EulerDiscreteScheduler:
        return _euler(scheduler)
    return None


def _float32(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(a, dtype=np.float32) for a in arrays)


def _ddim(scheduler: DDIMScheduler, eta: float) -> LinearStep | None:
    config = scheduler.config
    prediction = config.prediction_type
    if eta != 0 or config.clip_sample or config.thresholding or prediction not in _DDIM_FORMS:
        return None
    alphas = scheduler.alphas_cumprod.double().numpy()
    final = float(scheduler.final_alpha_cumprod)
    timesteps = scheduler.timesteps.numpy().astype(np.int64)
    stride = config.num_train_timesteps // scheduler.num_inference_steps  # as DDIMScheduler.step
    alpha = alphas[timesteps]
    alpha_prev = np.array([alphas[t - stride] if t - stride >= 0 else final for t in timesteps])
    a, b = _DDIM_FORMS[prediction](
        np.sqrt(alpha), np.sqrt(1 - alpha), np.sqrt(alpha_prev), np.sqrt(1 - alpha_prev)
    )
    return LinearStep(*_float32(np.ones_like(a), a, b))


# prediction type -> (a, b) from sqrt(alpha_t), sqrt(1 - alpha_t), and the same at the previous timestep:
# DDIM's prev = sqrt(alpha_prev) * x0 + sqrt(1 - alpha_prev) * eps, x0 and eps written out per type
_DDIM_FORMS = {
    "epsilon": lambda s, r, sp, rp: (sp / s, rp - sp * r / s),
    "sample": lambda s, r, sp, rp: (rp / r, sp - rp * s / r),
    "v_prediction": lambda s, r, sp, rp: (sp * s + rp * r, rp * s - sp * r),
}


def _euler(scheduler: EulerDiscreteScheduler) -> LinearStep | None:
    prediction = scheduler.config.prediction_type
    timesteps = scheduler.timesteps
    # the step index follows the timesteps from the first (diffusers starts at a repeated timestep's
    # second occurrence, which the formulas below would not follow)
    if prediction not in _EULER_FORMS or len(set(timesteps.tolist())) != len(timesteps):
        return None
    sigmas32 = scheduler.sigmas.to(torch.float32)
    steps = len(timesteps)
    # the same float32 arithmetic as scale_model_input, so the UNet's input is bit for bit diffusers'
    divisor = ((sigmas32[:steps] ** 2 + 1) ** 0.5).numpy()
    sigma = sigmas32.double().numpy()
    a, b = _EULER_FORMS[prediction](sigma[:steps], sigma[1 : steps + 1] - sigma[:steps])
    return LinearStep(*_float32(divisor, a, b))


# prediction type -> (a, b) from sigma and dt = next sigma - sigma: Euler's prev = x + dt * (x - x0) / sigma
_EULER_FORMS = {
    "epsilon": lambda sigma, dt: (np.ones_like(sigma), dt),
    "sample": lambda sigma, dt: (1 + dt / sigma, -dt / sigma),
    "original_sample": lambda sigma, dt: (1 + dt / sigma, -dt / sigma),
    "v_prediction": lambda sigma, dt: (1 + dt * sigma / (sigma**2 + 1), dt / np.sqrt(sigma**2 + 1)),
}
