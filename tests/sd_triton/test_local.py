"""The exported ONNX files in-process (no server) give the images Triton serves."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from sd_triton.requests import InvalidRequest
from sd_triton.runtime.local import LocalPipeline
from sd_triton.txt2img_client import txt2img


@pytest.fixture(scope="module")
def local(exported: dict) -> LocalPipeline:
    return LocalPipeline(exported["repo"])


def test_local_images_equal_the_served_ones(
    local: LocalPipeline, client: grpcclient.InferenceServerClient
) -> None:
    params = {"height": 64, "width": 48, "steps": 3, "guidance_scale": 5.0, "seed": 11, "scheduler": "euler"}
    ours = local("a red circle", "blurry", num_images=2, **params)
    served = txt2img(client, "a red circle", negative_prompt="blurry", num_images=2, **params)
    assert ours.images.shape == served.images.shape == (2, 64, 48, 3)
    assert np.abs(ours.images.astype(int) - served.images.astype(int)).max() <= 1
    assert ours.images.std() > 0


def test_local_img2img_equals_the_served_one(
    local: LocalPipeline, client: grpcclient.InferenceServerClient
) -> None:
    params = {"height": 32, "width": 48, "steps": 6, "guidance_scale": 5.0, "seed": 2, "strength": 0.5}
    image = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    ours = local("a red circle", image=image, num_images=2, scheduler="euler_a", **params)
    served = txt2img(client, "a red circle", image=image, num_images=2, scheduler="euler_a", **params)
    assert np.abs(ours.images.astype(int) - served.images.astype(int)).max() <= 1
    text_only = local("a red circle", num_images=2, scheduler="euler_a", **{**params, "strength": None})
    assert np.abs(ours.images.astype(int) - text_only.images.astype(int)).max() > 2  # the image counts


def test_local_requests_are_checked_like_served_ones(local: LocalPipeline) -> None:
    with pytest.raises(InvalidRequest, match="WIDTH"):
        local("x", height=64, width=50, steps=2, guidance_scale=1.0, seed=0, scheduler="ddim")


def test_local_pipeline_serves_threads_at_once(local: LocalPipeline) -> None:
    from concurrent.futures import ThreadPoolExecutor

    params = {"height": 64, "width": 64, "steps": 2, "guidance_scale": 7.5, "scheduler": "ddim"}
    prompts = [
        f"a {c} circle {w}" for c in ("red", "blue") for w in ("", "at the top left on a white background")
    ]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: local(prompts[i], seed=i, **params).images, range(4)))
    for i, images in enumerate(together):  # the same images as one at a time
        assert np.array_equal(images, local(prompts[i], seed=i, **params).images)


def test_the_stacks_engine_settings_reach_onnx_runtime(exported: dict) -> None:
    """With `engine_params` (the floor of the benchmarks), each session spins and threads as the Triton
    engine's config says; without, ONNX Runtime's defaults (spinning on)."""
    from sd_triton.model_params import EngineParams
    from sd_triton.runtime.ort_runner import OrtRunner

    key = "session.intra_op.allow_spinning"
    quiet = LocalPipeline(exported["repo"], engine_params={"unet": EngineParams(allow_spinning=False)})
    default = LocalPipeline(exported["repo"])
    for pipeline, unet_spins in ((quiet, "0"), (default, "1")):
        runners = {name: runner for name, runner in pipeline.runners.items() if isinstance(runner, OrtRunner)}
        options = {
            name: r.session.get_session_options().get_session_config_entry(key) for name, r in runners.items()
        }
        assert options == {"text_encoder": "1", "unet": unet_spins, "vae_decoder": "1", "vae_encoder": "1"}
