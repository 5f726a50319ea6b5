"""`sd-triton train-demo-model`: a small Stable Diffusion-architecture model trained on this CPU on
synthetic coloured-shape scenes, so the demo shows a picture that follows its prompt.

Stages: 1. the VAE (reconstruction + a light KL term); 2. the UNet and the text encoder together
(epsilon prediction, 10 % empty captions for classifier-free guidance). Fixed seeds and fixed step
counts make a run reproducible; the result is a standard diffusers folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from export.demo_data import SIZE, batch
from export.tiny import SCHEDULER_CONFIG, build_clip_tokenizer, save_pipeline, sd_pipeline, small_text_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 32
    vae_steps: int = 600
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_lr: float = 1e-3
    uncond_fraction: float = 0.1
    threads: int = 2
    log_every: int = 50
    resume_from: str | None = None  # a folder this command saved: keep training its UNet and text encoder


def build_models(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    text_encoder = small_text_encoder(tokenizer)  # seeds torch with 0 first
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=16,
        norm_num_groups=32,
    )
    return text_encoder, vae, unet


def _warmup_cosine(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(stage: str, step: int, total: int, loss: float, started: float, losses: list[dict]) -> None:
    elapsed = time.monotonic() - started
    eta = elapsed / step * (total - step)
    log.info("%s step %d/%d loss %.4f (%.0f s, ~%.0f s left)", stage, step, total, loss, elapsed, eta)
    losses.append({"stage": stage, "step": step, "loss": round(loss, 5), "seconds": round(elapsed, 1)})


def train_vae(vae: AutoencoderKL, config: TrainConfig, losses: list[dict]) -> float:
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps)
    started, running = time.monotonic(), 0.0
    for step in range(1, config.vae_steps + 1):
        images = torch.from_numpy(batch(rng, config.batch_size)[0])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (
            torch.nn.functional.mse_loss(reconstruction, images)
            + config.vae_kl_weight * posterior.kl().mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        if step % config.log_every == 0 or step == config.vae_steps:
            _progress("vae", step, config.vae_steps, running, started, losses)
    return running


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, config: TrainConfig) -> float:
    """1 / std of the latents, as SD's 0.18215 was chosen."""
    images = torch.from_numpy(batch(random.Random(config.seed + 1), 256)[0])
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    config: TrainConfig,
    losses: list[dict],
) -> float:
    rng = random.Random(config.seed + 2)
    generator = torch.Generator().manual_seed(config.seed + 2)
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)  # the same betas as inference
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr)
    schedule = _warmup_cosine(optimizer, config.unet_steps, warmup=min(100, config.unet_steps // 10 + 1))
    scaling = vae.config.scaling_factor
    vae.requires_grad_(False)
    started, running = time.monotonic(), 0.0
    for step in range(1, config.unet_steps + 1):
        images, captions = batch(rng, config.batch_size)
        captions = ["" if rng.random() < config.uncond_fraction else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(torch.from_numpy(images)).latent_dist.sample(generator) * scaling
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_schedule.config.num_train_timesteps, (len(captions),), generator=generator
        )
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids.input_ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % config.log_every == 0 or step == config.unet_steps:
            _progress("unet", step, config.unet_steps, running, started, losses)
    return running


def train_demo_model(out: Path, config: TrainConfig) -> dict:
    """Train and save a diffusers folder at `out`, with `training.json` (config, losses, times)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.monotonic()
    # 1. Tokenizer (the real SD 1.x vocabulary) and fresh models.
    tokenizer = build_clip_tokenizer()
    losses: list[dict] = []
    if config.resume_from:
        source = Path(config.resume_from)
        text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder")
        vae = AutoencoderKL.from_pretrained(source / "vae")
        unet = UNet2DConditionModel.from_pretrained(source / "unet")
        losses = json.loads((source / "training.json").read_text())["losses"]
        vae_loss = next(entry["loss"] for entry in reversed(losses) if entry["stage"] == "vae")
        log.info("resuming from %s: its VAE is kept", source)
    else:
        text_encoder, vae, unet = build_models(tokenizer)
        # 2. Stage 1: the VAE.
        log.info("stage 1/2: VAE, %d steps of %d images", config.vae_steps, config.batch_size)
        vae_loss = train_vae(vae, config, losses)
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, config))
    vae.eval()
    vae_seconds = time.monotonic() - started
    # 3. Stage 2: the UNet with the text encoder.
    log.info("stage 2/2: UNet + text encoder, %d steps of %d images", config.unet_steps, config.batch_size)
    unet_loss = train_unet(unet, text_encoder, vae, tokenizer, config, losses)
    # 4. Save a standard diffusers folder.
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline(sd_pipeline(tokenizer, text_encoder.eval(), vae, unet.eval()), out)
    report = {
        "config": asdict(config),
        "final_loss": {"vae": round(vae_loss, 5), "unet": round(unet_loss, 5)},
        "seconds": {"vae": round(vae_seconds, 1), "total": round(time.monotonic() - started, 1)},
        "losses": losses,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info(
        "saved %s in %.0f s (losses: vae %.4f, unet %.4f)",
        out,
        report["seconds"]["total"],
        vae_loss,
        unet_loss,
    )
    return report
