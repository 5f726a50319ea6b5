"""Each engine model as a PyTorch module over its diffusers weights, taking and returning tensors in
contract order. The export traces these very modules (export/components.py) and the python-torch
engine runs them (torch_runner.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sd_triton.contract import (
    CHECKPOINT_SUBFOLDERS,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Architecture,
    ModelSpec,
    added_conditioning,
    models,
)


def layer_back(hidden_states: tuple[torch.Tensor, ...], back: torch.Tensor) -> torch.Tensor:
    """Per row, the hidden state `back` layers before the last: hidden_states[-1 - back[row]]."""
    stacked = torch.stack(hidden_states)  # [layers + 1, rows, tokens, width]
    index = len(hidden_states) - 1 - back.reshape(-1).long()
    return stacked[index, torch.arange(stacked.shape[1])]


class LearnedTokens(torch.nn.Module):
    """A CLIP encoder's token embedding with textual inversion: an id past its table (V rows) reads row
    id - V of the call's own learned vectors (`vectors`, [rows, E, D], set for the call), as diffusers'
    load_textual_inversion's added rows would."""

    def __init__(self, table: torch.nn.Module) -> None:
        super().__init__()
        self.table = table
        self.vocabulary = int(table.weight.shape[0])
        self.vectors: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # any id reads a row (never out of range): past the vocabulary a learned one, below it the first
        known = self.table(ids.clamp(min=0, max=self.vocabulary - 1))
        if self.vectors is None:
            return known
        vectors = self.vectors.to(known.dtype)
        # one-hot over the E vectors (from tensor ops alone, so E stays a dynamic axis when traced): an id
        # past them picks none (zeros)
        rows = torch.ones_like(vectors[..., 0]).cumsum(-1) - 1  # [rows, E]: 0 .. E - 1
        learned = (ids - self.vocabulary).to(rows.dtype)
        picked = (learned.unsqueeze(-1) == rows.unsqueeze(1)).to(vectors.dtype) @ vectors
        return torch.where((ids >= self.vocabulary).unsqueeze(-1), picked, known)


def learned_tokens(encoder: torch.nn.Module) -> LearnedTokens:
    """The encoder's token embedding, wrapped in LearnedTokens (once: a module wraps its encoders when
    built, so its parameters stay as they are through a call)."""
    table = encoder.get_input_embeddings()
    if not isinstance(table, LearnedTokens):
        table = LearnedTokens(table)
        encoder.set_input_embeddings(table)
    return table


def encode(encoder: torch.nn.Module, ids: torch.Tensor, vectors: torch.Tensor) -> Any:
    """The encoder's output (every layer's states) for `ids`, the learned ones read from `vectors`."""
    tokens = learned_tokens(encoder)
    tokens.vectors = vectors
    try:
        return encoder(ids.long(), output_hidden_states=True)
    finally:
        tokens.vectors = None


class TextEncoderModule(torch.nn.Module):
    """SD's CLIP text encoder as StableDiffusionPipeline.encode_prompt runs it: with clip_skip k, the
    states k layers before the last, through the final layer norm (k = 0: its usual output)."""

    def __init__(self, encoder: CLIPTextModel) -> None:
        super().__init__()
        self.encoder = encoder
        learned_tokens(encoder)
        self.final_layer_norm = getattr(encoder, "text_model", encoder).final_layer_norm

    def forward(
        self, input_ids: torch.Tensor, clip_skip: torch.Tensor, token_embeddings: torch.Tensor
    ) -> torch.Tensor:
        out = encode(self.encoder, input_ids, token_embeddings)
        return self.final_layer_norm(layer_back(out.hidden_states, clip_skip))


