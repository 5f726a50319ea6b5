"""Images from Triton's txt2img against diffusers' StableDiffusionPipeline on the same folder, on both
UNet paths: `inline` (the session's repository: the default) and `bls` (a repository of its own).

The reference schedulers are built here from diffusers' classes directly, not through our
scheduler table, so a wrong mapping in the product fails these tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from sd_triton.contract import SCHEDULERS
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, triton_server

log = logging.getLogger(__name__)
MAX_ABS_DIFF = 2  # on the 0-255 scale
REPORT = Path(__file__).resolve().parents[2] / ".cache" / "parity.json"

KARRAS = {"use_karras_sigmas": True}
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# None: the pipeline's own scheduler, as from_pretrained loaded it from the checkpoint
REFERENCE = {
    "default": (None, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, KARRAS),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, DPMPP_2M),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**DPMPP_2M, **KARRAS}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, DPMPP_2M_SDE),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler, {**DPMPP_2M_SDE, **KARRAS}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "dpmpp_sde_karras": (DPMSolverSDEScheduler, KARRAS),
    "deis": (DEISMultistepScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "lms_karras": (LMSDiscreteScheduler, KARRAS),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

# (id, height, width, negative prompt, guidance, num_images)
CASES = [
    ("square-negative-cfg-n2", 64, 64, "blurry, low quality", 7.5, 2),
    ("nonsquare-cfg", 56, 88, None, 5.0, 1),  # latent 7x11: odd sides
    ("no-cfg-n2", 64, 48, None, 1.0, 2),
]
PROMPT = "a watercolor painting of a lighthouse at dawn"
STEPS = 12
_figures: dict[str, float] = {}


@pytest.fixture(scope="module", params=["inline", "bls"])
def client(
    request: pytest.FixtureRequest, exported: dict, triton, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[grpcclient.InferenceServerClient]:
    """A client of txt2img on each UNet path: the session's Triton (inline), then a Triton of its own on a
    repository exported with unet_path=bls."""
    if request.param == "inline":
        assert exported["manifest"]["settings"]["unet_path"] == "auto"  # continuous: inline
        with grpcclient.InferenceServerClient(triton.grpc_url) as inline:
            yield inline
        return
    work = tmp_path_factory.mktemp("parity-bls")
    repo = work / "model_repository"
    run_export(ExportOptions("tiny", repo, settings=RepositorySettings(unet_path="bls"), work_dir=WORK_DIR))
    with (
        triton_server(repo, work / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as bls,
    ):
        yield bls


HOPS = ("unet", "text_encoder", "vae_decoder", "postprocess")


def requests_to(client: grpcclient.InferenceServerClient) -> dict[str, int]:
    """Requests each of HOPS has answered."""
    counts = {}
    for model in HOPS:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
        counts[model] = int(stats["success"].get("count", 0))
    return counts


def test_the_loop_reaches_the_engines_on_its_path(client) -> None:
    """inline: Triton's unet, text_encoder, vae_decoder and postprocess models are never called (the
    loop runs the engines itself, the ensemble is tokenizer -> denoise); bls: the UNet once per step, the
    others once per request."""
    path = client.get_model_config("denoise", as_json=True)["config"]["parameters"]["unet_path"][
        "string_value"
    ]
    before = requests_to(client)
    result = txt2img(
        client, PROMPT, height=64, width=64, steps=5, guidance_scale=7.5, seed=3, scheduler="ddim"
    )
    after = requests_to(client)
    calls = {model: after[model] - before[model] for model in HOPS}
    expected = dict.fromkeys(HOPS, 0) if path == "inline" else {"unet": 5, **dict.fromkeys(HOPS[1:], 1)}
    assert calls == expected, path
    assert [(e["component"], e["version"]) for e in result.engines] == [("unet", 1)]  # provenance either way


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.checkpoint_scheduler = pipe.scheduler
    pipe.checkpoint_scheduler_config = dict(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def report() -> object:
    yield
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(_figures, indent=2, sort_keys=True) + "\n")
    log.info("parity figures written to %s", REPORT)


def reference_scheduler(
    scheduler: str, checkpoint_class: type, checkpoint_config: dict[str, Any], seed: int, n: int
) -> Any:
    """diffusers' scheduler behind a scheduler name (REFERENCE; "default": the checkpoint's class), built
    from the checkpoint's config every time: a previous test's scheduler config would leak its options
    (use_karras_sigmas, ...) into the next. DPM++ SDE's noise comes from Brownian trees it seeds itself:
    one per image (seed + i), diffusers' list form, as the loop seeds them."""
    cls, overrides = REFERENCE[scheduler]
    if cls is DPMSolverSDEScheduler:
        overrides = {**overrides, "noise_sampler_seed": seed if n == 1 else [seed + i for i in range(n)]}
    return (cls or checkpoint_class).from_config(checkpoint_config, **overrides)


