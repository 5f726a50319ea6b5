"""An SDXL refiner checkpoint (`tiny-xl-refiner`: SDXL's second tokenizer and text encoder alone, the
aesthetic-score time ids) exported and served as its own pipeline: Triton against diffusers'
StableDiffusionXLImg2ImgPipeline on the same folder (the refiner's own use: image-to-image), the
aesthetic scores reaching the UNet, and the exported engines in process (ONNX and python-torch)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image
from tritonclient.utils import InferenceServerException

from sd_triton.contract import SCHEDULERS
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from sd_triton.runtime.local import LocalPipeline
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, triton_server
from tests.integration.test_parity import MAX_ABS_DIFF, init_image, max_abs_diff, reference_scheduler

PROMPT = "a lighthouse on a cliff at dusk"
STEPS = 8


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """tiny-xl-refiner exported (python-torch text encoder and UNet beside the ONNX graphs; the served
    engines python-ort), served: {'client', 'manifest', 'repo'}."""
    repo = tmp_path_factory.mktemp("xl-refiner") / "model_repository"
    manifest = run_export(ExportOptions("tiny-xl-refiner", repo, work_dir=WORK_DIR))
    with (
        triton_server(repo, repo.parent / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        yield {"client": client, "manifest": manifest, "repo": repo}


@pytest.fixture(scope="module")
def pipe(refiner: dict) -> StableDiffusionXLImg2ImgPipeline:
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner["manifest"]["source"]["path"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    pipe.checkpoint_scheduler, pipe.checkpoint_config = pipe.scheduler, dict(pipe.scheduler.config)
    return pipe


def test_the_export_is_a_refiner(refiner: dict) -> None:
    assert refiner["manifest"]["settings"]["architecture"] == "sdxl-refiner"
    text = refiner["client"].get_model_metadata("text_encoder", as_json=True)
    assert [t["name"] for t in text["inputs"]] == ["input_ids", "clip_skip", "token_embeddings"]
    assert [t["name"] for t in text["outputs"]] == ["last_hidden_state", "text_embeds"]
    folder = refiner["repo"] / "tokenizer" / "1"
    assert (folder / "tokenizer").is_dir() and not (folder / "tokenizer_2").exists()  # SDXL's second, alone


# (strength, negative prompt, guidance, num_images, height, width, aesthetic scores), in turn
CASES = [
    (0.3, None, 5.0, 1, 64, 64, {}),
    (0.6, "blurry", 7.5, 2, 48, 64, {}),
    (0.5, "fog", 6.0, 1, 64, 48, {"aesthetic_score": 8.0, "negative_aesthetic_score": 1.0}),
    (1.0, None, 1.0, 2, 56, 88, {"aesthetic_score": 3.0}),
]


@pytest.mark.parametrize(
    ("scheduler", "strength", "negative", "guidance", "n", "height", "width", "scores"),
    [(scheduler, *CASES[i % len(CASES)]) for i, scheduler in enumerate(SCHEDULERS)],
)
def test_the_refiner_matches_diffusers(
    refiner: dict, pipe: StableDiffusionXLImg2ImgPipeline, scheduler: str, strength: float,
    negative: str | None, guidance: float, n: int, height: int, width: int, scores: dict,
) -> None:  # fmt: skip
    image = init_image(height, width)
    named = None if scheduler == "default" else scheduler
    ours = txt2img(
        refiner["client"], PROMPT, negative_prompt=negative, image=image, strength=strength, height=height,
        width=width, steps=STEPS, guidance_scale=guidance, seed=21, scheduler=named, num_images=n, **scores,
    ).images  # fmt: skip
    pipe.scheduler = reference_scheduler(
        scheduler, type(pipe.checkpoint_scheduler), pipe.checkpoint_config, 21, n
    )
    theirs = pipe(
        PROMPT, image=Image.fromarray(image), strength=strength, negative_prompt=negative,
        num_inference_steps=STEPS, guidance_scale=guidance, num_images_per_prompt=n, output_type="np",
        generator=[torch.Generator().manual_seed(21 + i) for i in range(n)], **scores,
    ).images  # fmt: skip
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == (n, height, width, 3)
    assert max_abs_diff(ours, theirs) <= MAX_ABS_DIFF


def test_the_aesthetic_score_reaches_the_unet_and_only_a_refiner_takes_it(refiner: dict) -> None:
    common = dict(image=init_image(64, 64), strength=0.6, height=64, width=64, steps=4, seed=2)
    plain = txt2img(refiner["client"], PROMPT, **common).images
    scored = txt2img(refiner["client"], PROMPT, aesthetic_score=9.5, **common).images
    assert max_abs_diff(plain, scored) > 2
    with pytest.raises(InferenceServerException) as info:
        txt2img(refiner["client"], PROMPT, aesthetic_score=float("nan"), **common)
    assert "AESTHETIC_SCORE" in info.value.message() and "finite" in info.value.message()


def test_the_python_torch_refiner_engines_match_diffusers(
    tmp_path_factory: pytest.TempPathFactory, pipe: StableDiffusionXLImg2ImgPipeline
) -> None:
    """The refiner's PyTorch text encoder (its one folder, text_encoder_2) and UNet, run in process."""
    repo = tmp_path_factory.mktemp("xl-refiner-torch") / "repo"
    engines = {
        "text_encoder": "python-torch",
        "unet": "python-torch",
        "vae_decoder": "python-ort",
        "vae_encoder": "python-ort",
    }
    run_export(
        ExportOptions(
            "tiny-xl-refiner", repo, settings=RepositorySettings(engines=engines), work_dir=WORK_DIR
        )
    )  # type: ignore[arg-type]
    assert (repo / "text_encoder" / "1" / "text_encoder_2" / "config.json").is_file()
    local = LocalPipeline(repo, model_files={"text_encoder": "text_encoder_2", "unet": "unet"})
    image = init_image(64, 64)
    ours = local(
        PROMPT, image=image, strength=0.5, height=64, width=64, steps=6, guidance_scale=7.0, seed=4
    ).images
    pipe.scheduler = type(pipe.checkpoint_scheduler).from_config(pipe.checkpoint_config)
    theirs = pipe(
        PROMPT, image=Image.fromarray(image), strength=0.5, num_inference_steps=6, guidance_scale=7.0,
        generator=[torch.Generator().manual_seed(4)], output_type="np",
    ).images  # fmt: skip
    assert max_abs_diff(ours, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF
