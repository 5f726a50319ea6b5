"""A request's ControlNets (sd_triton/control.py, runtime/controlnets.py): the step window is diffusers'
controlnet_keep, the JSON list and the control images are checked naming the input, and the rows of
several requests share each ControlNet's call with their own scales."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sd_triton import contract as c
from sd_triton.control import ControlRef, parse_refs
from sd_triton.requests import GenerationParams, InvalidRequest
from sd_triton.runtime.controlnets import ControlledUNet, job_control


@pytest.mark.parametrize("steps", [1, 4, 6, 25])
@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.1, 0.6), (0.2, 0.7), (0.5, 1.0), (0.0, 0.3)])
def test_the_window_is_diffusers_controlnet_keep(steps: int, start: float, end: float) -> None:
    # StableDiffusionControlNetPipeline: keeps = [1.0 - float(i / len(timesteps) < s or (i + 1) /
    # len(timesteps) > e) for s, e in zip(control_guidance_start, control_guidance_end)]
    expected = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
    assert [ControlRef("a", start=start, end=end).keep(i, steps) for i in range(steps)] == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[{", "must be a JSON list"),
        ('{"name": "a"}', "must be a JSON list"),
        ('[{"scale": 1}]', "must be a JSON list"),
        ('[{"name": "a", "scale": -0.1}]', "scale must be from 0 to 2"),
        ('[{"name": "a", "scale": true}]', "scale must be from 0 to 2"),
        ('[{"name": "a", "start": 0.8, "end": 0.2}]', "start (0.8) must be below end (0.2)"),
        ('[{"name": "a", "end": 1.5}]', "end must be from 0 to 1"),
        (json.dumps([{"name": str(i)} for i in range(4)]), "at most 3"),
    ],
)
def test_bad_lists_name_controlnets(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_refs(text)
    assert caught.value.field == c.CONTROLNETS.name and words in caught.value.detail


def test_control_images_are_checked_and_scaled_to_unit() -> None:
    params = GenerationParams(height=16, width=24)
    refs = parse_refs('[{"name": "a", "scale": 0.5}, {"name": "b", "start": 0.5}]')
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3)).astype(np.uint8)
    job = job_control(refs, images, params, ["a", "b"])
    assert job is not None and job.images[0].shape == (1, 3, 16, 24)
    assert np.array_equal(job.images[1][0].transpose(1, 2, 0), images[1] / np.float32(255))
    assert [(n, s) for n, s, _ in job.at(0, 4)] == [("a", 0.5)]  # b's window starts at half
    assert [(n, s) for n, s, _ in job.at(3, 4)] == [("a", 0.5), ("b", 1.0)]
    for bad_images, words in (
        (images[:1], "[2, 16, 24, 3]"),
        (images.astype(np.float32), "must be uint8"),
        (None, "is required"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            job_control(refs, bad_images, params, ["a", "b"])
        assert caught.value.field == c.CONTROL_IMAGES.name and words in caught.value.detail
    with pytest.raises(InvalidRequest, match="no ControlNet 'a'"):
        job_control(refs, images, params, ["b"])
    with pytest.raises(InvalidRequest, match="given without CONTROLNETS"):
        job_control([], images, params, ["a", "b"])
    assert job_control([], None, params, ["a"]) is None


class _Runner:
    """A ControlNet (or the controlled UNet) that records its calls: residuals = the sample's rows x a
    constant, noise = the sample plus the residuals' sum."""

    def __init__(self, factor: float, calls: list) -> None:
        self.factor, self.calls = factor, calls

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append((self.factor, {k: v.copy() for k, v in feeds.items()}))
        if self.factor == 0:  # the controlled UNet
            return {"noise_pred": feeds["sample"] + feeds["down_0"] + feeds["mid"]}
        sample = feeds["sample"]
        return {"down_0": sample * self.factor, "mid": sample * self.factor * 10}


class _Library:
    def __init__(self) -> None:
        self.calls: list = []
        self.runners = {
            "a": _Runner(1.0, self.calls),
            "b": _Runner(2.0, self.calls),
            "": _Runner(0, self.calls),
        }

    def runner(self, name: str) -> _Runner:
        return self.runners[name]


def test_rows_of_several_requests_share_each_controlnets_call() -> None:
    """Three requests in one call: rows 0-1 (a at 0.5), rows 2-3 (none active: zeros), rows 4-5 (a at 1 and
    b at 0.7). a runs once on rows 0-1 and 4-5, b once on rows 4-5; each row's residual is its requests'
    scaled sum; a call where nothing is active runs the plain UNet."""
    library = _Library()
    plain_calls = []
    unet = ControlledUNet(lambda *arrays: plain_calls.append(arrays) or arrays[0] * 0, library)
    sample = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1) + 1
    timestep, hidden = np.zeros((6, 1), np.float32), np.zeros((6, 77, 8), np.float32)
    image = np.zeros((1, 3, 8, 8), np.float32)
    controls = [(2, [("a", 0.5, image)]), (2, []), (2, [("a", 1.0, image), ("b", 0.7, image)])]
    noise = unet(sample, timestep, hidden, controls=controls)
    ran = {factor: feeds for factor, feeds in library.calls}
    assert ran[1.0]["sample"].ravel().tolist() == [1, 2, 5, 6] and ran[2.0]["sample"].ravel().tolist() == [
        5,
        6,
    ]
    down = ran[0]["down_0"].ravel()
    expected = [0.5 * 1, 0.5 * 2, 0, 0, 5 + 0.7 * 2 * 5, 6 + 0.7 * 2 * 6]
    assert np.allclose(down, expected) and np.allclose(ran[0]["mid"].ravel(), np.array(expected) * 10)
    assert np.allclose(noise.ravel(), sample.ravel() + np.array(expected) * 11)
    assert not plain_calls
    unet(sample, timestep, hidden, controls=[(6, [])])
    assert len(plain_calls) == 1 and len(library.calls) == 3  # nothing active: the plain UNet alone
