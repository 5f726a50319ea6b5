"""Continuous batching through the real Triton server (the session repository's default mode):
requests that join each other mid-flight get the images they get alone, and really share UNet calls."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.triton_server import TritonServer
from sd_triton.txt2img_client import infer_input, txt2img
from tests.conftest import unet_calls

# Different prompts, seeds, steps, schedulers, guidance, image counts and shapes.
REQUESTS = [
    {"prompt": "a red circle", "steps": 12, "scheduler": "ddim", "seed": 1, "height": 64, "width": 64},
    {"prompt": "a blue square", "steps": 8, "scheduler": "euler_a", "seed": 2, "height": 64, "width": 64},
    {
        "prompt": "fog",
        "steps": 9,
        "scheduler": "dpmpp_2m",
        "seed": 3,
        "height": 48,
        "width": 64,
        "num_images": 2,
    },
    {
        "prompt": "a star",
        "steps": 7,
        "scheduler": "lms",
        "seed": 4,
        "height": 64,
        "width": 64,
        "guidance_scale": 1.0,
    },
    {"prompt": "a tree", "steps": 10, "scheduler": "unipc", "seed": 5, "height": 64, "width": 64},
]


def _call(client: grpcclient.InferenceServerClient, request: dict) -> np.ndarray:
    params = {"guidance_scale": 7.5, "num_images": 1, **request}
    return txt2img(client, params.pop("prompt"), **params).images.astype(int)


def test_requests_joining_mid_flight_get_their_alone_images(
    client: grpcclient.InferenceServerClient, triton: TritonServer
) -> None:
    # 1. Each request alone, one after the other: one UNet call per step.
    before = unet_calls(triton)
    solo = [_call(client, r) for r in REQUESTS]
    alone_execs = unet_calls(triton)[0] - before[0]
    assert alone_execs == sum(r["steps"] for r in REQUESTS)

    # 2. All of them at once, arriving 10 ms apart: later ones join the running batch. (A request alone
    #    takes ~60 ms on the inline UNet path: 40 ms apart, as before it, they barely overlapped.)
    def staggered(index: int) -> np.ndarray:
        time.sleep(0.01 * index)
        return _call(client, REQUESTS[index])

    before = unet_calls(triton)
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(staggered, range(len(REQUESTS))))
    execs, rows = (after - start for after, start in zip(unet_calls(triton), before, strict=True))

    # 3. They shared UNet calls (fewer executions than steps, several requests' rows per call) ...
    assert execs < alone_execs
    assert rows / execs > 2.0
    # ... and every image is the one it was alone.
    for request, a, b in zip(REQUESTS, solo, together, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 2, request["prompt"]
        assert a.std() > 0


def test_image_and_inpainting_requests_batch_with_text_requests(
    client: grpcclient.InferenceServerClient, triton: TritonServer
) -> None:
    """Text-to-image, image-to-image at two strengths (other start steps) and inpainting in flight
    together: each gets its alone image, and they share UNet calls."""
    picture = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    mixed = [
        {"prompt": "a red circle", "steps": 10, "scheduler": "ddim", "seed": 1, "height": 64, "width": 64},
        {**REQUESTS[0], "prompt": "a barn", "image": picture, "strength": 0.5, "seed": 6},
        {**REQUESTS[1], "prompt": "a gate", "image": picture, "strength": 0.8, "seed": 7},
        {"prompt": "a door", "steps": 10, "scheduler": "euler", "seed": 8, "height": 64, "width": 64,
         "image": picture, "mask": mask, "strength": 1.0},
    ]  # fmt: skip
    before = unet_calls(triton)[0]
    solo = [_call(client, r) for r in mixed]
    alone = unet_calls(triton)[0] - before
    assert alone == 10 + 6 + 6 + 10  # int(steps x strength) for the image requests

    def staggered(index: int) -> np.ndarray:
        time.sleep(0.01 * index)
        return _call(client, mixed[index])

    before = unet_calls(triton)[0]
    with ThreadPoolExecutor(len(mixed)) as pool:
        together = list(pool.map(staggered, range(len(mixed))))
    assert unet_calls(triton)[0] - before < alone
    for request, a, b in zip(mixed, solo, together, strict=True):
        assert np.abs(a - b).max() <= 2, request["prompt"]


def test_requests_finishing_together_get_their_own_images(client: grpcclient.InferenceServerClient) -> None:
    """Requests that finish in the same iteration are decoded together on the inline path (VAE calls of
    up to its max batch, per latent shape): each still gets its own images, in its own size and count."""
    same_steps = [
        {"prompt": "a red circle", "seed": 11, "height": 64, "width": 64},
        {"prompt": "a blue square", "seed": 12, "height": 64, "width": 64, "num_images": 2},
        {"prompt": "fog", "seed": 13, "height": 48, "width": 64},
        {"prompt": "a star", "seed": 14, "height": 64, "width": 64, "num_images": 2},
        {"prompt": "a tree", "seed": 15, "height": 64, "width": 64},
    ]
    requests = [{"steps": 6, "scheduler": "euler", **r} for r in same_steps]
    solo = [_call(client, r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:  # at once: they join, and finish, together
        together = list(pool.map(lambda r: _call(client, r), requests))
    for request, a, b in zip(requests, solo, together, strict=True):
        assert a.shape == (request.get("num_images", 1), request["height"], request["width"], 3)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, request["prompt"]
    assert len({image.tobytes() for images in solo for image in images}) == 7  # all different images


def _denoise_inputs(config: PipelineConfig, steps: int) -> list[grpcclient.InferInput]:
    """A denoise request on its own (random embeddings), as the ensemble would send it."""
    values = {
        c.PROMPT_EMBEDS: np.random.default_rng(0).standard_normal((2, 77, config.text_hidden_size)),
        c.HEIGHT: 64,
        c.WIDTH: 64,
        c.STEPS: steps,
        c.GUIDANCE_SCALE: 7.5,
        c.SEED: 5,
        c.SCHEDULER: b"ddim",
        c.NUM_IMAGES: 1,
    }
    return [
        infer_input(spec, np.asarray(value if spec is c.PROMPT_EMBEDS else [value], dtype=spec.numpy_dtype))
        for spec, value in values.items()
    ]


def test_a_cancelled_request_leaves_the_batch_without_hurting_the_others(
    client: grpcclient.InferenceServerClient, triton: TritonServer, exported: dict
) -> None:
    """The client cancels a denoise call (Triton 2.51 does not pass an ensemble's cancellation on to
    its steps, so the call goes to denoise itself, as perf_analyzer's would)."""
    config = PipelineConfig.load(exported["repo"] / "denoise" / "1" / FILENAME)
    expected = _call(client, REQUESTS[1])
    before = unet_calls(triton)[0]
    context = client.async_infer(c.DENOISE.name, _denoise_inputs(config, 150), lambda **_: None)
    time.sleep(0.1)  # the inline UNet path runs ~3 ms a step here: 0.3 s was two thirds of the 150
    context.cancel()
    # another request runs beside it and after it, unharmed
    assert np.abs(_call(client, REQUESTS[1]) - expected).max() <= 2
    # the cancelled one left the batch instead of running its 150 steps
    time.sleep(1.0)
    executions = unet_calls(triton)[0] - before
    assert executions < 150 - 50, executions


@pytest.mark.parametrize("bad", [{"steps": 0}, {"scheduler": "k_euler"}])
def test_bad_requests_are_refused_while_others_run(
    client: grpcclient.InferenceServerClient, bad: dict
) -> None:
    expected = _call(client, REQUESTS[1])
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(_call, client, REQUESTS[1])
        with pytest.raises(InferenceServerException, match="STEPS|SCHEDULER"):
            _call(client, {**REQUESTS[0], **bad})
        assert np.abs(good.result() - expected).max() <= 2
