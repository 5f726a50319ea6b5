"""The denoising loop with classifier-free guidance, the arithmetic of diffusers'
StableDiffusionPipeline (and, from an init image, StableDiffusionImg2ImgPipeline), over any UNet
callable (the live engine in Triton, inline or through BLS; ONNX Runtime in tests).

`DenoiseJob` is one request's state, advanced one UNet call at a time: `denoise` runs one job alone,
`sd_triton.runtime.batching` advances many jobs in shared UNet calls. Both do the same arithmetic.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from sd_triton.contract import (
    AESTHETIC_SCORE,
    DEFAULT_AESTHETIC_SCORE,
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    MAX_SIZE_CONDITIONING,
    NEGATIVE_AESTHETIC_SCORE,
    NEGATIVE_SIZE_CONDITIONING,
    POOLED_EMBEDS,
    PROMPT_EMBEDS,
    SIZE_CONDITIONING,
    TOKEN_LENGTH,
)
from sd_triton.lora import AdapterSet
from sd_triton.pipeline_config import PipelineConfig
from sd_triton.requests import GenerationParams, InvalidRequest, start_step
from sd_triton.runtime.postprocess import from_uint8_images
from sd_triton.runtime.schedulers import prepared_scheduler

if TYPE_CHECKING:
    from sd_triton.runtime.controlnets import JobControl

# (sample [B,C,h,w], timestep [B,1], encoder_hidden_states [B,77,D], then for an SDXL UNet text_embeds
# [B,P] and time_ids [B,6]) -> noise_pred [B,C,h,w]
UNetFn = Callable[..., np.ndarray]
# (step index, number of steps) -> None
StepCallback = Callable[[int, int], None]
UNetInputs = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class AddedConditioning:
    """SDXL's added UNet conditioning, one row per prompt row ([uncond,] cond, as the embeddings): the
    pooled embeddings of the second text encoder, and the time ids (`time_ids`: original size, crop
    top-left, target size)."""

    text_embeds: np.ndarray  # [1 or 2, P]
    time_ids: np.ndarray  # [1 or 2, 6]


def time_ids(
    original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
) -> list[float]:
    """SDXL's size conditioning, (height, width) pairs, in diffusers' order."""
    return [float(v) for v in (*original, *crop_top_left, *target)]


def size_conditioning(
    params: GenerationParams,
    config: PipelineConfig,
    sizes: np.ndarray | None = None,
    negative_sizes: np.ndarray | None = None,
    aesthetic: float | None = None,
    negative_aesthetic: float | None = None,
) -> np.ndarray | None:
    """An SDXL request's time ids, one row per prompt row ([uncond,] cond): SIZE_CONDITIONING (default:
    the request's size, no crop) and NEGATIVE_SIZE_CONDITIONING (default: the same), as
    StableDiffusionXLPipeline builds them from original_size, crops_coords_top_left, target_size and their
    negative_ twins. A refiner's (`refiner_time_ids`) take the aesthetic scores. None for an SD model,
    which refuses them."""
    given = ((NEGATIVE_SIZE_CONDITIONING, negative_sizes), (SIZE_CONDITIONING, sizes))
    scores = ((AESTHETIC_SCORE, aesthetic), (NEGATIVE_AESTHETIC_SCORE, negative_aesthetic))
    if not config.refiner:
        for spec, score in scores:
            if score is not None:
                raise InvalidRequest(
                    spec.name, f"applies to SDXL refiner models only; this one is {config.architecture}"
                )
    if not config.xl:
        for spec, value in given:
            if value is not None:
                raise InvalidRequest(spec.name, "applies to SDXL models only; this model is SD")
        return None
    default = time_ids((params.height, params.width), (0, 0), (params.height, params.width))
    rows: list[list[float] | None] = []
    for spec, value in given:
        if value is None:
            rows.append(None)
            continue
        values = np.asarray(value).reshape(-1)
        if values.size != 6 or not np.issubdtype(values.dtype, np.integer):
            raise InvalidRequest(spec.name, f"must be 6 integers, got {values.size} of {values.dtype}")
        if values.min() < 0 or values.max() > MAX_SIZE_CONDITIONING:
            raise InvalidRequest(
                spec.name, f"values must be within 0..{MAX_SIZE_CONDITIONING}, got {values.tolist()}"
            )
        if min(values[0], values[1], values[4], values[5]) < 1:
            raise InvalidRequest(spec.name, f"sizes (items 1, 2, 5, 6) must be >= 1, got {values.tolist()}")
        rows.append([float(v) for v in values])
    negative, positive = rows
    if config.refiner:
        return refiner_time_ids(params, positive or default, negative, aesthetic, negative_aesthetic)
    positive = positive or default
    chosen = [negative or positive, positive] if params.classifier_free_guidance else [positive]
    return np.array(chosen, dtype=np.float32)


def refiner_time_ids(
    params: GenerationParams,
    positive: list[float],
    negative: list[float] | None,
    aesthetic: float | None,
    negative_aesthetic: float | None,
) -> np.ndarray:
    """An SDXL refiner's time ids (StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score):
    original size, crop top-left, aesthetic score; the target size is not among them. The unconditional
    row's defaults are diffusers': the prompt's original size, no crop, the negative score."""
    for spec, score in ((AESTHETIC_SCORE, aesthetic), (NEGATIVE_AESTHETIC_SCORE, negative_aesthetic)):
        if score is not None and not math.isfinite(score):
            raise InvalidRequest(spec.name, f"must be a finite number, got {score}")
    score = DEFAULT_AESTHETIC_SCORE if aesthetic is None else float(aesthetic)
    negative_score = (
        DEFAULT_NEGATIVE_AESTHETIC_SCORE if negative_aesthetic is None else float(negative_aesthetic)
    )
    cond = [*positive[:4], score]
    uncond = [*negative[:4], negative_score] if negative else [*positive[:2], 0.0, 0.0, negative_score]
    return np.array([uncond, cond] if params.classifier_free_guidance else [cond], dtype=np.float32)


