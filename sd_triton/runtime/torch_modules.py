"""Each engine model as a PyTorch module over its diffusers weights, taking and returning tensors in
contract order. The export traces these very modules (export/components.py) and the python-torch
engine runs them (torch_runner.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from sd_triton.contract import CHECKPOINT_SUBFOLDERS, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER


class TextEncoderModule(torch.nn.Module):
    def __init__(self, encoder: CLIPTextModel) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids.long(), return_dict=False)[0]


class UNetModule(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # timestep arrives as [B, 1] (Triton's batched [1]); the UNet wants [B]
        return self.unet(sample, timestep.reshape(-1), hidden, return_dict=False)[0]


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


def load_module(model: str, checkpoint: Path) -> torch.nn.Module:
    """The engine model `model` (a contract name) from a diffusers checkpoint folder, in eval mode."""
    folder = checkpoint / CHECKPOINT_SUBFOLDERS[model]
    if model == TEXT_ENCODER.name:
        return TextEncoderModule(CLIPTextModel.from_pretrained(folder, attn_implementation="eager")).eval()
    if model == UNET.name:
        return UNetModule(UNet2DConditionModel.from_pretrained(folder)).eval()
    if model == VAE_DECODER.name:
        return VaeDecoderModule(AutoencoderKL.from_pretrained(folder)).eval()
    if model == VAE_ENCODER.name:
        return VaeEncoderModule(AutoencoderKL.from_pretrained(folder)).eval()
    raise ValueError(f"model: {model!r} is not an engine model")
