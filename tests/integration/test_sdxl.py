"""An SDXL checkpoint (`tiny-xl`: two tokenizers and text encoders, the UNet's added conditioning)
exported and served, on both UNet paths: Triton against diffusers' StableDiffusionXLPipeline on the same
folder, and the requests such a model refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import StableDiffusionXLPipeline
from tritonclient.utils import InferenceServerException

from sd_triton.contract import SCHEDULERS
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from sd_triton.gateway.process import GatewayProcess
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, free_port, triton_server
from tests.integration.test_parity import MAX_ABS_DIFF, max_abs_diff, reference_scheduler
from tests.load import NO_CACHE, job_end, job_events

PROMPT = "a lighthouse on a cliff at dusk"
STEPS = 8


@pytest.fixture(scope="module", params=["inline", "bls"])
def xl(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """tiny-xl exported for that UNet path, served: {'client', 'manifest', 'path'}."""
    repo = tmp_path_factory.mktemp(f"xl-{request.param}") / "model_repository"
    settings = RepositorySettings(unet_path=request.param)
    manifest = run_export(ExportOptions("tiny-xl", repo, settings=settings, work_dir=WORK_DIR))
    with (
        triton_server(repo, repo.parent / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        yield {"client": client, "manifest": manifest, "path": request.param, "server": server}


@pytest.fixture(scope="module")
def pipe(xl: dict) -> StableDiffusionXLPipeline:
    folder = Path(xl["manifest"]["source"]["path"])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    pipe.checkpoint_scheduler, pipe.checkpoint_config = pipe.scheduler, dict(pipe.scheduler.config)
    return pipe


def _scheduler(pipe: StableDiffusionXLPipeline, scheduler: str, seed: int, n: int) -> object:
    return reference_scheduler(scheduler, type(pipe.checkpoint_scheduler), pipe.checkpoint_config, seed, n)


def test_the_export_is_sdxl(xl: dict) -> None:
    manifest = xl["manifest"]
    assert manifest["settings"]["architecture"] == "sdxl"
    repo = Path(manifest["source"]["path"])
    assert (repo / "text_encoder_2").is_dir() and (repo / "tokenizer_2").is_dir()
    meta = xl["client"].get_model_metadata("unet", as_json=True)
    assert [t["name"] for t in meta["inputs"]][-2:] == ["text_embeds", "time_ids"]
    text = xl["client"].get_model_metadata("text_encoder", as_json=True)
    assert [t["name"] for t in text["inputs"]] == [
        "input_ids",
        "clip_skip",
        "token_embeddings",
        "input_ids_2",
        "token_embeddings_2",
    ]
    assert [t["name"] for t in text["outputs"]] == ["last_hidden_state", "text_embeds"]


# (negative prompt, guidance, num_images, height, width, size conditioning, negative size conditioning),
# taken in turn by the schedulers. No negative prompt: zero unconditional embeddings (the checkpoint's
# force_zeros_for_empty_prompt); "" is a prompt like any other.
SIZES = (128, 96, 8, 4, 64, 48)  # original (h, w), crop (top, left), target (h, w)
CASES = [
    (None, 5.0, 1, 64, 64, None, None),
    ("blurry", 7.5, 2, 48, 64, None, None),
    (None, 1.0, 2, 64, 48, None, None),
    ("fog", 6.0, 1, 56, 88, SIZES, None),
    ("", 7.5, 1, 64, 64, (256, 256, 0, 0, 64, 64), (64, 64, 16, 16, 32, 32)),
]


def _conditioning(sizes: tuple[int, ...] | None, prefix: str = "") -> dict[str, tuple[int, int]]:
    """diffusers' keyword arguments for 6 size-conditioning numbers."""
    if sizes is None:
        return {}
    names = ("original_size", "crops_coords_top_left", "target_size")
    return {f"{prefix}{name}": (sizes[2 * i], sizes[2 * i + 1]) for i, name in enumerate(names)}


