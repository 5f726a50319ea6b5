"""`sd-triton train-demo-model`: a small Stable Diffusion-architecture model trained on this CPU on
synthetic coloured-shape scenes, so the demo shows a picture that follows its prompt.

Stages: 1. the VAE (reconstruction + a light KL term); 2. its decoder alone, the encoder frozen;
3. the text encoder, taught to tell captions apart (colour, shape and position of each object and
the background, classified from its pooled output), then frozen, as SD's CLIP text encoder is;
4. the UNet (v-prediction with min-SNR-5 loss weights, 10 % empty captions for classifier-free
guidance), with the held-in and held-out caption checks logged as it goes. Fixed seeds and fixed step counts
make a run reproducible; the result is a standard diffusers folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from sd_triton.export.demo_data import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZE,
    Scene,
    batch,
    check_scenes,
    held_in_prompts,
    held_out_prompts,
    random_scene,
    success_rates,
)
from sd_triton.export.tiny import (
    SCHEDULER_CONFIG,
    build_clip_tokenizer,
    save_pipeline,
    sd_pipeline,
    small_text_encoder,
    small_vae,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 32
    vae_steps: int = 1500
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # stage 2: the decoder alone, the encoder frozen (so the latents the UNet learns stay the same):
    # after stage 1 a quarter of the reconstructions had the object's colour wrong
    decoder_steps: int = 600
    decoder_lr: float = 1e-3
    unet_steps: int = 3500
    unet_lr: float = 1e-3
    uncond_fraction: float = 0.1
    # stage 3: the text encoder learns to tell captions apart (attribute classification from its
    # pooled output), then stays frozen under the UNet as SD's CLIP does; trained jointly with the
    # UNet instead, it never separated "left" from "right"
    text_steps: int = 1500
    text_lr: float = 2e-3
    text_batch_size: int = 128
    # v-prediction with min-SNR-5 loss weights: epsilon prediction gives almost no gradient to the
    # layout (decided at high noise), and the demo model never learnt positions with it
    prediction_type: str = "v_prediction"
    snr_gamma: float | None = 5.0
    threads: int = 2
    log_every: int = 50
    eval_every: int = 500  # held-in and held-out caption checks (in-process, DDIM 25, guidance 5); 0: never
    vae_from: str | None = None  # a folder this command saved: reuse its VAE instead of stage 1


def build_models(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel]:
    text_encoder = small_text_encoder(tokenizer)  # seeds torch with 0 first
    vae = small_vae(norm_num_groups=8)  # its scaling factor is measured after stage 1
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


class _Stage:
    """One training stage's optimizer steps, running-mean loss and progress lines."""

    def __init__(
        self,
        name: str,
        steps: int,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        config: TrainConfig,
        losses: list[dict],
        smoothing: float,
        clip: list[torch.nn.Parameter] | None = None,
    ) -> None:
        self.name, self.steps, self.optimizer, self.schedule = name, steps, optimizer, schedule
        self.log_every, self.losses, self.smoothing, self.clip = config.log_every, losses, smoothing, clip
        self.started, self.running = time.monotonic(), 0.0

    def update(self, step: int, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.clip, 1.0)
        self.optimizer.step()
        self.schedule.step()
        value = loss.item()
        self.running = (1 - self.smoothing) * self.running + self.smoothing * value if step > 1 else value
        if step % self.log_every == 0 or step == self.steps:
            _progress(self.name, step, self.steps, self.running, self.started, self.losses)


def train_vae(vae: AutoencoderKL, config: TrainConfig, losses: list[dict]) -> float:
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps)
    stage = _Stage("vae", config.vae_steps, optimizer, schedule, config, losses, 0.1)
    for step in range(1, config.vae_steps + 1):
        images = torch.from_numpy(batch(rng, config.batch_size)[0])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (
            torch.nn.functional.mse_loss(reconstruction, images)
            + config.vae_kl_weight * posterior.kl().mean()
        )
        stage.update(step, loss)
    return stage.running


# what the text encoder must tell apart: per object slot, its colour, shape and position ("none" for
# an absent second object), and the background colour
ATTRIBUTES: dict[str, list[str]] = {
    "background": list(COLORS),
    **{f"{slot}_color": [*COLORS, "none"] for slot in ("first", "second")},
    **{f"{slot}_shape": [*SHAPES, "none"] for slot in ("first", "second")},
    **{f"{slot}_position": [*POSITIONS, "none"] for slot in ("first", "second")},
}


def scene_labels(scene: Scene) -> dict[str, int]:
    labels = {"background": ATTRIBUTES["background"].index(scene.background)}
    for slot, index in (("first", 0), ("second", 1)):
        thing = scene.things[index] if index < len(scene.things) else None
        for attribute in ("color", "shape", "position"):
            value = getattr(thing, attribute) if thing else "none"
            labels[f"{slot}_{attribute}"] = ATTRIBUTES[f"{slot}_{attribute}"].index(value)
    return labels


