"""Bad input to txt2img gets INVALID_ARG naming the input and the limit; the server stays up."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.txt2img_client import txt2img, txt2img_inputs

GOOD = dict(height=64, width=64, steps=4, guidance_scale=7.5, seed=3, scheduler="euler", num_images=1)
LIMITS = c.Limits()

# (id, overrides, words the error message must contain)
CASES = [
    ("steps-zero", {"steps": 0}, ["STEPS", "between 1 and 150", "got 0"]),
    ("steps-over", {"steps": LIMITS.max_steps + 1}, ["STEPS", "150", "got 151"]),
    ("height-not-multiple", {"height": 60}, ["HEIGHT", "multiple of 8", "got 60"]),
    ("width-not-multiple", {"width": 65}, ["WIDTH", "multiple of 8", "got 65"]),
    ("height-over", {"height": 2048}, ["HEIGHT", "1024", "got 2048"]),
    ("width-over", {"width": 1032}, ["WIDTH", "1024", "got 1032"]),
    ("width-zero", {"width": 0}, ["WIDTH", "between 8 and 1024"]),
    ("unknown-scheduler", {"scheduler": "k_euler"}, ["SCHEDULER", "'k_euler'", "euler_a"]),
    ("num-images-zero", {"num_images": 0}, ["NUM_IMAGES", "between 1 and 4", "got 0"]),
    ("num-images-over", {"num_images": 5}, ["NUM_IMAGES", "between 1 and 4", "got 5"]),
    ("guidance-negative", {"guidance_scale": -1.0}, ["GUIDANCE_SCALE", ">= 0", "-1"]),
    ("guidance-nan", {"guidance_scale": float("nan")}, ["GUIDANCE_SCALE", "finite", "nan"]),
    ("guidance-inf", {"guidance_scale": float("inf")}, ["GUIDANCE_SCALE", "finite", "inf"]),
    ("seed-negative", {"seed": -1}, ["SEED", "between 0 and"]),
    ("prompt-not-utf8", {"prompt": b"a cat \xff\xfe"}, ["PROMPT", "UTF-8", "0xff"]),
    ("negative-not-utf8", {"negative_prompt": b"\xc3\x28"}, ["NEGATIVE_PROMPT", "UTF-8"]),
    # SDXL's size conditioning sent to an SD model
    ("sizes-to-sd", {"size_conditioning": [64] * 6}, ["SIZE_CONDITIONING", "SDXL models only"]),
    ("aesthetic-to-sd", {"aesthetic_score": 6.0}, ["AESTHETIC_SCORE", "refiner models only"]),
    ("negative-sizes-to-sd", {"negative_size_conditioning": [8] * 6}, ["NEGATIVE_SIZE_CONDITIONING", "SDXL"]),
]


def assert_still_serving(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_ready()
    assert txt2img(client, "a small boat", **GOOD).images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(("overrides", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_argument_names_input_and_limit(client, overrides: dict, words: list[str]) -> None:
    params = {**GOOD, **overrides}
    prompt = params.pop("prompt", "a small boat")
    with pytest.raises(InferenceServerException) as info:
        txt2img(client, prompt, **params)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    for word in words:
        assert word in info.value.message(), info.value.message()
    assert_still_serving(client)


def test_empty_batch(client) -> None:
    inputs = txt2img_inputs("x", **GOOD)
    empty = grpcclient.InferInput(c.PROMPT.name, [0], "BYTES")
    empty.set_data_from_numpy(np.array([], dtype=object))
    inputs[0] = empty
    with pytest.raises(InferenceServerException) as info:
        client.infer(c.TXT2IMG.name, inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "PROMPT" in info.value.message() and "[1]" in info.value.message(), info.value.message()
    assert_still_serving(client)


def test_bad_request_does_not_disturb_concurrent_good_ones(client) -> None:
    """A bad request and good ones in flight together: each good one still gets its images."""
    futures = []
    results: list[object] = []
    for i in range(4):
        params = {**GOOD, "seed": i} if i != 2 else {**GOOD, "steps": 0}
        done = []
        futures.append(done)
        client.async_infer(
            c.TXT2IMG.name,
            txt2img_inputs("a small boat", **params),
            callback=lambda result, error, done=done: done.append((result, error)),
        )
    import time

    deadline = time.monotonic() + 60
    while any(not f for f in futures) and time.monotonic() < deadline:
        time.sleep(0.05)
    for i, done in enumerate(futures):
        result, error = done[0]
        if i == 2:
            assert error is not None and "STEPS" in error.message()
        else:
            assert error is None, error
            results.append(result.as_numpy(c.IMAGES.name))
    assert len(results) == 3 and all(r.shape == (1, 64, 64, 3) for r in results)
