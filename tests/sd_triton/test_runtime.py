"""The pieces the Triton python models run, outside Triton."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from sd_triton.pipeline_config import PipelineConfig
from sd_triton.runtime.ort_runner import OrtRunner, choose_providers
from sd_triton.runtime.postprocess import to_uint8_images
from sd_triton.runtime.schedulers import make_scheduler
from sd_triton.runtime.tokenize import PromptTokenizer


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None)


def test_tokenizer_matches_diffusers_encoding(tiny_checkpoint: Path, pipe) -> None:
    ours = PromptTokenizer(tiny_checkpoint / "tokenizer")
    assert len(ours.tokenizer) == 49408
    for text in ["a photo of an astronaut riding a horse", "", "naïve café 🚀 " * 30, "a, b, c, " * 40]:
        one = ours.tokenize(
            text, "", guidance=False
        )  # one chunk: diffusers' ids, truncated as diffusers does
        theirs = pipe.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="np"
        ).input_ids[0]
        np.testing.assert_array_equal(one.input_ids[0], theirs)
        assert one.prompt_truncated_tokens == max(0, len(pipe.tokenizer(text).input_ids) - 77)
        assert one.weights is None
    out = ours.tokenize("a cat", "", guidance=True)
    assert out.input_ids.shape == (2, 77) and out.input_ids.dtype == np.int32
    assert ours.tokenize("a cat", "x", guidance=False).input_ids.shape == (1, 77)


def test_real_clip_token_ids(tiny_checkpoint: Path) -> None:
    """Known ids of the SD 1.x tokenizer: start, 'a', 'photo', 'of', end."""
    ids = PromptTokenizer(tiny_checkpoint / "tokenizer").tokenize("a photo of", "", guidance=False).input_ids
    assert list(ids[0, :5]) == [49406, 320, 1125, 539, 49407]


def test_scheduler_keeps_checkpoint_config() -> None:
    config = {
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    }
    scheduler = make_scheduler("dpmpp_2m_karras", config)
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.use_karras_sigmas
    assert not make_scheduler("dpmpp_2m", {**config, "use_karras_sigmas": True}).config.use_karras_sigmas


def test_each_request_gets_its_own_fresh_scheduler() -> None:
    """Schedulers are copies of one built per config: never the same object, no state shared, the
    same timesteps and sigmas as one built from the config."""
    config = {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1}
    first, second = make_scheduler("euler", config), make_scheduler("euler", config)
    assert first is not second and first.sigmas is not second.sigmas
    first.set_timesteps(5)
    second.set_timesteps(12)
    assert len(first.timesteps) == 5 and len(second.timesteps) == 12
    fresh = EulerDiscreteScheduler.from_config(config)
    fresh.set_timesteps(12)
    assert torch.equal(second.timesteps, fresh.timesteps) and torch.equal(second.sigmas, fresh.sigmas)
    third = make_scheduler("euler", config)  # the template was not touched by the requests before
    assert third.num_inference_steps is None and third.step_index is None
    other = make_scheduler("euler", {**config, "prediction_type": "v_prediction"})  # another config
    assert other.config.prediction_type == "v_prediction"


def test_postprocess_matches_diffusers_image_processor(pipe) -> None:
    decoded = torch.randn(2, 3, 8, 12) * 1.5
    theirs = pipe.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_array_equal(to_uint8_images(decoded.numpy()), (theirs * 255).round().astype(np.uint8))


def test_ort_runner_batches_equal_shapes(exported: dict) -> None:
    runner = OrtRunner(exported["repo"] / "vae_decoder" / "1" / "model.onnx", device="cpu")
    rng = np.random.default_rng(0)
    requests = [
        {"latent_sample": rng.standard_normal((n, 4, h, w), dtype=np.float32)}
        for n, h, w in [(1, 4, 4), (2, 4, 6), (2, 4, 4)]
    ]
    bad = {"latent_sample": rng.standard_normal((1, 3, 4, 4), dtype=np.float32)}  # 3 channels
    batched = runner.run_batch([*requests, bad])
    assert isinstance(batched[-1], Exception)
    for request, out in zip(requests, batched[:-1], strict=True):
        assert isinstance(out, dict)
        alone = runner.run(request)["sample"]
        assert out["sample"].shape == alone.shape
        np.testing.assert_allclose(out["sample"], alone, atol=1e-5)


def test_run_each_keeps_order_and_splits_calls_at_the_max_batch(exported: dict) -> None:
    """The decode thread's shared VAE calls: requests of one shape merged in calls of at most max_batch
    rows (a larger one alone), each answered with its own output, in order."""
    runner = OrtRunner(exported["repo"] / "vae_decoder" / "1" / "model.onnx", device="cpu")
    rng = np.random.default_rng(1)
    requests = [
        {"latent_sample": rng.standard_normal((n, 4, h, w), dtype=np.float32)}
        for n, h, w in [(1, 4, 4), (2, 4, 4), (1, 4, 6), (1, 4, 4), (4, 4, 4), (1, 4, 4)]
    ]
    calls: list[int] = []
    run = runner.run
    runner.run = lambda feeds: calls.append(len(feeds["latent_sample"])) or run(feeds)  # type: ignore[method-assign]
    outputs = runner.run_each(requests, max_batch=3)
    # chunks of <= 3 rows in order: [1, 2] | [1 (4x6)] + [1 (4x4)] | [4] | [1]; shapes split a chunk's call
    assert calls == [3, 1, 1, 4, 1]
    for request, out in zip(requests, outputs, strict=True):
        assert isinstance(out, dict)
        np.testing.assert_allclose(out["sample"], run(request)["sample"], atol=1e-5)
    assert runner.run_each(requests, max_batch=0) and calls[5:] == [9, 1]  # no limit: one call per shape


def test_ort_runner_devices() -> None:
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="device must be auto, cuda or cpu"):
        choose_providers("gpu")


def test_pipeline_config_round_trip(tmp_path: Path) -> None:
    config = PipelineConfig(4, 8, 0.18215, {"prediction_type": "epsilon"})
    config.save(tmp_path / "p.json")
    assert PipelineConfig.load(tmp_path / "p.json") == config
    with pytest.raises(ValueError, match="vae_scale_factor"):
        PipelineConfig(4, 0, 0.18215, {})


# SD 2.x-style configs: v-prediction, trailing timestep spacing
V_PRED = {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}


def torch_unet(unet: torch.nn.Module):  # noqa: ANN201 - sd_triton.runtime.denoise.UNetFn
    """A diffusers UNet as the loop calls an engine: numpy in, numpy out, timesteps [B, 1]; an SDXL
    UNet's text_embeds and time_ids after the hidden states."""

    def call(sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray, *added: np.ndarray) -> np.ndarray:
        kwargs = {}
        if added:
            text_embeds, time_ids = (torch.from_numpy(a) for a in added)
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        with torch.no_grad():
            args = (
                torch.from_numpy(sample),
                torch.from_numpy(timestep).reshape(-1),
                torch.from_numpy(hidden),
            )
            return unet(*args, **kwargs).sample.numpy()

    return call