def train_text_encoder(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, config: TrainConfig, losses: list[dict]
) -> float:
    """Attribute classification from the pooled output (the end-of-text token, which sees the whole
    caption); the heads are thrown away afterwards."""
    rng = random.Random(config.seed + 3)
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(v)) for name, v in ATTRIBUTES.items()})
    params = list(text_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.text_lr)
    schedule = _warmup_cosine(optimizer, config.text_steps, warmup=min(100, config.text_steps // 10 + 1))
    stage = _Stage("text", config.text_steps, optimizer, schedule, config, losses, 0.05)
    for step in range(1, config.text_steps + 1):
        scenes = [random_scene(rng) for _ in range(config.text_batch_size)]
        ids = tokenizer(
            [s.caption for s in scenes],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        )
        pooled = text_encoder(ids.input_ids).pooler_output
        labels = [scene_labels(s) for s in scenes]
        loss = sum(
            torch.nn.functional.cross_entropy(head(pooled), torch.tensor([row[name] for row in labels]))
            for name, head in heads.items()
        )
        stage.update(step, loss)
    return stage.running


def train_decoder(vae: AutoencoderKL, config: TrainConfig, losses: list[dict]) -> float:
    """Reconstruction loss through the decoder only; the encoder (and so the latent space) is fixed."""
    rng = random.Random(config.seed + 4)
    generator = torch.Generator().manual_seed(config.seed + 4)
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.decoder_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.decoder_steps)
    stage = _Stage("decoder", config.decoder_steps, optimizer, schedule, config, losses, 0.1)
    for step in range(1, config.decoder_steps + 1):
        images = torch.from_numpy(batch(rng, config.batch_size)[0])
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator)
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, images)
        stage.update(step, loss)
    vae.requires_grad_(True)
    return stage.running


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, config: TrainConfig) -> float:
    """1 / std of the latents, as SD's 0.18215 was chosen."""
    images = torch.from_numpy(batch(random.Random(config.seed + 1), 256)[0])
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


def _loss_weights(
    noise_schedule: DDPMScheduler, timesteps: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), 1 everywhere without a gamma."""
    if config.snr_gamma is None:
        return torch.ones(len(timesteps))
    alpha_bar = noise_schedule.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=config.snr_gamma)
    return clipped / (snr + 1) if config.prediction_type == "v_prediction" else clipped / snr


@torch.no_grad()
def caption_quality(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    config: TrainConfig,
) -> dict[str, dict[str, float]]:
    """The caption check rates of the model as it is, with diffusers' own pipeline at the demo's
    sampling settings: 20 held-in and 20 held-out captions (the full checks are perf/demo_quality.py)."""
    pipeline = sd_pipeline(tokenizer, text_encoder.eval(), vae, unet.eval(), config.prediction_type)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
    pipeline.set_progress_bar_config(disable=True)
    rates = {}
    for name, prompts in (("held-in", held_in_prompts(20)), ("held-out", held_out_prompts(20))):
        images = pipeline(
            [scene.caption for scene, _ in prompts],
            height=SIZE,
            width=SIZE,
            num_inference_steps=25,
            guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(seed) for _, seed in prompts],
            output_type="np",
        ).images
        uint8 = list((images * 255).round().astype("uint8"))
        rates[name] = success_rates(check_scenes(uint8, [scene for scene, _ in prompts]))
    unet.train()  # the text encoder stays frozen in eval mode
    return rates


def _log_quality(losses: list[dict], step: int | str, rates: dict[str, dict[str, float]]) -> None:
    for name, values in rates.items():
        log.info("after %s: %s checks %s", step, name, {k: f"{v:.0%}" for k, v in values.items()})
        losses.append({"stage": name, "step": step, **values})


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
    noise_schedule = DDPMScheduler.from_config(  # the same betas as inference
        {**SCHEDULER_CONFIG, "prediction_type": config.prediction_type}
    )
    text_encoder.requires_grad_(False)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr)
    schedule = _warmup_cosine(optimizer, config.unet_steps, warmup=min(100, config.unet_steps // 10 + 1))
    scaling = vae.config.scaling_factor
    vae.requires_grad_(False)
    stage = _Stage("unet", config.unet_steps, optimizer, schedule, config, losses, 0.02, clip=params)
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
        with torch.no_grad():
            hidden = text_encoder(ids.input_ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        if config.prediction_type == "v_prediction":
            target = noise_schedule.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * _loss_weights(noise_schedule, timesteps, config)).mean()
        stage.update(step, loss)
        if config.eval_every and (step % config.eval_every == 0 or step == config.unet_steps):
            _log_quality(losses, step, caption_quality(tokenizer, text_encoder, vae, unet, config))
    return stage.running


def _reused_vae(folder: Path) -> tuple[AutoencoderKL, list[dict], float]:
    """A VAE this command trained before, with its stage's loss log and time."""
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    entries = [e for e in json.loads((folder / "training.json").read_text())["losses"] if e["stage"] == "vae"]
    if not entries:
        raise ValueError(f"{folder}/training.json has no VAE losses: not a folder this command saved")
    log.info("reusing the VAE of %s (trained in %.0f s)", folder, entries[-1]["seconds"])
    return vae, entries, float(entries[-1]["seconds"])


