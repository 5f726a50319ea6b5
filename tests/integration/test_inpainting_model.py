"""A 9-channel inpainting checkpoint (`tiny-inpaint`) exported and served: Triton against diffusers'
StableDiffusionInpaintPipeline on the same folder, and the requests such a model cannot serve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from tritonclient.utils import InferenceServerException

from sd_triton.contract import SCHEDULERS
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, triton_server
from tests.integration.test_parity import (
    MAX_ABS_DIFF,
    init_image,
    inpainting_mask,
    max_abs_diff,
    reference_scheduler,
)

PROMPT = "a red door in a white wall"
STEPS = 8


@pytest.fixture(scope="module")
def exported_inpaint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    repo = tmp_path_factory.mktemp("inpaint") / "model_repository"
    return {"repo": repo, "manifest": run_export(ExportOptions("tiny-inpaint", repo, work_dir=WORK_DIR))}


@pytest.fixture(scope="module")
def client(exported_inpaint: dict) -> Iterator[grpcclient.InferenceServerClient]:
    repo = exported_inpaint["repo"]
    with (
        triton_server(repo, repo.parent / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as grpc,
    ):
        yield grpc


@pytest.fixture(scope="module")
def pipe(exported_inpaint: dict) -> StableDiffusionInpaintPipeline:
    folder = Path(exported_inpaint["manifest"]["source"]["path"])
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 9
    pipe.checkpoint_scheduler, pipe.checkpoint_config = pipe.scheduler, dict(pipe.scheduler.config)
    return pipe


# (strength, guidance, negative prompt, num_images, height, width), taken in turn by the schedulers
CASES = [
    (1.0, 7.5, "blurry", 2, 64, 48),
    (1.0, 5.0, None, 1, 56, 88),
    (0.6, 6.0, None, 2, 64, 64),
    (0.8, 1.0, None, 1, 48, 64),
]


@pytest.mark.parametrize(
    ("scheduler", "strength", "guidance", "negative", "n", "height", "width"),
    [(scheduler, *CASES[i % len(CASES)]) for i, scheduler in enumerate(SCHEDULERS)],
)
def test_an_inpainting_unet_matches_diffusers(
    client, pipe, scheduler: str, strength: float, guidance: float, negative: str | None, n: int,
    height: int, width: int,
) -> None:  # fmt: skip
    image, mask = init_image(height, width), inpainting_mask(height, width)
    named = None if scheduler == "default" else scheduler
    ours = txt2img(
        client, PROMPT, negative_prompt=negative, image=image, mask=mask, strength=strength, height=height,
        width=width, steps=STEPS, guidance_scale=guidance, seed=5, scheduler=named, num_images=n,
    ).images  # fmt: skip
    pipe.scheduler = reference_scheduler(
        scheduler, type(pipe.checkpoint_scheduler), pipe.checkpoint_config, 5, n
    )
    theirs = pipe(
        PROMPT, negative_prompt=negative, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
        strength=strength, height=height, width=width, num_inference_steps=STEPS, guidance_scale=guidance,
        num_images_per_prompt=n, generator=[torch.Generator().manual_seed(5 + i) for i in range(n)],
        output_type="np",
    ).images  # fmt: skip
    theirs = (theirs * 255).round().astype(np.uint8)
    assert max_abs_diff(ours, theirs) <= MAX_ABS_DIFF
    other = txt2img(
        client, PROMPT, negative_prompt=negative, image=image, mask=255 - mask, strength=strength,
        height=height, width=width, steps=STEPS, guidance_scale=guidance, seed=5, scheduler=named,
        num_images=n,
    ).images  # fmt: skip
    assert max_abs_diff(ours, other) > 2 * MAX_ABS_DIFF  # the mask reaches the UNet


@pytest.mark.parametrize(("inputs", "named"), [({}, "IMAGE"), ({"image": True}, "MASK")])
def test_an_inpainting_model_needs_an_image_and_a_mask(client, inputs: dict, named: str) -> None:
    extra = {"image": init_image(32, 32)} if inputs.get("image") else {}
    with pytest.raises(InferenceServerException, match=f"{named}: this is an inpainting model"):
        txt2img(client, PROMPT, height=32, width=32, steps=2, seed=1, **extra)
    assert client.is_model_ready("txt2img")