def prompt_embeds(pipe, prompt: str, guidance: float, negative: str | None) -> torch.Tensor:
    """diffusers' embeddings of a prompt, [uncond, cond] with guidance, as the loop takes them."""
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, guidance > 1, negative)
    return torch.cat([uncond, cond]) if guidance > 1 else cond


@pytest.mark.parametrize(
    ("scheduler", "guidance", "negative", "config_changes"),
    [
        ("euler_a", 7.5, "dark", {}),
        ("unipc", 1.0, None, {}),
        ("dpmpp_2m", 6.0, None, V_PRED),
        ("ddim", 4.0, "fog", V_PRED),
        ("ddim", 7.5, None, {}),  # the closed forms (linear_step) with guidance
        ("euler", 1.0, None, {}),
        ("euler_karras", 5.0, "rain", V_PRED),
    ],
)
def test_denoise_loop_is_diffusers_loop(
    pipe, scheduler: str, guidance: float, negative: str | None, config_changes: dict
) -> None:
    """Our loop with diffusers' own UNet gives diffusers' latents: the loop, not the engine, is
    tested, including the checkpoint's prediction type and timestep spacing."""
    from sd_triton.requests import GenerationParams
    from sd_triton.runtime.denoise import denoise
    from tests.integration.test_parity import REFERENCE

    original = pipe.scheduler
    base = {**original.config, **config_changes}
    cls, overrides = REFERENCE[scheduler]
    pipe.scheduler = cls.from_config(base, **overrides)
    n, seed, prompt = 2, 99, "a quiet harbour"
    expected = pipe(
        prompt,
        negative_prompt=negative,
        height=48,
        width=64,
        num_inference_steps=7,
        guidance_scale=guidance,
        num_images_per_prompt=n,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        output_type="latent",
    ).images
    embeds = prompt_embeds(pipe, prompt, guidance, negative)

    unet = torch_unet(pipe.unet)

    steps: list[int] = []
    config = PipelineConfig(4, 8, pipe.vae.config.scaling_factor, base)
    params = GenerationParams(48, 64, 7, guidance, seed, scheduler, n)
    ours = denoise(embeds.detach().numpy(), params, config, unet, on_step=lambda i, total: steps.append(i))
    pipe.scheduler = original
    theirs = expected.numpy() / pipe.vae.config.scaling_factor
    # float32 rounding: the closed-form steps (linear_step) order the same arithmetic differently
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))
    assert steps == list(range(7))


# scheduler name, config changes, whether the closed form applies
LINEAR_CASES = [
    ("ddim", {}, True),
    ("ddim", V_PRED, True),
    ("ddim", {"prediction_type": "sample", "set_alpha_to_one": True}, True),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", **V_PRED}, True),
    ("ddim", {"clip_sample": True}, False),  # clamps x0: not linear
    ("euler", {}, True),
    ("euler", {"timestep_spacing": "linspace"}, True),
    ("euler_karras", V_PRED, True),
    ("euler", {"prediction_type": "sample"}, True),
    ("dpmpp_2m", {}, True),  # 9 steps: the last one first order (lower_order_final)
    ("dpmpp_2m", {"lower_order_final": False, "solver_type": "heun"}, True),
    ("dpmpp_2m_karras", {"final_sigmas_type": "zero", **V_PRED}, True),
    ("dpmpp_2m", {"euler_at_final": True, "prediction_type": "sample"}, True),
    ("dpmpp_2m", {"use_lu_lambdas": True}, True),
    ("dpmpp_2m_sde", {}, False),  # draws noise
    ("dpmpp_2m", {"thresholding": True}, False),
    ("euler_a", {}, True),  # + noise from each request's generators
    ("euler_a", V_PRED, True),
    ("lms", {}, False),
    ("pndm", {}, False),
]
SD_SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@pytest.mark.parametrize(("scheduler", "changes", "linear"), LINEAR_CASES)
def test_closed_form_steps_equal_diffusers_steps(scheduler: str, changes: dict, linear: bool) -> None:
    """Requests stepped together in closed form (advance_jobs) get diffusers' own step's latents, each
    step, with guidance, without it, and two images, up to float32 rounding (the same arithmetic in
    another order); a scheduler without a closed form has none."""
    from sd_triton.requests import GenerationParams
    from sd_triton.runtime.denoise import DenoiseJob, advance_jobs

    config = PipelineConfig(4, 8, 0.18215, {**SD_SCHEDULER, **changes})
    rng = np.random.default_rng(3)
    params = [
        GenerationParams(32, 48, 9, 6.0, 5, scheduler, 2),
        GenerationParams(32, 48, 9, 1.0, 6, scheduler, 1),
    ]
    embeds = [rng.standard_normal((r, 77, 8)).astype(np.float32) for r in (2, 1)]
    together = [DenoiseJob(e, p, config) for e, p in zip(embeds, params, strict=True)]
    alone = [DenoiseJob(e, p, config) for e, p in zip(embeds, params, strict=True)]
    assert all((job.linear is not None) == linear for job in together)
    for job in alone:  # diffusers' scale_model_input and step, on a scheduler of its own
        job.linear, job.scheduler = None, copy.deepcopy(job.scheduler)
    while not together[0].done:
        inputs = [job.unet_inputs() for job in together]
        for job, (sample, _, _) in zip(alone, inputs, strict=True):
            theirs = job.unet_inputs()[0]
            np.testing.assert_allclose(sample, theirs, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))
        noise = rng.standard_normal((sum(job.rows for job in together), 4, 4, 6)).astype(np.float32)
        assert advance_jobs(together, noise) == [None, None]
        alone[0].advance(noise[:4])
        alone[1].advance(noise[4:])
        for ours, theirs in zip(together, alone, strict=True):
            scale = float(theirs.latents.abs().max())
            np.testing.assert_allclose(
                ours.latents.numpy(), theirs.latents.numpy(), atol=1e-5 * max(scale, 1)
            )


