"""Built checkpoints with random weights (fixed seed), by name, for tests and benchmarks.

- `tiny`: the smallest SD-shaped model; tests. Per-call overhead dominates its cost.
- `tiny-inpaint`: `tiny` with a 9-channel inpainting UNet (StableDiffusionInpaintPipeline's layout); tests.
- `small`: SD 1.5's layout (the same block types, four UNet levels with cross-attention on the
  first three, two resnets per level, 8 heads; a 12-layer CLIP text encoder; SD's 4-level VAE)
  narrowed in width — UNet (32, 64, 128, 128), text encoder 128 wide, VAE (32, 64, 128, 128) — at
  256x256 (32x32 latents): one UNet step with guidance costs about 0.1 s on a 2-core CPU. The
  benchmark default.
- `sd15`: SD 1.5's architecture at full size (860M-parameter UNet, 512x512); for GPU machines.
- `tiny-xl`: the smallest SDXL-shaped model (two text encoders, the UNet's added size and pooled-text
  conditioning; 64x64); tests and the SDXL benchmarks on a CPU.
- `tiny-xl-refiner`: tiny-xl's refiner (its second text encoder alone, aesthetic-score time ids); tests.
- `sdxl`: SDXL 1.0 base's architecture at full size (2.6B-parameter UNet, both text encoders, 1024x1024;
  about 10 GB of FP32 weights to build); for GPU machines (perf/gpu/bench.py).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sd_triton.export.tiny import (
    SCHEDULER_CONFIG,
    SEED,
    build_clip_tokenizer,
    build_tiny_inpaint_pipeline,
    build_tiny_pipeline,
    build_tiny_xl_pipeline,
    build_tiny_xl_refiner_pipeline,
    save_pipeline,
    sd_pipeline,
)

log = logging.getLogger(__name__)

SD15_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def _sd15_shaped(
    unet_channels: tuple[int, ...],
    text_hidden: int,
    text_heads: int,
    vae_channels: tuple[int, ...],
    sample_size: int,
) -> StableDiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_hidden_layers=12,
            num_attention_heads=text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=2,
        down_block_types=SD15_DOWN,
        up_block_types=SD15_UP,
        cross_attention_dim=text_hidden,
        attention_head_dim=8,  # SD 1.5's config value (it acts as the number of heads there)
        norm_num_groups=min(32, unet_channels[0]),
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=min(32, vae_channels[0]),
        sample_size=sample_size * 8,
        scaling_factor=0.18215,
    )
    return sd_pipeline(tokenizer, text_encoder, vae, unet)


def build_small_pipeline() -> StableDiffusionPipeline:
    return _sd15_shaped((32, 64, 128, 128), 128, 4, (32, 64, 128, 128), sample_size=32)


def build_sd15_pipeline() -> StableDiffusionPipeline:
    return _sd15_shaped((320, 640, 1280, 1280), 768, 12, (128, 256, 512, 512), sample_size=64)


def build_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """SDXL 1.0 base's published configs (UNet, CLIP ViT-L and OpenCLIP bigG text encoders, the VAE with
    its FP16 overflow flag, Euler with leading spacing), random weights from SEED."""
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")

    def text_config(tok: CLIPTokenizer, hidden: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(text_config(tokenizer, 768, 12, 12, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 1280, 32, 20, "gelu"))
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler.from_config({**SCHEDULER_CONFIG, "timestep_spacing": "leading"})
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )  # fmt: skip


PRESETS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny": build_tiny_pipeline,
    "tiny-inpaint": build_tiny_inpaint_pipeline,
    "small": build_small_pipeline,
    "sd15": build_sd15_pipeline,
    "tiny-xl": build_tiny_xl_pipeline,
    "tiny-xl-refiner": build_tiny_xl_refiner_pipeline,
    "sdxl": build_sdxl_pipeline,
}


def ensure_preset_checkpoint(name: str, folder: Path) -> Path:
    """Build preset `name` into `folder` unless a complete one is there already."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    if (folder / "model_index.json").is_file():
        log.info("%s checkpoint: reusing %s", name, folder)
        return folder
    log.info("%s checkpoint: building into %s", name, folder)
    # a folder of this process's own: two exports sharing the work folder at once (two shells, a benchmark
    # beside an export) each build one, and the first to finish publishes it
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save_pipeline(PRESETS[name](), partial)
    try:
        partial.rename(folder)  # whole or not at all
    except OSError:  # a folder is there: another export's, or an incomplete one a process left when it died
        if (folder / "model_index.json").is_file():
            log.info("%s checkpoint: another export published %s first; using it", name, folder)
            shutil.rmtree(partial, ignore_errors=True)
            return folder
        shutil.rmtree(folder)
        partial.rename(folder)
    return folder