def sdxl_conditioning(
    prompt_embeds: np.ndarray,
    pooled: np.ndarray | None,
    params: GenerationParams,
    config: PipelineConfig,
    ids: np.ndarray | None,
    negative_prompt_given: bool = True,
) -> tuple[np.ndarray, AddedConditioning | None]:
    """A request's text embeddings and, for an SDXL model, its added conditioning: the pooled embeddings
    and the time ids (`size_conditioning`). Without a negative prompt, a checkpoint with
    force_zeros_for_empty_prompt takes zeros for the unconditional rows (diffusers' rule)."""
    if not config.xl:
        return prompt_embeds, None
    if pooled is None:
        raise InvalidRequest(POOLED_EMBEDS.name, "is required by an SDXL model")
    assert ids is not None, "an SDXL request's time ids (size_conditioning)"
    rows = 2 if params.classifier_free_guidance else 1
    pooled = np.ascontiguousarray(pooled, dtype=np.float32)
    if pooled.ndim != 2 or len(pooled) != rows:
        raise InvalidRequest(POOLED_EMBEDS.name, f"must be [{rows}, n], got {list(pooled.shape)}")
    if rows == 2 and config.force_zeros_for_empty_prompt and not negative_prompt_given:
        prompt_embeds, pooled = np.array(prompt_embeds, dtype=np.float32), pooled.copy()
        prompt_embeds[0] = 0.0
        pooled[0] = 0.0
    return prompt_embeds, AddedConditioning(pooled, ids)