def test_closed_form_requests_share_a_prepared_scheduler_and_never_step_it() -> None:
    """Requests with a closed form read one scheduler prepared per (name, config, steps) and never
    change it; a request stepped through diffusers gets a fresh copy of its own."""
    from sd_triton.requests import GenerationParams
    from sd_triton.runtime.denoise import DenoiseJob, advance_jobs

    config = PipelineConfig(4, 8, 0.18215, SD_SCHEDULER)
    embeds = np.zeros((2, 77, 8), np.float32)
    first, second = (
        DenoiseJob(embeds, GenerationParams(32, 32, 6, 5.0, s, "euler", 1), config) for s in (1, 2)
    )
    assert first.scheduler is second.scheduler and first.linear is second.linear
    timesteps = first.scheduler.timesteps.clone()
    while not first.done:
        first.unet_inputs(), second.unet_inputs()
        assert advance_jobs([first, second], np.ones((4, 4, 4, 4), np.float32)) == [None, None]
    assert first.scheduler.step_index is None and torch.equal(first.scheduler.timesteps, timesteps)
    other = DenoiseJob(embeds, GenerationParams(32, 32, 7, 5.0, 1, "euler", 1), config)
    assert other.scheduler is not first.scheduler and len(other.timesteps) == 7  # another step count
    stepped = [DenoiseJob(embeds, GenerationParams(32, 32, 6, 5.0, 1, "lms", 1), config) for _ in (0, 1)]
    assert stepped[0].linear is None and stepped[0].scheduler is not stepped[1].scheduler


# (scheduler, strength, guidance, negative prompt, num_images, config changes): the closed forms (ddim,
# euler, euler_a), a multistep one that gives way to diffusers' step past the first step (dpmpp_2m), a
# second-order one (heun), PNDM's counter, strength 1 and a strength that leaves one step
IMG2IMG_CASES = [
    ("ddim", 0.6, 7.5, "fog", 2, {}),
    ("euler", 0.5, 1.0, None, 1, {}),
    ("euler_a", 0.75, 5.0, None, 2, {}),
    ("dpmpp_2m", 0.6, 6.0, None, 1, V_PRED),
    ("dpmpp_2m", 1.0, 6.0, None, 1, {}),
    ("heun", 0.5, 4.0, "rain", 1, {}),
    ("pndm", 0.8, 7.5, None, 1, {}),
    ("unipc", 0.15, 7.5, None, 2, {}),  # int(7 x 0.15) = 1: one step
]


