"""The demo model's training command, run for a few steps: every stage runs, the folder it saves
loads in diffusers, and the pieces the recipe rests on do what they claim."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

from sd_triton.export.demo_data import Scene, Thing, random_scene
from sd_triton.export.tiny import SCHEDULER_CONFIG
from sd_triton.export.train_demo import (
    ATTRIBUTES,
    TrainConfig,
    _loss_weights,
    refine_decoder,
    scene_labels,
    train_demo_model,
)

QUICK = TrainConfig(
    batch_size=4,
    vae_steps=2,
    decoder_steps=2,
    text_steps=3,
    text_batch_size=8,
    unet_steps=3,
    log_every=1,
    eval_every=3,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo-train") / "model"
    return out, train_demo_model(out, QUICK)


def test_every_stage_runs_and_the_folder_loads_in_diffusers(trained: tuple[Path, dict]) -> None:
    out, report = trained
    stages = ["vae", "decoder", "text", "unet", "held-in", "held-out"]
    assert [s for s in stages if any(e["stage"] == s for e in report["losses"])] == stages
    assert set(report["final_loss"]) == {"vae", "decoder", "text_encoder", "unet"}
    assert json.loads((out / "training.json").read_text())["config"]["unet_steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False


def test_a_vae_can_be_reused_from_an_earlier_run(trained: tuple[Path, dict], tmp_path: Path) -> None:
    earlier, first = trained
    report = train_demo_model(
        tmp_path / "again", replace(QUICK, vae_from=str(earlier), decoder_steps=0, eval_every=0)
    )
    assert [e for e in report["losses"] if e["stage"] == "vae"] == [
        e for e in first["losses"] if e["stage"] == "vae"
    ]
    assert report["seconds"]["total_with_reused_vae"] > report["seconds"]["this_command"]
    a = (earlier / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "again" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == a


def test_the_text_encoder_is_frozen_while_the_unet_trains(trained: tuple[Path, dict], tmp_path: Path) -> None:
    # the same text stage, then 1 or 3 UNet steps: the same text encoder
    earlier, _ = trained
    weights = "text_encoder/model.safetensors"
    saved = []
    for unet_steps in (1, 3):
        out = tmp_path / f"unet-{unet_steps}"
        train_demo_model(out, replace(QUICK, vae_from=str(earlier), unet_steps=unet_steps, eval_every=0))
        saved.append((out / weights).read_bytes())
    assert saved[0] == saved[1]


def test_refining_the_decoder_changes_nothing_else(trained: tuple[Path, dict], tmp_path: Path) -> None:
    earlier, _ = trained
    report = refine_decoder(earlier, tmp_path / "refined", replace(QUICK, decoder_steps=2))
    assert [e["stage"] for e in report["losses"][-2:]] == ["held-in", "held-out"]
    assert "decoder" in report["final_loss"]
    for weights in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "refined" / weights).read_bytes() == (earlier / weights).read_bytes()
    before = AutoencoderKL.from_pretrained(earlier / "vae")
    after = AutoencoderKL.from_pretrained(tmp_path / "refined" / "vae")
    assert torch.equal(before.encoder.conv_in.weight, after.encoder.conv_in.weight)
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)


def test_scene_labels_cover_every_attribute() -> None:
    one = Scene((Thing("star", "red", "top left"),), "blue")
    labels = scene_labels(one)
    assert set(labels) == set(ATTRIBUTES)
    assert ATTRIBUTES["first_position"][labels["first_position"]] == "top left"
    assert ATTRIBUTES["second_color"][labels["second_color"]] == "none"
    rng = random.Random(0)
    two = next(s for s in iter(lambda: random_scene(rng), None) if len(s.things) == 2)
    assert ATTRIBUTES["second_shape"][scene_labels(two)["second_shape"]] == two.things[1].shape


def test_min_snr_weights_favour_noisy_steps_for_v_prediction() -> None:
    schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    timesteps = torch.tensor([0, 500, 999])
    weights = _loss_weights(schedule, timesteps, TrainConfig())
    alpha_bar = schedule.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / (snr + 1))
    assert weights[0] < 1 and weights[2] < weights[1]
    assert torch.equal(_loss_weights(schedule, timesteps, TrainConfig(snr_gamma=None)), torch.ones(3))
