"""One class per exported component: names, dynamic axes, shape profiles, sample input, and the
torch module that is exported. ONNX export, its check and the TensorRT build all read from here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from sd_triton.contract import (
    CHECKPOINT_SUBFOLDERS,
    MAX_TOKEN_EMBEDDINGS,
    TEXT_ENCODER,
    TEXT_ENCODER_REFINER,
    TEXT_ENCODER_XL,
    TOKEN_LENGTH,
    UNET,
    UNET_XL,
    VAE_DECODER,
    VAE_ENCODER,
    Limits,
    ModelSpec,
    checkpoint_subfolders,
)
from sd_triton.runtime.torch_modules import load_module

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelDims:
    """What the checkpoint says about tensor sizes."""

    text_hidden: int
    latent_channels: int  # the VAE's
    vae_scale_factor: int
    vocab_size: int
    unet_in_channels: int = 4  # latent_channels, or 9 for an inpainting UNet (latents, mask, masked image)
    # SDXL: the second text encoder's pooled projection width and the UNet's number of time ids (0: none)
    pooled_dim: int = 0
    time_ids: int = 0
    text_widths: tuple[int, ...] = ()  # each text encoder's width (SDXL: two), its learned vectors'


@dataclass(frozen=True)
class Profile:
    """A TensorRT optimization profile: per input, the min/opt/max shapes (batch included)."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def with_max_batch(self, batch: int) -> Profile:
        """The same profile with its max batch raised to `batch` (never lowered)."""
        return Profile(
            {name: (lo, opt, (max(hi[0], batch), *hi[1:])) for name, (lo, opt, hi) in self.shapes.items()}
        )


class Component(ABC):
    spec: ModelSpec
    subfolder: str  # the checkpoint folder its weights come from
    extra_subfolders: tuple[str, ...] = ()  # and more (SDXL's second text encoder)

    @property
    def subfolders(self) -> tuple[str, ...]:
        return (self.subfolder, *self.extra_subfolders)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.spec.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs]

    def load(self, checkpoint: Path) -> torch.nn.Module:
        """The module to export, taking the inputs in contract order (sd_triton.runtime.torch_modules)."""
        return load_module(self.name, checkpoint)

    @abstractmethod
    def dynamic_axes(self) -> dict[str, dict[int, str]]: ...

    @abstractmethod
    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        """Inputs for tracing and for the ONNX-vs-PyTorch check."""

    @abstractmethod
    def profile(self, dims: ModelDims, limits: Limits) -> Profile: ...


def latent_range(dims: ModelDims, limits: Limits) -> tuple[int, int, int]:
    """Latent side: min (one cell), opt (512 px or the limit), max (the limit)."""
    top = limits.max_side // dims.vae_scale_factor
    return 1, min(512 // dims.vae_scale_factor, top), top


class TextEncoder(Component):
    spec = TEXT_ENCODER
    subfolder = CHECKPOINT_SUBFOLDERS[TEXT_ENCODER.name]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:  # every tensor (SDXL's ids and pooled ones too)
        axes = {name: {0: "batch"} for name in (*self.input_names, *self.output_names)}
        vectors = {name: {0: "batch", 1: "vectors"} for name in axes if name.startswith("token_embeddings")}
        return {**axes, **vectors}

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, dims.vocab_size, (batch, TOKEN_LENGTH), generator=generator)
        ids[:, 2:4] = dims.vocab_size + torch.arange(2)  # learned tokens: the vectors' path is checked
        clip_skip = (torch.arange(batch) % 2).reshape(batch, 1)  # 0 and 1: the layer choice is checked
        vectors = torch.randn((batch, 2, dims.text_widths[0]), generator=generator)
        return ids.to(torch.int32), clip_skip.to(torch.int32), vectors

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        b = limits.max_unet_batch * limits.max_prompt_chunks  # a row per prompt chunk
        ids = ((1, TOKEN_LENGTH), (2, TOKEN_LENGTH), (b, TOKEN_LENGTH))
        return Profile(
            {
                "input_ids": ids,
                "clip_skip": ((1, 1), (2, 1), (b, 1)),
                "token_embeddings": vectors_profile(b, dims.text_widths[0]),
            }
        )


def vectors_profile(batch: int, width: int) -> tuple[Shape, Shape, Shape]:
    """A text encoder's learned token vectors: one (none used) up to MAX_TOKEN_EMBEDDINGS a row."""
    return (1, 1, width), (2, 1, width), (batch, MAX_TOKEN_EMBEDDINGS, width)