@pytest.mark.parametrize(("scheduler", "strength", "guidance", "negative", "n", "changes"), IMG2IMG_CASES)
def test_img2img_loop_is_diffusers_img2img(
    pipe, scheduler: str, strength: float, guidance: float, negative: str | None, n: int, changes: dict
) -> None:
    """From an init image (its VAE encoder output, sampled with each image's generator, noised to the
    start step), our loop gives StableDiffusionImg2ImgPipeline's latents on the same weights, and
    reports the steps it actually ran."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from sd_triton.requests import GenerationParams, start_step
    from sd_triton.runtime.denoise import InitImage, denoise
    from sd_triton.runtime.postprocess import from_uint8_images
    from tests.integration.test_parity import REFERENCE

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    base = {**pipe.scheduler.config, **changes}
    cls, overrides = REFERENCE[scheduler]
    img2img.scheduler = cls.from_config(base, **overrides)
    pixels = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    seed, prompt, steps = 31, "a red barn in snow", 7
    theirs_steps: list[int] = []

    def count(pipeline: object, i: int, t: object, kwargs: dict) -> dict:
        theirs_steps.append(i)
        return kwargs

    expected = img2img(
        prompt,
        image=Image.fromarray(pixels),
        strength=strength,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=n,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        output_type="latent",
        callback_on_step_end=count,
    ).images
    embeds = prompt_embeds(pipe, prompt, guidance, negative)
    with torch.no_grad():
        moments = pipe.vae.encode(torch.from_numpy(from_uint8_images(pixels[None]))).latent_dist.parameters

    unet = torch_unet(pipe.unet)

    reported: list[tuple[int, int]] = []
    config = PipelineConfig(4, 8, pipe.vae.config.scaling_factor, base)
    params = GenerationParams(48, 64, steps, guidance, seed, scheduler, n)
    ours = denoise(
        embeds.detach().numpy(),
        params,
        config,
        unet,
        on_step=lambda i, total: reported.append((i, total)),
        init=InitImage(moments.numpy(), strength),
    )
    theirs = expected.numpy() / pipe.vae.config.scaling_factor
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))
    # the steps diffusers ran, fewer than txt2img's unless strength is 1
    ran = len(theirs_steps)
    assert reported == [(i, ran) for i in range(ran)]
    assert (start_step(steps, strength) == 0) == (strength == 1.0)


def test_img2img_strength_and_image_errors_name_the_field(pipe) -> None:
    from sd_triton.requests import GenerationParams, InvalidRequest
    from sd_triton.runtime.denoise import DenoiseJob, InitImage

    config = PipelineConfig(4, 8, 0.18215, dict(pipe.scheduler.config))
    params = GenerationParams(32, 32, 4, 7.5, 1, "ddim", 1)
    embeds = np.zeros((2, 77, 32), dtype=np.float32)
    moments = np.zeros((1, 8, 4, 4), dtype=np.float32)
    for strength, words in (
        (0.0, "> 0 and <= 1"),
        (1.5, "> 0 and <= 1"),
        ("x", "got 'x'"),
        (0.2, "runs no step"),
    ):
        with pytest.raises(InvalidRequest, match=words) as caught:
            DenoiseJob(embeds, params, config, InitImage(moments, strength))  # type: ignore[arg-type]
        assert caught.value.field == "STRENGTH"
    for wrong in (np.zeros((1, 4, 4, 4)), np.zeros((3, 8, 4, 4)), np.zeros((1, 8, 5, 4))):
        with pytest.raises(InvalidRequest, match="IMAGE: encoded to"):
            DenoiseJob(embeds, params, config, InitImage(wrong.astype(np.float32), 0.5))


@pytest.fixture(scope="module")
def inpaint_unet(pipe):
    """A 9-channel inpainting UNet shaped like the tiny one (latents, mask, masked image latents)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    return UNet2DConditionModel(**{**pipe.unet.config, "in_channels": 9}).eval()


# (UNet channels, scheduler, strength, guidance, num_images): regular UNets blend (diffusers' step
# always), inpainting UNets take the mask as channels (closed forms where they apply)
INPAINT_CASES = [
    (4, "ddim", 1.0, 7.5, 2),
    (4, "euler_a", 0.75, 5.0, 2),
    (4, "dpmpp_2m", 0.6, 1.0, 1),
    (9, "ddim", 1.0, 7.5, 2),
    (9, "euler_a", 1.0, 5.0, 2),
    (9, "dpmpp_2m", 0.6, 6.0, 1),
    (9, "heun", 0.8, 4.0, 1),
]