@pytest.mark.parametrize(
    ("scheduler", "negative", "guidance", "n", "height", "width", "sizes", "negative_sizes"),
    [(scheduler, *CASES[i % len(CASES)]) for i, scheduler in enumerate(SCHEDULERS)],
)
def test_sdxl_matches_diffusers(
    xl: dict, pipe: StableDiffusionXLPipeline, scheduler: str, negative: str | None, guidance: float, n: int,
    height: int, width: int, sizes: tuple | None, negative_sizes: tuple | None,
) -> None:  # fmt: skip
    named = None if scheduler == "default" else scheduler
    ours = txt2img(
        xl["client"], PROMPT, negative_prompt=negative, height=height, width=width, steps=STEPS,
        guidance_scale=guidance, seed=11, scheduler=named, num_images=n, size_conditioning=sizes,
        negative_size_conditioning=negative_sizes,
    ).images  # fmt: skip
    pipe.scheduler = _scheduler(pipe, scheduler, 11, n)
    theirs = pipe(
        PROMPT, negative_prompt=negative, height=height, width=width, num_inference_steps=STEPS,
        guidance_scale=guidance, num_images_per_prompt=n, output_type="np",
        generator=[torch.Generator().manual_seed(11 + i) for i in range(n)],
        **_conditioning(sizes), **_conditioning(negative_sizes, "negative_"),
    ).images  # fmt: skip
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == (n, height, width, 3)
    assert ours.std() > 5, "a flat image would make the comparison meaningless"
    assert max_abs_diff(ours, theirs) <= MAX_ABS_DIFF


def test_the_conditioning_reaches_the_unet(xl: dict) -> None:
    """Other size conditioning, other images; no negative prompt (zeros) is not the empty one."""
    client = xl["client"]
    common = dict(height=64, width=64, steps=4, guidance_scale=7.5, seed=2)
    plain = txt2img(client, PROMPT, **common).images
    sized = txt2img(client, PROMPT, size_conditioning=(512, 512, 0, 0, 64, 64), **common).images
    empty = txt2img(client, PROMPT, negative_prompt="", **common).images
    assert max_abs_diff(plain, sized) > 2
    assert max_abs_diff(plain, empty) > 2


@pytest.mark.parametrize(
    ("sizes", "words"),
    [
        ((64, 64, 0, 0, 64), ["SIZE_CONDITIONING", "Expected [6], got [5]"]),  # Triton's own check
        ((64, 64, -8, 0, 64, 64), ["SIZE_CONDITIONING", "within 0..65536"]),
        ((0, 64, 0, 0, 64, 64), ["SIZE_CONDITIONING", ">= 1"]),
    ],
)
def test_bad_size_conditioning_names_the_input(xl: dict, sizes: tuple, words: list[str]) -> None:
    with pytest.raises(InferenceServerException) as info:
        txt2img(xl["client"], PROMPT, height=64, width=64, steps=2, size_conditioning=sizes)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    for word in words:
        assert word in info.value.message(), info.value.message()
    assert txt2img(xl["client"], PROMPT, height=64, width=64, steps=2).images.shape == (1, 64, 64, 3)


def test_the_gateway_serves_sdxl_sync_and_as_a_streamed_job(xl: dict, tmp_path: Path) -> None:
    """The JSON API's size fields reach the model; a job (Triton's txt2img_stream, its own loop) streams
    every step and ends with the image /v1/generate gives (whose parity the tests above show)."""
    gateway = GatewayProcess(xl["server"].grpc_url, port=free_port(), log_file=tmp_path / "gw.log")
    body = {"prompt": PROMPT, "height": 64, "width": 48, "steps": 5, "seed": 4, "original_size": [128, 96]}
    with gateway, httpx.Client(base_url=gateway.url, timeout=60, headers=NO_CACHE) as http:
        models = http.get("/v1/models").json()["data"]
        assert [m["architecture"] for m in models] == ["sdxl"]
        sync = http.post("/v1/generate", json=body)
        assert sync.status_code == 200, sync.text
        plain = http.post("/v1/generate", json={**body, "original_size": None}).json()
        job = http.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        ended = job_end(http, job_id).json()
        events = [e["event"] for e in job_events(http, job_id)]
    assert ended["status"] == "completed", ended
    assert events.count("step") == 5 and events[-1] == "completed"
    assert ended["result"]["images"][0]["base64"] == sync.json()["images"][0]["base64"]
    assert plain["images"][0]["base64"] != sync.json()["images"][0]["base64"]  # the size reached the UNet