def _embeddings(prompt_embeds: np.ndarray, params: GenerationParams, config: PipelineConfig) -> torch.Tensor:
    """Rows [uncond, cond] (or [cond]) -> one row per UNet batch item, uncond images first.

    The shape is checked here, before the request joins a batch: embeddings of another width would
    fail the shared UNet call of every request batched with them."""
    embeds = torch.from_numpy(np.ascontiguousarray(prompt_embeds, dtype=np.float32))
    expected = 2 if params.classifier_free_guidance else 1
    if embeds.shape[0] != expected:
        raise InvalidRequest(PROMPT_EMBEDS.name, f"has {embeds.shape[0]} rows, expected {expected}")
    width = embeds.shape[-1] if config.text_hidden_size is None else config.text_hidden_size
    if embeds.ndim != 3 or embeds.shape[1] % TOKEN_LENGTH or not embeds.shape[1] or embeds.shape[2] != width:
        shape = [expected, f"{TOKEN_LENGTH} x chunks", width]
        raise InvalidRequest(PROMPT_EMBEDS.name, f"must have shape {shape}, got {list(embeds.shape)}")
    return embeds.repeat_interleave(params.num_images, dim=0)


@functools.cache
def _step_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.step).parameters)  # type: ignore[attr-defined]


def _step_kwargs(scheduler: object, generators: list[torch.Generator]) -> dict[str, object]:
    accepted = _step_parameters(type(scheduler))
    kwargs: dict[str, object] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


@dataclass(frozen=True)
class InitImage:
    """Where an image-to-image request starts: its image through the VAE encoder (the parameters of
    diffusers' latent distribution, mean and log-variance stacked on the channel axis: [1 or
    num_images, 2 x latent channels, h, w]) and how much of the schedule runs over it (`strength`,
    0 < s <= 1: 1 repaints from nearly pure noise, small values keep the image).

    Inpainting adds `mask` (`inpaint_mask`: [1, 1, h, w] at latent size, 1 where the image is repainted)
    and, for a 9-channel inpainting UNet, `masked_moments` (the encoder's output for the image with the
    repainted area zeroed): the UNet takes mask and masked image as extra channels. Without them a
    regular UNet repaints the masked area and every step puts the rest back from the image, noised to
    the step (diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet)."""

    moments: np.ndarray
    strength: float
    mask: np.ndarray | None = None
    masked_moments: np.ndarray | None = None

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    @property
    def blends(self) -> bool:
        """A regular UNet inpainting: the unmasked area put back after every step."""
        return self.mask is not None and self.masked_moments is None


@dataclass(frozen=True)
class Handoff:
    """A base + refiner run split at a fraction of the schedule (diffusers' `denoising_end` on the base,
    `denoising_start` on the refiner, 0 < f < 1): the base stops once the timesteps fall below
    (1 - end) x the training steps and answers its latents; the refiner starts there from `latents` (the
    base's, divided by the VAE scaling factor as LATENTS are), with no noise added. Each side's
    generators start from the request's seeds (diffusers' hand-off reuses one generator object, which
    only ancestral and SDE schedulers read after the start)."""

    end: float | None = None
    start: float | None = None
    latents: np.ndarray | None = None  # with `start`: [num_images, C, h, w]

    def __post_init__(self) -> None:
        for name, value in (("DENOISING_END", self.end), ("DENOISING_START", self.start)):
            if value is not None and not 0.0 < value < 1.0:
                raise InvalidRequest(name, f"must be between 0 and 1 (exclusive), got {value}")
        if (self.start is None) != (self.latents is None):
            raise InvalidRequest(
                "DENOISING_START", "and START_LATENTS go together: the refiner starts from the base's latents"
            )


def _cutoff(fraction: float, scheduler: object) -> int:
    """The training timestep a hand-off fraction cuts the schedule at (diffusers' rounding)."""
    trained = int(scheduler.config.num_train_timesteps)  # type: ignore[attr-defined]
    return int(round(trained - fraction * trained))


def inpaint_mask(mask: np.ndarray, image: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 [H, W] mask (white: repaint) and the VAE input [1, 3, H, W] of its image -> the masked
    image (the repainted area zeroed, the VAE encoder's input for a 9-channel UNet) and the mask at
    latent size [1, 1, H/scale, W/scale], as diffusers' mask processor binarizes and resizes it."""
    binary = (mask.astype(np.float32) / 255.0 >= 0.5).astype(np.float32)[None, None]
    masked = image * (binary < 0.5)
    size = (mask.shape[0] // scale, mask.shape[1] // scale)
    small = torch.nn.functional.interpolate(torch.from_numpy(binary), size=size).numpy()
    return masked.astype(np.float32), small


def encode_init_image(
    image: np.ndarray,
    strength: float,
    mask: np.ndarray | None,
    config: PipelineConfig,
    encoder: Callable[[np.ndarray], np.ndarray],
) -> InitImage:
    """A uint8 [H, W, 3] image (and uint8 [H, W] mask) through the VAE `encoder` (VAE input [B, 3, H, W] ->
    latent distribution parameters): the request's InitImage. An inpainting UNet's masked image is
    encoded in the same call as the image."""
    pixels = from_uint8_images(image[None])
    if mask is None:
        return InitImage(encoder(pixels), strength)
    masked, small = inpaint_mask(mask, pixels, config.vae_scale_factor)
    if not config.inpainting_unet:
        return InitImage(encoder(pixels), strength, small)
    both = encoder(np.concatenate([pixels, masked]))
    return InitImage(both[:1], strength, small, both[1:])


def _distribution(moments: np.ndarray, rows: int, channels: int, field: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(moments, dtype=np.float32))
    if tensor.ndim != 4 or tensor.shape[1] != 2 * channels or tensor.shape[0] not in (1, rows):
        raise InvalidRequest(
            field, f"encoded to {list(tensor.shape)}, expected [1 or {rows}, {2 * channels}, h, w]"
        )
    return tensor


def _sample(moments: torch.Tensor, row: int, generator: torch.Generator) -> torch.Tensor:
    """One draw from a row's latent distribution ([1, C, h, w]), diffusers' DiagonalGaussianDistribution."""
    mean, logvar = moments[row % moments.shape[0]].unsqueeze(0).chunk(2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * randn_tensor(tuple(mean.shape), generator=generator, dtype=torch.float32)


def _sample_image_latents(init: InitImage, generators: list[torch.Generator], channels: int) -> torch.Tensor:
    """One draw from each image's latent distribution, with that image's generator (diffusers' img2img
    encodes image i alone and samples it with generator i, before the noise is drawn)."""
    moments = _distribution(init.moments, len(generators), channels, "IMAGE")
    return torch.cat([_sample(moments, i, generator) for i, generator in enumerate(generators)])


class DenoiseJob:
    """One request's denoising state: its scheduler, seeded generators, latents and embeddings.

    Call `unet_inputs()` then `advance(noise_pred)` once per step until `done`. Image i is seeded
    with `params.seed + i` (one generator per image, as diffusers does with a list of generators),
    so any image can be reproduced alone. With `init`, the request starts from that image, noised to
    the step its strength gives, and runs the steps from there.
    """

    def __init__(
        self,
        prompt_embeds: np.ndarray,
        params: GenerationParams,
        config: PipelineConfig,
        init: InitImage | None = None,
        added: AddedConditioning | None = None,
        handoff: Handoff | None = None,
        adapters: AdapterSet | None = None,
        controls: JobControl | None = None,
    ) -> None:
        """`adapters`: the LoRA adapters its UNet calls run with (None: the base); `controls`: its
        ControlNets (the UNet callable takes them: runtime/controlnets.ControlledUNet)."""
        self.params = params
        self.adapters = adapters
        self.controls = controls
        self.config = config
        self.cfg = params.classifier_free_guidance
        # 1. The scheduler from the checkpoint's config, set to the request's number of steps, and its
        #    closed form where it has one (advance_jobs steps those requests together, reading the shared
        #    scheduler only); any other request steps a fresh copy of its own. An img2img request starts
        #    at a later step: a copy of its own that knows it (diffusers' begin index), and the multistep
        #    closed forms, written for a run from the first step, give way to diffusers' step.
        prepared, self.linear = prepared_scheduler(params.scheduler, config.scheduler_config, params.steps)
        order = int(getattr(prepared, "order", 1))
        self.start = 0 if init is None else start_step(params.steps, init.strength) * order
        self.stop = len(prepared.timesteps)  # a base handing off stops early (diffusers' denoising_end)
        refining = handoff is not None and handoff.start is not None
        if handoff is not None and handoff.end is not None:
            cutoff = _cutoff(handoff.end, prepared)
            self.stop = int((prepared.timesteps >= cutoff).sum())
        if refining:  # the refiner's share: the timesteps below the cutoff, whole 2nd-order steps
            if init is not None:
                raise InvalidRequest("DENOISING_START", "starts from the base's latents, not from an image")
            assert handoff is not None
            count = int((prepared.timesteps < _cutoff(handoff.start, prepared)).sum())  # type: ignore[arg-type]
            count += 1 if order == 2 and count % 2 == 0 else 0
            self.start = len(prepared.timesteps) - count
        if self.start and self.linear is not None and self.linear.c is not None:
            self.linear = None
        self.blend = init is not None and init.blends  # its steps put the unmasked area back: diffusers'
        if self.blend:  # step, whose scheduler state add_noise reads
            self.linear = None
        shared = self.linear is not None and init is None and not refining
        self.scheduler = prepared if shared else copy.deepcopy(prepared)
        if (init is not None or refining) and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(self.start)
        self.timesteps = self.scheduler.timesteps
        # 2. Text embeddings, one row per UNet batch item (and an SDXL UNet's added conditioning, alike).
        self.embeds = _embeddings(prompt_embeds, params, config).numpy()
        self.added: tuple[np.ndarray, ...] = ()
        if added is not None:
            rows = []
            for name, value in (("TEXT_EMBEDS", added.text_embeds), ("TIME_IDS", added.time_ids)):
                array = np.ascontiguousarray(value, dtype=np.float32)
                if array.ndim != 2 or len(array) != len(prompt_embeds):
                    raise InvalidRequest(
                        name, f"has shape {list(array.shape)}, expected [{len(prompt_embeds)}, n]"
                    )
                rows.append(np.repeat(array, params.num_images, axis=0))
            self.added = tuple(rows)
        # 3. Initial noise: one CPU generator per image (Euler a's steps draw from them too).
        self.generators = [
            torch.Generator("cpu").manual_seed(params.seed + i) for i in range(params.num_images)
        ]
        self.latent_shape = (
            config.latent_channels,
            params.height // config.vae_scale_factor,
            params.width // config.vae_scale_factor,
        )
        if refining:  # the base's latents as they are: no noise drawn, none added
            assert handoff is not None and handoff.latents is not None
            given = torch.from_numpy(np.array(handoff.latents, dtype=np.float32))
            if tuple(given.shape) != (params.num_images, *self.latent_shape):
                expected = [params.num_images, *self.latent_shape]
                raise InvalidRequest(
                    "START_LATENTS", f"must be {expected} (NUM_IMAGES, the latents), got {list(given.shape)}"
                )
            self.latents = given * config.vae_scaling_factor
        elif init is None:
            latents = randn_tensor(
                (params.num_images, *self.latent_shape), generator=self.generators, dtype=torch.float32
            )
            self.latents = latents * self.scheduler.init_noise_sigma
        elif not init.inpainting:  # the image's latents, noised to the first step this request runs
            image = _sample_image_latents(init, self.generators, config.latent_channels)
            self._check_latents(image)
            image = image * config.vae_scaling_factor
            noise = randn_tensor(tuple(image.shape), generator=self.generators, dtype=torch.float32)
            first = self.timesteps[self.start : self.start + 1].repeat(params.num_images)
            self.latents = self.scheduler.add_noise(image, noise, first)
        else:
            self._start_inpainting(init)
        self.extra_channels: np.ndarray | None = None  # a 9-channel UNet's mask and masked image rows
        if init is not None and init.inpainting and not init.blends:
            assert self.masked is not None
            extra = torch.cat([self.mask, self.masked], 1)  # per image, uncond rows then cond rows
            self.extra_channels = torch.cat([extra, extra] if self.cfg else [extra]).numpy()
        if self.linear is None and hasattr(self.scheduler, "noise_sampler_seed"):
            # DPM++ SDE draws its noise from Brownian trees seeded by the scheduler, not a generator:
            # one tree per image, seed + i, as diffusers builds them from a list of seeds
            seeds = [params.seed + i for i in range(params.num_images)]
            self.scheduler.noise_sampler_seed = seeds if params.num_images > 1 else seeds[0]
        self.step_kwargs = _step_kwargs(self.scheduler, self.generators)
        self.x0: np.ndarray | None = None  # a multistep closed form's previous data prediction
        self.step_index = self.start  # into `timesteps` (and the closed form's coefficients)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise InvalidRequest(
                "IMAGE", f"encoded to latents {list(latents.shape[1:])}, expected {list(self.latent_shape)}"
            )

    def _start_inpainting(self, init: InitImage) -> None:
        """diffusers' StableDiffusionInpaintPipeline, draws in its order: the image's latents (a regular
        UNet, or strength < 1) sampled with the first image's generator and shared by every image, the
        noise (one draw per image), then the masked image's latents, again with the first generator
        (drawn for a regular UNet too, which never reads them: the later draws stay diffusers')."""
        n, channels, scale = (
            self.params.num_images,
            self.config.latent_channels,
            self.config.vae_scaling_factor,
        )
        first_generator = self.generators[0]
        full = init.strength == 1.0
        self.image_latents: torch.Tensor | None = None
        if init.blends or not full:
            image = _sample(_distribution(init.moments, 1, channels, "IMAGE"), 0, first_generator)
            self._check_latents(image)
            self.image_latents = (image * scale).repeat(n, 1, 1, 1)
        self.noise = randn_tensor((n, *self.latent_shape), generator=self.generators, dtype=torch.float32)
        if full:
            self.latents = self.noise * self.scheduler.init_noise_sigma
        else:
            assert self.image_latents is not None
            first = self.timesteps[self.start : self.start + 1].repeat(n)
            self.latents = self.scheduler.add_noise(self.image_latents, self.noise, first)
        assert init.mask is not None
        mask = np.ascontiguousarray(init.mask, dtype=np.float32)
        if mask.shape != (1, 1, *self.latent_shape[1:]):
            raise InvalidRequest(
                "MASK", f"at latent size {list(mask.shape)}, expected {[1, 1, *self.latent_shape[1:]]}"
            )
        self.mask = torch.from_numpy(mask).repeat(n, 1, 1, 1)
        self.masked: torch.Tensor | None = None
        if init.masked_moments is None:  # the draw diffusers makes for the masked image's latents
            randn_tensor((1, *self.latent_shape), generator=first_generator, dtype=torch.float32)
        else:
            masked = _sample(_distribution(init.masked_moments, 1, channels, "IMAGE"), 0, first_generator)
            self._check_latents(masked)
            self.masked = (masked * scale).repeat(n, 1, 1, 1)

    @property
    def steps(self) -> int:
        """UNet calls this request makes (fewer than `timesteps` from an init image, or in a hand-off)."""
        return self.stop - self.start

    @property
    def steps_done(self) -> int:
        return self.step_index - self.start

    @property
    def rows(self) -> int:
        """UNet batch rows per step: cond and uncond for every image."""
        return self.embeds.shape[0]

    @property
    def done(self) -> bool:
        return self.step_index >= self.stop

    def unet_kwargs(self) -> dict[str, object]:
        """What its UNet call takes besides the inputs: its adapters, and its ControlNets active this
        step with its rows (a call of several requests joins theirs: `joined_kwargs`)."""
        kwargs: dict[str, object] = {}
        if self.adapters is not None:
            kwargs["adapters"] = self.adapters
        if self.controls is not None:
            kwargs["controls"] = [(self.rows, self.controls.at(self.steps_done, self.steps))]
        return kwargs

    def unet_inputs(self) -> UNetInputs:
        """(sample, timestep, encoder_hidden_states) for this step, `rows` rows each."""
        t = self.timesteps[self.step_index]
        timestep = np.full((self.rows, 1), float(t), dtype=np.float32)
        if self.linear is not None:  # scale_model_input's arithmetic without its per-call Python
            latents = self.latents.numpy()
            divisor = self.linear.divisor[self.step_index]
            sample = latents if divisor == 1 else latents / divisor
            sample = np.concatenate([sample, sample]) if self.cfg else sample
        else:
            model_input = torch.cat([self.latents] * 2) if self.cfg else self.latents
            sample = self.scheduler.scale_model_input(model_input, t).numpy()
        if self.extra_channels is not None:  # a 9-channel UNet: latents, mask, masked image
            sample = np.concatenate([sample, self.extra_channels], axis=1)
        return (sample, timestep, self.embeds, *self.added)

    def advance(self, noise_pred: np.ndarray) -> None:
        """Guidance and the scheduler step with this step's UNet output."""
        error = advance_jobs([self], noise_pred)[0]
        if error is not None:
            raise error

    def _step(self, guided: np.ndarray) -> None:
        """diffusers' scheduler step with the guided model output."""
        t = self.timesteps[self.step_index]
        noise = torch.from_numpy(guided)
        self.latents = self.scheduler.step(noise, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        if self.blend:  # inpainting with a regular UNet: the unmasked area back from the image, noised to
            assert self.image_latents is not None  # the next step (none after the last)
            known = self.image_latents
            if self.step_index + 1 < len(self.timesteps):
                later = self.timesteps[self.step_index + 1 : self.step_index + 2]
                known = self.scheduler.add_noise(known, self.noise, later)
            self.latents = (1 - self.mask) * known + self.mask * self.latents

    def result(self) -> np.ndarray:
        """The final latents with the VAE's latent scaling undone, ready for the decoder."""
        return (self.latents / self.config.vae_scaling_factor).numpy().astype(np.float32)


def advance_jobs(jobs: Sequence[DenoiseJob], noise_pred: np.ndarray) -> list[Exception | None]:
    """One step for every job, `noise_pred` the UNet's output for their rows in order: guidance for all
    images at once, the linear schedulers' updates at once (`linear_step`), every other scheduler's step
    through diffusers. Returns each job's error (None: it advanced); one job's error leaves the others'
    steps untouched."""
    # 1. Row indices per image: its uncond and cond rows (the cond row twice without guidance, where
    #    uncond + scale * (cond - uncond) is cond exactly), its guidance scale, its job.
    uncond: list[np.ndarray] = []
    cond: list[np.ndarray] = []
    scales: list[float] = []
    offset = 0
    for job in jobs:
        n = job.params.num_images
        images = np.arange(offset, offset + n)
        uncond.append(images)
        cond.append(images + n if job.cfg else images)
        scales += [job.params.guidance_scale] * n
        offset += job.rows
    # 2. Guidance, as diffusers writes it: uncond + scale * (text - uncond).
    unconds = noise_pred[np.concatenate(uncond)]
    scale = np.asarray(scales, dtype=np.float32)[:, None, None, None]
    guided = unconds + scale * (noise_pred[np.concatenate(cond)] - unconds)
    # 3. The scheduler steps: the closed forms in one operation, the others one by one.
    errors: list[Exception | None] = [None] * len(jobs)
    closed: list[DenoiseJob] = []
    closed_rows: list[np.ndarray] = []
    first = 0
    for index, job in enumerate(jobs):
        n = job.params.num_images
        if job.linear is not None:
            closed.append(job)
            closed_rows.append(np.arange(first, first + n))
        else:
            try:
                job._step(guided[first : first + n])
            except Exception as exc:  # noqa: BLE001 - this job alone fails
                errors[index] = exc
        first += n
    if closed:
        _step_closed_forms(closed, guided[np.concatenate(closed_rows)])
    for job, error in zip(jobs, errors, strict=True):
        if error is None:
            job.step_index += 1
    return errors


def joined_kwargs(jobs: Sequence[DenoiseJob]) -> dict[str, object]:
    """The UNet call's keyword arguments for the jobs sharing it (one adapter set: the batcher groups
    them so; their ControlNets, request by request)."""
    kwargs: dict[str, object] = {}
    for job in jobs:
        for key, value in job.unet_kwargs().items():
            kwargs[key] = [*kwargs.get(key, []), *value] if key == "controls" else value  # type: ignore[misc]
    return kwargs


def joined(arrays: list[np.ndarray]) -> np.ndarray:
    """One batch from the requests' rows; a lone request's own array (no copy)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _step_closed_forms(jobs: list[DenoiseJob], output: np.ndarray) -> None:
    """The closed-form steps (linear_step) of `jobs` in one operation; `output`: their guided rows."""
    # per image: a, b and, for a multistep scheduler, c, p, q (0 for the others)
    coefficients = np.array(
        [
            [0.0 if values is None else values[job.step_index] for values in (s.a, s.b, s.c, s.p, s.q)]
            for job in jobs
            for s in (job.linear,)
            if s is not None
            for _ in range(job.params.num_images)
        ],
        dtype=np.float32,
    )
    a, b, c, p, q = (coefficients[:, k].reshape(-1, 1, 1, 1) for k in range(5))
    latents = joined([job.latents.numpy() for job in jobs])
    stepped = a * latents + b * output
    multistep = any(job.linear is not None and job.linear.c is not None for job in jobs)
    if multistep:  # + c * the previous step's x0, and this step's x0 kept for the next
        stepped += c * joined(
            [np.zeros_like(job.latents.numpy()) if job.x0 is None else job.x0 for job in jobs]
        )
        x0 = p * latents + q * output
    start = 0
    for job in jobs:
        end = start + job.params.num_images
        job.latents = torch.from_numpy(stepped[start:end])
        if multistep:
            job.x0 = x0[start:end]
        if job.linear is not None and job.linear.noise is not None:  # ancestral: fresh noise, drawn
            # as diffusers draws it, from the request's own generators
            draw = randn_tensor(tuple(job.latents.shape), generator=job.generators, dtype=torch.float32)
            job.latents = job.latents + draw * float(job.linear.noise[job.step_index])
        start = end


def denoise(
    prompt_embeds: np.ndarray,
    params: GenerationParams,
    config: PipelineConfig,
    unet: UNetFn,
    on_step: StepCallback | None = None,
    init: InitImage | None = None,
    added: AddedConditioning | None = None,
    handoff: Handoff | None = None,
    adapters: AdapterSet | None = None,
    controls: JobControl | None = None,
) -> np.ndarray:
    """Latents for `params.num_images` images, divided by the VAE scaling factor: one request alone
    (`adapters`, `controls`: its LoRA adapters and ControlNets, passed to `unet`)."""
    job = DenoiseJob(prompt_embeds, params, config, init, added, handoff, adapters, controls)
    return run_alone(job, unet, on_step)


def run_alone(job: DenoiseJob, unet: UNetFn, on_step: StepCallback | None = None) -> np.ndarray:
    """A job's steps, each its own UNet call (with its adapters and ControlNets), to its final latents."""
    while not job.done:
        job.advance(unet(*job.unet_inputs(), **job.unet_kwargs()))
        if on_step is not None:
            on_step(job.steps_done - 1, job.steps)
    return job.result()