def diffusers_images(pipe: StableDiffusionPipeline, scheduler: str, prompt: str, **kw: object) -> np.ndarray:
    n = int(kw.pop("num_images"))  # type: ignore[call-overload]
    seed = int(kw.pop("seed"))  # type: ignore[call-overload]
    pipe.scheduler = reference_scheduler(
        scheduler, type(pipe.checkpoint_scheduler), pipe.checkpoint_scheduler_config, seed, n
    )
    # with an init image: the img2img pipeline on the same modules and this scheduler
    run = pipe
    if "image" in kw:
        kind = StableDiffusionInpaintPipeline if "mask_image" in kw else StableDiffusionImg2ImgPipeline
        run = kind(**pipe.components)
    out = run(
        prompt,
        num_images_per_prompt=n,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        output_type="np",
        **kw,
    ).images
    return (out * 255).round().astype(np.uint8)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_reference_table_covers_every_scheduler() -> None:
    assert tuple(REFERENCE) == SCHEDULERS


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(
    ("case", "height", "width", "negative", "guidance", "n"), CASES, ids=[c[0] for c in CASES]
)
def test_triton_matches_diffusers(
    client, pipe, scheduler, case, height, width, negative, guidance, n
) -> None:
    common = dict(negative_prompt=negative, height=height, width=width, guidance_scale=guidance, seed=1234)
    # "default" is also what a request without a SCHEDULER input runs: it goes without one
    named = None if scheduler == "default" else scheduler
    ours = txt2img(client, PROMPT, steps=STEPS, scheduler=named, num_images=n, **common).images
    theirs = diffusers_images(pipe, scheduler, PROMPT, num_inference_steps=STEPS, num_images=n, **common)
    assert ours.shape == (n, height, width, 3)
    assert ours.std() > 5, "a flat image would make the comparison meaningless"
    diff = max_abs_diff(ours, theirs)
    _figures[f"{scheduler}/{case}"] = diff
    assert diff <= MAX_ABS_DIFF


# image-to-image: (id, height, width, negative prompt, guidance, num_images, strength)
IMG2IMG_CASES = [
    ("img2img-negative-cfg-n2", 64, 64, "blurry, low quality", 7.5, 2, 0.6),
    ("img2img-nonsquare-strength-1", 56, 88, None, 5.0, 1, 1.0),
    ("img2img-no-cfg-n2-one-step", 64, 48, None, 1.0, 2, 0.1),  # int(12 x 0.1) = 1 step
]


def init_image(height: int, width: int) -> np.ndarray:
    """A picture with structure: a gradient and a bright disc."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((y - height / 2) ** 2 + (x - width / 3) ** 2) < (min(height, width) / 4) ** 2
    image = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 90.0)], axis=-1)
    image[disc] = (250, 240, 40)
    return image.astype(np.uint8)


def in_turn(cases: list[tuple[Any, ...]]) -> list[Any]:
    """Every scheduler once, the cases taken in turn (each case meets several schedulers): the
    text-to-image table above crosses them all; here that would double the suite's parity time."""
    return [
        pytest.param(scheduler, *cases[i % len(cases)], id=f"{scheduler}-{cases[i % len(cases)][0]}")
        for i, scheduler in enumerate(SCHEDULERS)
    ]


@pytest.mark.parametrize(
    ("scheduler", "case", "height", "width", "negative", "guidance", "n", "strength"), in_turn(IMG2IMG_CASES)
)
def test_img2img_matches_diffusers(
    client, pipe, scheduler, case, height, width, negative, guidance, n, strength
) -> None:
    """An init image and a strength through Triton against StableDiffusionImg2ImgPipeline."""
    from PIL import Image

    common = dict(negative_prompt=negative, guidance_scale=guidance, seed=4321, strength=strength)
    image = init_image(height, width)
    named = None if scheduler == "default" else scheduler
    ours = txt2img(
        client, PROMPT, image=image, height=height, width=width, steps=STEPS, scheduler=named, num_images=n,
        **common,
    ).images  # fmt: skip
    theirs = diffusers_images(
        pipe,
        scheduler,
        PROMPT,
        image=Image.fromarray(image),
        num_inference_steps=STEPS,
        num_images=n,
        **common,
    )
    assert ours.shape == (n, height, width, 3)
    diff = max_abs_diff(ours, theirs)
    _figures[f"{scheduler}/{case}"] = diff
    assert diff <= MAX_ABS_DIFF
    if strength < 1.0:  # the image is used: another one gives other images
        other = txt2img(
            client, PROMPT, image=255 - image, height=height, width=width, steps=STEPS, scheduler=named,
            num_images=n, **common,
        ).images  # fmt: skip
        assert max_abs_diff(ours, other) > 2 * MAX_ABS_DIFF, scheduler  # tiny: faint, still clear