@pytest.mark.parametrize(("channels", "scheduler", "strength", "guidance", "n"), INPAINT_CASES)
def test_inpainting_loop_is_diffusers_inpainting(
    pipe, inpaint_unet, channels: int, scheduler: str, strength: float, guidance: float, n: int
) -> None:
    """Our loop with the mask (and, for a 9-channel UNet, the masked image's latents) gives
    StableDiffusionInpaintPipeline's latents on the same weights."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from sd_triton.requests import GenerationParams
    from sd_triton.runtime.denoise import InitImage, denoise, inpaint_mask
    from sd_triton.runtime.postprocess import from_uint8_images
    from tests.integration.test_parity import REFERENCE

    unet = inpaint_unet if channels == 9 else pipe.unet
    inpaint = StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet})
    cls, overrides = REFERENCE[scheduler]
    inpaint.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    pixels = np.random.default_rng(9).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[8:40, 16:56] = 255
    seed, prompt, steps = 17, "a green door", 6
    expected = inpaint(
        prompt,
        image=Image.fromarray(pixels),
        mask_image=Image.fromarray(mask),
        strength=strength,
        height=48,
        width=64,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=n,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        output_type="latent",
    ).images
    embeds = prompt_embeds(pipe, prompt, guidance, None)
    image = from_uint8_images(pixels[None])
    masked, small = inpaint_mask(mask, image, 8)
    with torch.no_grad():
        moments = pipe.vae.encode(torch.from_numpy(image)).latent_dist.parameters.numpy()
        masked_moments = pipe.vae.encode(torch.from_numpy(masked)).latent_dist.parameters.numpy()

    run_unet = torch_unet(unet)
    init = InitImage(moments, strength, small, masked_moments if channels == 9 else None)
    config = PipelineConfig(4, 8, pipe.vae.config.scaling_factor, dict(pipe.scheduler.config))
    params = GenerationParams(48, 64, steps, guidance, seed, scheduler, n)
    ours = denoise(embeds.detach().numpy(), params, config, run_unet, init=init)
    theirs = expected.numpy() / pipe.vae.config.scaling_factor
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))
    if channels == 4:  # outside the mask the image's own latents come back (its draw with the first
        kept = small[0, 0] == 0  # generator), inside they are new
        with torch.no_grad():
            dist = pipe.vae.encode(torch.from_numpy(image)).latent_dist
            own = dist.sample(torch.Generator().manual_seed(seed))[0].numpy()
        for latents in ours:
            np.testing.assert_allclose(latents[:, kept], own[:, kept], atol=1e-4)
            assert np.abs(latents[:, ~kept] - own[:, ~kept]).max() > 0.1


def test_resizing_and_mask_binarizing_are_diffusers_image_processors() -> None:
    """The gateway's resize of an init image and a mask (sd_triton.gateway.images) and the loop's
    conversion give what diffusers' image processors give for a differently sized upload."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from sd_triton.gateway.images import init_pixels, mask_pixels
    from sd_triton.runtime.denoise import inpaint_mask
    from sd_triton.runtime.postprocess import from_uint8_images

    rng = np.random.default_rng(4)
    upload = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8))
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(upload, height=32, width=48)
    ours = from_uint8_images(init_pixels(upload, 48, 32)[None])
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6)
    masks = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    their_mask = masks.preprocess(grey, height=32, width=48).numpy()
    masked, _ = inpaint_mask(mask_pixels(grey, 48, 32), ours, 8)
    np.testing.assert_array_equal(masked, ours * (their_mask < 0.5))
    assert 0.2 < their_mask.mean() < 0.8


# (scheduler, guidance, negative prompt, num_images, size conditioning: original, crop, target or None)
SDXL_CASES = [
    ("default", 5.0, None, 1, None),  # the checkpoint's Euler; no negative prompt: zeros, as diffusers
    ("ddim", 7.5, "blurry", 2, None),
    ("euler_a", 1.0, None, 2, ((128, 96), (8, 4), (64, 48))),
    ("dpmpp_2m", 6.0, "fog", 1, ((256, 256), (0, 0), (64, 48))),
]


@pytest.mark.parametrize(("scheduler", "guidance", "negative", "n", "sizes"), SDXL_CASES)
def test_sdxl_conditioning_is_diffusers_sdxl(
    scheduler: str, guidance: float, negative: str | None, n: int, sizes: tuple | None
) -> None:
    """Our loop with SDXL's added conditioning (pooled text embeddings, size time ids) and diffusers' own
    tiny-xl UNet gives StableDiffusionXLPipeline's latents."""
    from sd_triton.export.tiny import build_tiny_xl_pipeline
    from sd_triton.requests import GenerationParams
    from sd_triton.runtime.denoise import AddedConditioning, denoise, time_ids
    from tests.integration.test_parity import REFERENCE

    xl = build_tiny_xl_pipeline()
    xl.set_progress_bar_config(disable=True)
    base = {**xl.scheduler.config, "_class_name": type(xl.scheduler).__name__}  # as the export reads it
    cls, overrides = REFERENCE[scheduler]
    xl.scheduler = (cls or type(xl.scheduler)).from_config(base, **overrides)
    height, width, seed, prompt = 48, 64, 23, "a lighthouse"
    original, crop, target = sizes or ((height, width), (0, 0), (height, width))
    conditioning = (
        {}
        if sizes is None
        else {"original_size": original, "crops_coords_top_left": crop, "target_size": target}
    )
    expected = xl(
        prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=6,
        guidance_scale=guidance, num_images_per_prompt=n, output_type="latent",
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], **conditioning,
    ).images  # fmt: skip
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = xl.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=guidance > 1,
            negative_prompt=negative,
        )  # fmt: skip
    cfg = guidance > 1
    embeds = torch.cat([uncond, cond]) if cfg else cond
    text_embeds = torch.cat([uncond_pooled, pooled]) if cfg else pooled
    ids = np.array([time_ids(original, crop, target)] * (2 if cfg else 1), dtype=np.float32)

    unet = torch_unet(xl.unet)

    config = PipelineConfig(4, 8, xl.vae.config.scaling_factor, base)
    params = GenerationParams(height, width, 6, guidance, seed, scheduler, n)
    added = AddedConditioning(text_embeds.numpy(), ids)
    ours = denoise(embeds.numpy(), params, config, unet, added=added)
    theirs = expected.numpy() / xl.vae.config.scaling_factor
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))
    if sizes is not None:  # the size conditioning reaches the UNet: other sizes, other latents
        other = AddedConditioning(text_embeds.numpy(), ids + 64)
        assert np.abs(denoise(embeds.numpy(), params, config, unet, added=other) - ours).max() > 1e-3


