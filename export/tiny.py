"""A small Stable Diffusion-shaped checkpoint, built deterministically for tests and the demo.

The weights are random (fixed seed); the tokenizer is the real SD 1.x CLIP tokenizer, rebuilt from
the BPE vocabulary file that ships inside the open-clip-torch wheel (MIT licence).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SEED = 0
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges: 48,894, for a 49,408-token vocabulary

# Stable Diffusion 1.x's scheduler config.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)
SCHEDULER_EXTRA = {"clip_sample": False}


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values, in vocab order:
    bytes that are printable Latin-1 stand for themselves, the others map past U+00FF."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = (b for b in range(256) if b not in printable)
    return [chr(b) for b in printable] + [chr(256 + i) for i, _ in enumerate(extra)]


def clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # found, not imported: its imports need torchvision
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the open-clip-torch wheel")
    return path


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The SD 1.x CLIP tokenizer: 49,408 tokens, context length 77 (SDXL's second tokenizer pads with
    "!")."""
    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def _small_text_config(tokenizer: CLIPTokenizer, hidden: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def small_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text model over the full vocabulary, initialised from SEED."""
    torch.manual_seed(SEED)
    return CLIPTextModel(_small_text_config(tokenizer))


def _tiny_xl_unet(cross_attention_dim: int, time_ids: int, seed: int) -> UNet2DConditionModel:
    """An SDXL-shaped UNet at the smallest size: "text_time" added conditioning (the pooled 32-wide text
    embeddings and `time_ids` numbers, 8 wide each), cross-attention over `cross_attention_dim`."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + 32,
    )


def build_tiny_xl_pipeline() -> StableDiffusionXLPipeline:
    """An SDXL-shaped model at the smallest size: two CLIP text encoders (32 and 48 wide, the second with
    a 32-wide projection: the pooled embeddings), a UNet with SDXL's added conditioning ("text_time":
    pooled text + the six size numbers) and cross-attention over both encoders' states (80 wide), the tiny
    VAE. Random weights from SEED, 64x64 native. The second tokenizer pads with "!", as SDXL's does."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    text_encoder = small_text_encoder(tokenizer)
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_small_text_config(tokenizer_2, hidden=48))
    unet = _tiny_xl_unet(cross_attention_dim=32 + 48, time_ids=6, seed=SEED)
    torch.manual_seed(SEED)
    vae = small_vae(norm_num_groups=16)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config({**SCHEDULER_CONFIG, "timestep_spacing": "leading"}),
    )


def build_tiny_xl_refiner_pipeline() -> StableDiffusionXLImg2ImgPipeline:
    """tiny-xl's refiner, shaped as SDXL's: the second tokenizer and text encoder only (tiny-xl's very
    ones), a UNet with cross-attention over that encoder's states (48 wide) and the aesthetic-score time
    ids (5: original size, crop, score), tiny-xl's VAE (the hand-off passes latents between the two)."""
    base = build_tiny_xl_pipeline()
    unet = _tiny_xl_unet(cross_attention_dim=48, time_ids=5, seed=SEED + 2)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def small_vae(norm_num_groups: int) -> AutoencoderKL:
    """SD's VAE layout, narrowed: 4 levels of 16/32/32/32 channels (8x down), 4 latent channels, 64x64."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=64,
        scaling_factor=0.18215,
    )


def sd_pipeline(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    prediction_type: str = "epsilon",
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD 1.x's scheduler (and the UNet's prediction type) and no
    safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipeline: DiffusionPipeline, folder: Path) -> None:
    pipeline.save_pretrained(folder)
    # SD 1.x's scheduler_config.json carries clip_sample=false for the schedulers built from it
    # (PNDM itself has no such option, so it is not saved with it)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **SCHEDULER_EXTRA}, indent=2))


def build_tiny_inpaint_pipeline() -> StableDiffusionInpaintPipeline:
    """`tiny` with a 9-channel inpainting UNet (latents, mask, masked image latents), as
    StableDiffusionInpaintPipeline's checkpoints have it."""
    return StableDiffusionInpaintPipeline(**build_tiny_pipeline(unet_in_channels=9).components)


def build_tiny_pipeline(unet_in_channels: int = 4) -> StableDiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    text_encoder = small_text_encoder(tokenizer)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(SEED)
    vae = small_vae(norm_num_groups=16)
    return sd_pipeline(tokenizer, text_encoder, vae, unet)
