"""Closed-form steps for the schedulers whose update is linear in the latents and the model output.

With the UNet fed `latents / divisor[i]`, step i of
- DDIM (eta 0, no clipping or thresholding) and Euler (no churn) is
  `latents' = a[i] * latents + b[i] * output`;
- Euler a adds `noise[i]` times a draw from the request's own generators, drawn as diffusers draws it;
- DPM++ 2M (DPMSolverMultistep, `dpmsolver++`, order 2, midpoint or heun) adds the previous step's data
  prediction, which the request keeps: `+ c[i] * x0_prev`, with `x0 = p[i] * latents + q[i] * output`.
The numbers depend only on the step and the scheduler's config: `LinearStep` holds them for one
request's steps, computed once from the scheduler's own arrays (its alphas or sigmas, so every timestep
spacing, beta schedule, Karras sigmas, final sigma or zero-SNR rescale the config asks for carries
over). `sd_triton.runtime.denoise.advance_jobs` then steps every such request of a UNet call in one
array operation instead of one diffusers `step` call each (0.13-0.27 ms of Python per request and
step). Every other scheduler, or any option outside these formulas, steps through diffusers. A test
checks the two against each other for each supported config (tests/sd_triton/test_runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)


@dataclass(frozen=True)
class LinearStep:
    divisor: np.ndarray  # float32 [steps]: the UNet's input is latents / divisor[i]
    a: np.ndarray  # float32 [steps]: the next latents are a[i] * latents + b[i] * guided output
    b: np.ndarray
    # multistep (DPM++ 2M): + c[i] * the previous step's x0, where x0 = p[i] * latents + q[i] * output
    c: np.ndarray | None = None
    p: np.ndarray | None = None
    q: np.ndarray | None = None
    # ancestral (Euler a): + noise[i] * a standard normal draw from the request's own generators
    noise: np.ndarray | None = None


def linear_step(scheduler: object, eta: float = 0.0) -> LinearStep | None:
    """The closed form of `scheduler`'s steps after `set_timesteps`, or None where it has none."""
    if type(scheduler) is DDIMScheduler:
        return _ddim(scheduler, eta)
    if type(scheduler) is EulerDiscreteScheduler:
        return _euler(scheduler)
    if type(scheduler) is EulerAncestralDiscreteScheduler:
        return _euler(scheduler, ancestral=True)
    if type(scheduler) is DPMSolverMultistepScheduler:
        return _dpmpp_2m(scheduler)
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


def _euler(
    scheduler: EulerDiscreteScheduler | EulerAncestralDiscreteScheduler, ancestral: bool = False
) -> LinearStep | None:
    prediction = scheduler.config.prediction_type
    timesteps = scheduler.timesteps
    # the step index follows the timesteps from the first (diffusers starts at a repeated timestep's
    # second occurrence, which the formulas below would not follow); Euler a has no "sample" form
    forms = _EULER_FORMS if not ancestral else {k: v for k, v in _EULER_FORMS.items() if "sample" not in k}
    if prediction not in forms or len(set(timesteps.tolist())) != len(timesteps):
        return None
    sigmas32 = scheduler.sigmas.to(torch.float32)
    steps = len(timesteps)
    # the same float32 arithmetic as scale_model_input, so the UNet's input is bit for bit diffusers'
    divisor = ((sigmas32[:steps] ** 2 + 1) ** 0.5).numpy()
    sigma = sigmas32.double().numpy()
    now, then = sigma[:steps], sigma[1 : steps + 1]
    if not ancestral:
        a, b = forms[prediction](now, then - now)
        return LinearStep(*_float32(divisor, a, b))
    # Euler a steps to sigma_down and adds sigma_up of fresh noise
    up = np.sqrt(then**2 * (now**2 - then**2) / now**2)
    a, b = forms[prediction](now, np.sqrt(then**2 - up**2) - now)
    divisor, a, b, up = _float32(divisor, a, b, up)
    return LinearStep(divisor, a, b, noise=up)


# prediction type -> (a, b) from sigma and dt = next sigma - sigma: Euler's prev = x + dt * (x - x0) / sigma
_EULER_FORMS = {
    "epsilon": lambda sigma, dt: (np.ones_like(sigma), dt),
    "sample": lambda sigma, dt: (1 + dt / sigma, -dt / sigma),
    "original_sample": lambda sigma, dt: (1 + dt / sigma, -dt / sigma),
    "v_prediction": lambda sigma, dt: (1 + dt * sigma / (sigma**2 + 1), dt / np.sqrt(sigma**2 + 1)),
}


def _dpmpp_2m(scheduler: DPMSolverMultistepScheduler) -> LinearStep | None:
    config = scheduler.config
    timesteps = scheduler.timesteps
    if (
        config.algorithm_type != "dpmsolver++"
        or config.solver_order not in (1, 2)
        or config.solver_type not in ("midpoint", "heun")
        or config.thresholding
        or config.variance_type is not None
        or config.use_flow_sigmas
        or config.prediction_type not in ("epsilon", "v_prediction", "sample")
        or len(set(timesteps.tolist())) != len(timesteps)  # the step index follows the timesteps
    ):
        return None
    steps = len(timesteps)
    sigma = scheduler.sigmas.double().numpy()
    alpha = 1 / np.sqrt(sigma**2 + 1)  # _sigma_to_alpha_sigma_t
    sigma_t = sigma * alpha
    with np.errstate(divide="ignore"):  # a final sigma of 0: lambda = inf, exp(-h) = 0
        lam = np.log(alpha) - np.log(sigma_t)
    # x0 from the model output at step i (convert_model_output)
    p, q = {
        "epsilon": (1 / alpha, -sigma_t / alpha),
        "v_prediction": (alpha, -sigma_t),
        "sample": (np.zeros_like(alpha), np.ones_like(alpha)),
    }[config.prediction_type]
    a, b, c = np.zeros(steps), np.zeros(steps), np.zeros(steps)
    for i in range(steps):
        h = lam[i + 1] - lam[i]
        e = alpha[i + 1] * np.expm1(-h)
        x_coef = sigma_t[i + 1] / sigma_t[i]
        last = i == steps - 1 and (
            config.euler_at_final
            or (config.lower_order_final and steps < 15)
            or config.final_sigmas_type == "zero"
        )
        if config.solver_order == 1 or i == 0 or last:  # first order: x' = x_coef * x - e * x0
            m0, m1 = -e, 0.0
        else:  # second order on x0 and the previous x0: D0 = x0, D1 = (x0 - x0_prev) / r0
            r0 = (lam[i] - lam[i - 1]) / h
            if config.solver_type == "midpoint":
                m0, m1 = -e - 0.5 * e / r0, 0.5 * e / r0
            else:
                f = alpha[i + 1] * (np.expm1(-h) / h + 1)
                m0, m1 = -e + f / r0, -f / r0
        a[i], b[i], c[i] = x_coef + m0 * p[i], m0 * q[i], m1
    return LinearStep(*_float32(np.ones(steps), a, b, c, p[:steps], q[:steps]))