class TextEncoderXLModule(torch.nn.Module):
    """SDXL's two CLIP text encoders, as StableDiffusionXLPipeline.encode_prompt runs them: each one's
    penultimate layer states, concatenated, and the second's pooled projection."""

    def __init__(self, encoder: CLIPTextModel, encoder_2: CLIPTextModelWithProjection) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder_2 = encoder_2
        learned_tokens(encoder)
        learned_tokens(encoder_2)

    def forward(
        self,
        input_ids: torch.Tensor,
        clip_skip: torch.Tensor,
        token_embeddings: torch.Tensor,
        input_ids_2: torch.Tensor,
        token_embeddings_2: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """clip_skip k: each encoder's states k layers before its penultimate (diffusers' -(k + 2))."""
        first = encode(self.encoder, input_ids, token_embeddings)
        second = encode(self.encoder_2, input_ids_2, token_embeddings_2)
        back = clip_skip + 1
        hidden = torch.cat(
            [layer_back(first.hidden_states, back), layer_back(second.hidden_states, back)], dim=-1
        )
        return hidden, second.text_embeds


class RefinerTextEncoderModule(torch.nn.Module):
    """An SDXL refiner's one text encoder (SDXL's second): its penultimate layer states and its pooled
    projection, as StableDiffusionXLImg2ImgPipeline.encode_prompt runs it."""

    def __init__(self, encoder: CLIPTextModelWithProjection) -> None:
        super().__init__()
        self.encoder = encoder
        learned_tokens(encoder)

    def forward(
        self, input_ids: torch.Tensor, clip_skip: torch.Tensor, token_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = encode(self.encoder, input_ids, token_embeddings)
        return layer_back(out.hidden_states, clip_skip + 1), out.text_embeds


class UNetModule(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # timestep arrives as [B, 1] (Triton's batched [1]); the UNet wants [B]
        return self.unet(sample, timestep.reshape(-1), hidden, return_dict=False)[0]


class UNetXLModule(torch.nn.Module):
    """An SDXL UNet: the added conditioning (pooled text embeddings, time ids) as two more inputs."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        hidden: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep.reshape(-1), hidden, added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoderModule(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderModule(torch.nn.Module):
    """Images -> the latent distribution's parameters (diffusers' AutoencoderKL.encode before the
    distribution is built: the encoder, then quant_conv where the checkpoint has one)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(sample)
        return moments if self.vae.quant_conv is None else self.vae.quant_conv(moments)


def architecture_of(checkpoint: Path) -> Architecture:
    """The checkpoint's (or a python-torch engine's folder of its subfolders') family: "sdxl" with SDXL's
    second text encoder beside the first or an SDXL UNet (added "text_time" conditioning), "sdxl-refiner"
    with the second text encoder alone, "sd" otherwise."""
    if (checkpoint / "text_encoder_2").is_dir():
        return "sdxl" if (checkpoint / "text_encoder").is_dir() else "sdxl-refiner"
    unet = checkpoint / CHECKPOINT_SUBFOLDERS[UNET.name] / "config.json"
    if unet.is_file() and json.loads(unet.read_text()).get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd"


def module_spec(model: str, checkpoint: Path) -> ModelSpec:
    """The contract of the engine model `model` for that checkpoint's architecture."""
    return models(architecture_of(checkpoint))[model]


def load_module(model: str, checkpoint: Path) -> torch.nn.Module:
    """The engine model `model` (a contract name) from a diffusers checkpoint folder (or a folder holding
    the model's subfolders of one), in eval mode."""
    folder = checkpoint / CHECKPOINT_SUBFOLDERS[model]
    architecture = architecture_of(checkpoint)
    xl = added_conditioning(architecture)
    if model == TEXT_ENCODER.name and architecture == "sdxl-refiner":
        second = checkpoint / "text_encoder_2"
        encoder_2 = CLIPTextModelWithProjection.from_pretrained(second, attn_implementation="eager")
        return RefinerTextEncoderModule(encoder_2).eval()
    if model == TEXT_ENCODER.name:
        encoder = CLIPTextModel.from_pretrained(folder, attn_implementation="eager")
        if xl:
            encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                checkpoint / "text_encoder_2", attn_implementation="eager"
            )
            return TextEncoderXLModule(encoder, encoder_2).eval()
        return TextEncoderModule(encoder).eval()
    if model == UNET.name:
        unet = UNet2DConditionModel.from_pretrained(folder)
        return (UNetXLModule(unet) if xl else UNetModule(unet)).eval()
    if model == VAE_DECODER.name:
        return VaeDecoderModule(AutoencoderKL.from_pretrained(folder)).eval()
    if model == VAE_ENCODER.name:
        return VaeEncoderModule(AutoencoderKL.from_pretrained(folder)).eval()
    raise ValueError(f"model: {model!r} is not an engine model")