class UNet(Component):
    spec = UNET
    subfolder = CHECKPOINT_SUBFOLDERS[UNET.name]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        spatial = {0: "batch", 2: "height", 3: "width"}
        return {
            "sample": spatial,
            "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "tokens"},  # 77 per prompt chunk
            "noise_pred": spatial,
        }

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(batch)
        sample = torch.randn((batch, dims.unet_in_channels, *latent_hw), generator=generator)
        timestep = torch.full((batch, 1), 801.0)
        hidden = torch.randn((batch, TOKEN_LENGTH, dims.text_hidden), generator=generator)
        return sample, timestep, hidden

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        lo, opt, hi = latent_range(dims, limits)
        b, c, d = limits.max_unet_batch, dims.unet_in_channels, dims.text_hidden
        tokens = TOKEN_LENGTH * limits.max_prompt_chunks  # long prompts: up to max_prompt_chunks chunks
        return Profile(
            {
                "sample": ((1, c, lo, lo), (2, c, opt, opt), (b, c, hi, hi)),
                "timestep": ((1, 1), (2, 1), (b, 1)),
                "encoder_hidden_states": ((1, TOKEN_LENGTH, d), (2, TOKEN_LENGTH, d), (b, tokens, d)),
            }
        )


class VaeDecoder(Component):
    spec = VAE_DECODER
    subfolder = CHECKPOINT_SUBFOLDERS[VAE_DECODER.name]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        spatial = {0: "batch", 2: "height", 3: "width"}
        return {"latent_sample": spatial, "sample": spatial}

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(batch)
        return (torch.randn((batch, dims.latent_channels, *latent_hw), generator=generator),)

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        lo, opt, hi = latent_range(dims, limits)
        b, c = limits.max_num_images, dims.latent_channels
        return Profile({"latent_sample": ((1, c, lo, lo), (1, c, opt, opt), (b, c, hi, hi))})


class VaeEncoder(Component):
    spec = VAE_ENCODER
    subfolder = CHECKPOINT_SUBFOLDERS[VAE_ENCODER.name]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        spatial = {0: "batch", 2: "height", 3: "width"}
        return {"sample": spatial, "latent_parameters": spatial}

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(batch)
        h, w = (side * dims.vae_scale_factor for side in latent_hw)
        return (torch.rand((batch, 3, h, w), generator=generator) * 2 - 1,)

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        lo, opt, hi = (side * dims.vae_scale_factor for side in latent_range(dims, limits))
        b = limits.max_num_images
        return Profile({"sample": ((1, 3, lo, lo), (1, 3, opt, opt), (b, 3, hi, hi))})


class TextEncoderXL(TextEncoder):
    """SDXL's two text encoders as one engine: both tokenizers' ids in, the concatenated states and the
    pooled embeddings out."""

    spec = TEXT_ENCODER_XL
    extra_subfolders = checkpoint_subfolders(TEXT_ENCODER.name, "sdxl")[1:]

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        ids, clip_skip, vectors = super().sample_inputs(dims, batch, latent_hw)
        generator = torch.Generator().manual_seed(batch + 1)
        vectors_2 = torch.randn((batch, 2, dims.text_widths[1]), generator=generator)
        return ids, clip_skip, vectors, ids.flip(0).contiguous(), vectors_2

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        shapes = super().profile(dims, limits).shapes
        batch = shapes["input_ids"][2][0]
        return Profile(
            {
                **shapes,
                "input_ids_2": shapes["input_ids"],
                "token_embeddings_2": vectors_profile(batch, dims.text_widths[1]),
            }
        )


class TextEncoderRefiner(TextEncoder):
    """An SDXL refiner's text encoder (SDXL's second): its tokenizer's ids in, the states and the pooled
    embeddings out."""

    spec = TEXT_ENCODER_REFINER
    subfolder = checkpoint_subfolders(TEXT_ENCODER.name, "sdxl-refiner")[0]


class UNetXL(UNet):
    """An SDXL UNet: the pooled text embeddings and the time ids besides SD's inputs."""

    spec = UNET_XL

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {**super().dynamic_axes(), "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}}

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(batch + 1)
        pooled = torch.randn((batch, dims.pooled_dim), generator=generator)
        sizes = [float(dims.vae_scale_factor * side) for side in latent_hw]
        time_ids = torch.tensor([[*sizes, 0.0, 0.0, *sizes][: dims.time_ids]] * batch)
        return (*super().sample_inputs(dims, batch, latent_hw), pooled, time_ids)

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        b, p, t = limits.max_unet_batch, dims.pooled_dim, dims.time_ids
        added = {"text_embeds": ((1, p), (2, p), (b, p)), "time_ids": ((1, t), (2, t), (b, t))}
        return Profile({**super().profile(dims, limits).shapes, **added})


COMPONENTS: dict[str, Component] = {c.name: c for c in (TextEncoder(), UNet(), VaeDecoder(), VaeEncoder())}
_ARCHITECTURE_COMPONENTS: dict[str, dict[str, Component]] = {
    "sd": {},
    "sdxl": {c.name: c for c in (TextEncoderXL(), UNetXL())},
    "sdxl-refiner": {c.name: c for c in (TextEncoderRefiner(), UNetXL())},
}


def components(architecture: str) -> dict[str, Component]:
    """Each engine model's component for a checkpoint of that architecture (contract.models)."""
    return {**COMPONENTS, **_ARCHITECTURE_COMPONENTS[architecture]}