# (scheduler, hand-off fraction, guidance, num_images): Euler (the checkpoint's), a multistep closed
# form, an ancestral one (its steps draw noise), second-order ones (a cut inside a pair of calls)
HANDOFF_CASES = [
    ("default", 0.8, 7.5, 1),
    ("dpmpp_2m", 0.7, 5.0, 2),
    ("euler_a", 0.6, 6.0, 1),
    ("heun", 0.75, 7.5, 1),
    ("dpmpp_sde", 0.5, 4.0, 2),
    ("ddim", 0.9, 1.0, 1),
]


@pytest.mark.parametrize(("scheduler", "fraction", "guidance", "n"), HANDOFF_CASES)
def test_base_and_refiner_hand_off_as_diffusers(
    scheduler: str, fraction: float, guidance: float, n: int
) -> None:
    """Our loop split with Handoff (the base to `end`, the refiner from `start` on the base's latents)
    gives diffusers' StableDiffusionXLPipeline(denoising_end) -> StableDiffusionXLImg2ImgPipeline
    (denoising_start) on tiny-xl and its refiner; each side's generators seeded alike."""
    from sd_triton.export.tiny import build_tiny_xl_pipeline, build_tiny_xl_refiner_pipeline
    from sd_triton.requests import GenerationParams
    from sd_triton.runtime.denoise import AddedConditioning, Handoff, denoise, size_conditioning
    from tests.integration.test_parity import reference_scheduler

    base, refiner = build_tiny_xl_pipeline(), build_tiny_xl_refiner_pipeline()
    height, width, steps, seed, prompt = 48, 64, 10, 31, "a lighthouse"
    configs = {}
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
        own = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
        pipe.scheduler = reference_scheduler(scheduler, type(pipe.scheduler), own, seed, n)
        configs[id(pipe)] = own

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + i) for i in range(n)]

    common = dict(num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n)
    handed = base(prompt, height=height, width=width, denoising_end=fraction, output_type="latent",
                  generator=generators(), **common).images  # fmt: skip
    expected = refiner(prompt, image=handed, denoising_start=fraction, output_type="latent",
                       generator=generators(), **common).images  # fmt: skip

    params = GenerationParams(height, width, steps, guidance, seed, scheduler, n)
    ours = None
    for pipe, arch, hand in ((base, "sdxl", Handoff(end=fraction)), (refiner, "sdxl-refiner", None)):
        scaling = pipe.vae.config.scaling_factor
        time_ids = 6 if arch == "sdxl" else 5
        config = PipelineConfig(4, 8, scaling, configs[id(pipe)], architecture=arch, time_ids=time_ids)
        with torch.no_grad():
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=guidance > 1
            )
        cfg = guidance > 1
        embeds = (torch.cat([uncond, cond]) if cfg else cond).numpy()
        pooled_rows = (torch.cat([uncond_pooled, pooled]) if cfg else pooled).numpy()
        added = AddedConditioning(pooled_rows, size_conditioning(params, config))
        if hand is None:
            assert ours is not None
            hand = Handoff(start=fraction, latents=ours)
        ours = denoise(embeds, params, config, torch_unet(pipe.unet), added=added, handoff=hand)
    theirs = expected.numpy() / refiner.vae.config.scaling_factor
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, float(np.abs(theirs).max())))