# SDXL image-to-image: (scheduler, strength, negative prompt, guidance, num_images, height, width)
IMG2IMG_CASES = [
    ("default", 0.6, None, 5.0, 2, 64, 64),
    ("dpmpp_2m_karras", 0.3, "blurry", 7.5, 1, 48, 64),
    ("euler_a", 1.0, None, 1.0, 2, 64, 48),
    ("ddim", 0.5, "", 6.0, 1, 56, 88),
]


@pytest.mark.parametrize(
    ("scheduler", "strength", "negative", "guidance", "n", "height", "width"), IMG2IMG_CASES
)
def test_sdxl_img2img_matches_diffusers(
    xl: dict, pipe: StableDiffusionXLPipeline, scheduler: str, strength: float, negative: str | None,
    guidance: float, n: int, height: int, width: int,
) -> None:  # fmt: skip
    """An init image through Triton against StableDiffusionXLImg2ImgPipeline on the same modules."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from tests.integration.test_parity import init_image

    image = init_image(height, width)
    named = None if scheduler == "default" else scheduler
    ours = txt2img(
        xl["client"], PROMPT, negative_prompt=negative, image=image, strength=strength, height=height,
        width=width, steps=STEPS, guidance_scale=guidance, seed=9, scheduler=named, num_images=n,
    ).images  # fmt: skip
    img2img = StableDiffusionXLImg2ImgPipeline(
        **{**pipe.components, "scheduler": _scheduler(pipe, scheduler, 9, n)}
    )
    img2img.set_progress_bar_config(disable=True)
    theirs = img2img(
        PROMPT, image=Image.fromarray(image), strength=strength, negative_prompt=negative,
        num_inference_steps=STEPS, guidance_scale=guidance, num_images_per_prompt=n, output_type="np",
        generator=[torch.Generator().manual_seed(9 + i) for i in range(n)],
    ).images  # fmt: skip
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == (n, height, width, 3)
    assert max_abs_diff(ours, theirs) <= MAX_ABS_DIFF


@pytest.mark.parametrize(
    ("scheduler", "strength", "negative", "guidance", "n"),
    [("default", 1.0, None, 5.0, 2), ("unipc", 0.7, "fog", 7.5, 1)],
)
def test_sdxl_inpainting_matches_diffusers(
    xl: dict, pipe: StableDiffusionXLPipeline, scheduler: str, strength: float, negative: str | None,
    guidance: float, n: int,
) -> None:  # fmt: skip
    """Image and mask through Triton against StableDiffusionXLInpaintPipeline (a regular 4-channel UNet)."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image

    from tests.integration.test_parity import init_image, inpainting_mask

    image, mask = init_image(64, 48), inpainting_mask(64, 48)
    named = None if scheduler == "default" else scheduler
    ours = txt2img(
        xl["client"], PROMPT, negative_prompt=negative, image=image, mask=mask, strength=strength, height=64,
        width=48, steps=STEPS, guidance_scale=guidance, seed=13, scheduler=named, num_images=n,
    ).images  # fmt: skip
    inpaint = StableDiffusionXLInpaintPipeline(
        **{**pipe.components, "scheduler": _scheduler(pipe, scheduler, 13, n)}
    )
    inpaint.set_progress_bar_config(disable=True)
    theirs = inpaint(
        PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
        negative_prompt=negative, height=64, width=48, num_inference_steps=STEPS, guidance_scale=guidance,
        num_images_per_prompt=n, output_type="np",
        generator=[torch.Generator().manual_seed(13 + i) for i in range(n)],
    ).images  # fmt: skip
    theirs = (theirs * 255).round().astype(np.uint8)
    assert max_abs_diff(ours, theirs) <= MAX_ABS_DIFF