# inpainting with the regular tiny UNet (the unmasked area put back every step): (id, height, width,
# negative prompt, guidance, num_images, strength)
INPAINT_CASES = [
    ("inpaint-negative-cfg-n2", 64, 48, "blurry", 7.5, 2, 1.0),
    ("inpaint-nonsquare-no-cfg", 56, 88, None, 1.0, 1, 0.7),
]


def inpainting_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 :] = 255
    mask[:4, :4] = 100  # grey below 128: kept, as diffusers binarizes at 0.5
    return mask


@pytest.mark.parametrize(
    ("scheduler", "case", "height", "width", "negative", "guidance", "n", "strength"), in_turn(INPAINT_CASES)
)
def test_inpainting_matches_diffusers(
    client, pipe, scheduler, case, height, width, negative, guidance, n, strength
) -> None:
    """An image, a mask and a strength through Triton against StableDiffusionInpaintPipeline."""
    from PIL import Image

    common = dict(negative_prompt=negative, guidance_scale=guidance, seed=99, strength=strength)
    image, mask = init_image(height, width), inpainting_mask(height, width)
    named = None if scheduler == "default" else scheduler
    ours = txt2img(
        client, PROMPT, image=image, mask=mask, height=height, width=width, steps=STEPS, scheduler=named,
        num_images=n, **common,
    ).images  # fmt: skip
    theirs = diffusers_images(
        pipe, scheduler, PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
        height=height, width=width, num_inference_steps=STEPS, num_images=n, **common,
    )  # fmt: skip
    assert ours.shape == (n, height, width, 3)
    diff = max_abs_diff(ours, theirs)
    _figures[f"{scheduler}/{case}"] = diff
    assert diff <= MAX_ABS_DIFF


def test_each_image_reproducible_alone(client) -> None:
    """Image i of a request is seeded with seed + i: asking for it alone gives the same image."""
    params = dict(height=64, width=64, steps=8, guidance_scale=7.5, scheduler="euler_a")
    pair = txt2img(client, PROMPT, seed=77, num_images=2, **params).images
    second = txt2img(client, PROMPT, seed=78, num_images=1, **params).images
    assert max_abs_diff(pair[1:], second) <= 1
    assert max_abs_diff(pair[:1], second) > 10, "different seeds must give different images"


def test_latents_on_request_are_the_images_latents(client, pipe) -> None:
    """txt2img answers LATENTS when asked (a hand-off's base needs them), on both UNet paths: the VAE
    decodes them to the images it answers; a request that does not ask gets none."""
    params = dict(height=64, width=64, steps=4, guidance_scale=7.5, scheduler="ddim", seed=3, num_images=2)
    result = txt2img(client, PROMPT, latents=True, **params)
    assert result.latents is not None and result.latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.from_numpy(result.latents)).sample
    images = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert max_abs_diff(result.images, images) <= MAX_ABS_DIFF
    assert txt2img(client, PROMPT, **params).latents is None


def test_long_prompt_truncated_like_diffusers(client, pipe, request: pytest.FixtureRequest) -> None:
    """The bls path keeps one 77-token chunk: diffusers' truncation and images. The inline path reads the
    export's 4 chunks (300 tokens of text) and cuts and counts the rest (its images: test_prompts.py)."""
    prompt = " ".join(f"word{i}" for i in range(120))
    result = txt2img(
        client, prompt, height=64, width=64, steps=6, guidance_scale=7.5, seed=5, scheduler="ddim"
    )
    full = len(pipe.tokenizer(prompt).input_ids)
    if request.node.callspec.params["client"] == "inline":
        assert result.prompt_truncated_tokens == (full - 2) - 4 * 75 > 0
        return
    assert result.prompt_truncated_tokens == full - 77 > 0
    assert result.negative_prompt_truncated_tokens == 0
    theirs = diffusers_images(
        pipe,
        "ddim",
        prompt,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=7.5,
        seed=5,
        num_images=1,
    )
    assert max_abs_diff(result.images, theirs) <= MAX_ABS_DIFF