def refine_decoder(folder: Path, out: Path, config: TrainConfig) -> dict:
    """Stage 2 alone on a folder this command saved (the encoder, text encoder and UNet unchanged)."""
    torch.set_num_threads(config.threads)
    started = time.monotonic()
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    earlier = json.loads((folder / "training.json").read_text())
    losses = earlier["losses"]
    log.info("stage 2 alone: decoder of %s, %d steps", folder, config.decoder_steps)
    decoder_loss = train_decoder(pipeline.vae, config, losses)
    pipeline.vae.eval()
    if config.eval_every:
        parts = (pipeline.tokenizer, pipeline.text_encoder, pipeline.vae, pipeline.unet)
        rates = caption_quality(
            *parts, replace(config, prediction_type=pipeline.scheduler.config.prediction_type)
        )
        _log_quality(losses, "decoder", rates)
    if out.resolve() != folder.resolve():  # the other parts stay byte for byte what they were
        shutil.copytree(folder, out, dirs_exist_ok=True)
    pipeline.vae.save_pretrained(out / "vae")
    seconds = {**earlier["seconds"], "decoder": round(time.monotonic() - started, 1)}
    seconds["total"] = round(
        seconds.get("total_with_reused_vae", seconds.get("total", 0)) + seconds["decoder"], 1
    )
    report = {
        "config": earlier["config"],
        "decoder_config": asdict(config),
        "final_loss": {**earlier["final_loss"], "decoder": round(decoder_loss, 5)},
        "seconds": seconds,
        "losses": losses,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("saved %s (seconds: %s)", out, seconds)
    return report


def train_demo_model(out: Path, config: TrainConfig) -> dict:
    """Train and save a diffusers folder at `out`, with `training.json` (config, losses, times)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.monotonic()
    seconds: dict[str, float] = {}
    losses: list[dict] = []
    # 1. Tokenizer (the real SD 1.x vocabulary) and fresh models, or a VAE trained before.
    tokenizer = build_clip_tokenizer()
    text_encoder, vae, unet = build_models(tokenizer)
    if config.vae_from:
        vae, losses, seconds["vae"] = _reused_vae(Path(config.vae_from))
        vae_loss = losses[-1]["loss"]
    else:
        # 2. Stage 1: the VAE.
        log.info("stage 1/4: VAE, %d steps of %d images", config.vae_steps, config.batch_size)
        vae_loss = train_vae(vae, config, losses)
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, config))
        seconds["vae"] = time.monotonic() - started
    # 3. Stage 2: the decoder alone.
    log.info("stage 2/4: decoder, %d steps, encoder frozen", config.decoder_steps)
    stage = time.monotonic()
    decoder_loss = train_decoder(vae, config, losses) if config.decoder_steps else vae_loss
    seconds["decoder"] = time.monotonic() - stage
    vae.eval()
    # 4. Stage 3: the text encoder, then frozen.
    log.info("stage 3/4: text encoder, %d steps of %d captions", config.text_steps, config.text_batch_size)
    stage = time.monotonic()
    text_loss = train_text_encoder(text_encoder, tokenizer, config, losses)
    text_encoder.eval()
    seconds["text_encoder"] = time.monotonic() - stage
    # 5. Stage 4: the UNet.
    log.info("stage 4/4: UNet, %d steps of %d images", config.unet_steps, config.batch_size)
    stage = time.monotonic()
    unet_loss = train_unet(unet, text_encoder, vae, tokenizer, config, losses)
    seconds["unet"] = time.monotonic() - stage
    # 6. Save a standard diffusers folder.
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline(sd_pipeline(tokenizer, text_encoder, vae, unet.eval(), config.prediction_type), out)
    seconds["this_command"] = time.monotonic() - started
    seconds["total_with_reused_vae"] = seconds["this_command"] + (seconds["vae"] if config.vae_from else 0.0)
    report = {
        "config": asdict(config),
        "final_loss": {
            "vae": round(vae_loss, 5),
            "decoder": round(decoder_loss, 5),
            "text_encoder": round(text_loss, 5),
            "unet": round(unet_loss, 5),
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "losses": losses,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("saved %s (seconds: %s; losses: %s)", out, report["seconds"], report["final_loss"])
    return report
