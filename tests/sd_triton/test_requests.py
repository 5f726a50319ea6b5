from __future__ import annotations

import math

import pytest

from sd_triton.contract import SCHEDULERS, Limits
from sd_triton.requests import InvalidRequest, decode_text, uses_guidance, validate_params

GOOD = dict(height=512, width=768, steps=30, guidance_scale=7.5, seed=1, scheduler="euler_a", num_images=2)


def check(**overrides):
    return validate_params(**{**GOOD, **overrides}, limits=Limits(), spatial_multiple=8)


def test_valid_request() -> None:
    params = check()
    assert (params.height, params.width, params.num_images) == (512, 768, 2)
    assert params.classifier_free_guidance


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"height": 516}, "HEIGHT", ["multiple of 8", "1024", "516"]),
        ({"width": 1040}, "WIDTH", ["1024", "1040"]),
        ({"steps": 0}, "STEPS", ["1 and 150"]),
        ({"steps": 151}, "STEPS", ["1 and 150"]),
        ({"scheduler": "Euler"}, "SCHEDULER", ["'Euler'", "euler_a"]),
        ({"num_images": 0}, "NUM_IMAGES", ["1 and 4"]),
        ({"guidance_scale": math.nan}, "GUIDANCE_SCALE", ["finite"]),
        ({"guidance_scale": -0.5}, "GUIDANCE_SCALE", [">= 0"]),
        ({"seed": 2**63 - 1}, "SEED", [str(2**63 - 2)]),  # two images: the last seed must fit
    ],
)
def test_invalid(overrides: dict, field: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        check(**overrides)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    for word in words:
        assert word in str(info.value)


def test_spatial_multiple_comes_from_the_model() -> None:
    assert validate_params(**{**GOOD, "height": 516}, limits=Limits(), spatial_multiple=4).height == 516


def test_guidance_rule_is_diffusers() -> None:
    assert not uses_guidance(1.0) and uses_guidance(1.01) and not uses_guidance(0.0)


def test_decode_text() -> None:
    assert decode_text("PROMPT", "é".encode()) == "é"
    with pytest.raises(InvalidRequest, match=r"NEGATIVE_PROMPT: is not valid UTF-8 \(byte 1 of 2 is 0xff\)"):
        decode_text("NEGATIVE_PROMPT", b"a\xff")


def test_limits_validated() -> None:
    with pytest.raises(ValueError, match="max_side"):
        Limits(max_side=0)
    assert set(SCHEDULERS) >= {
        "ddim",
        "euler",
        "euler_a",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "lms",
        "pndm",
        "unipc",
    }


def test_the_contract_names_the_class_runtime_builds_for_each_scheduler() -> None:
    """contract.SCHEDULER_CLASSES (the gateway's provenance, torch-free) is what the runtime builds, and
    every name but `default` adds options a test in tests/integration/test_parity.py checks."""
    from sd_triton.contract import DEFAULT_SCHEDULER, SCHEDULER_CLASSES
    from sd_triton.runtime.schedulers import make_scheduler

    config = {
        "_class_name": "PNDMScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "skip_prk_steps": True,
    }
    assert set(SCHEDULER_CLASSES) == set(SCHEDULERS) - {DEFAULT_SCHEDULER}
    for name in SCHEDULERS:
        built = type(make_scheduler(name, config)).__name__
        assert built == SCHEDULER_CLASSES.get(name, "PNDMScheduler"), name
    karras = make_scheduler("euler_karras", {**config, "use_karras_sigmas": False})
    assert karras.config.use_karras_sigmas is True, "a name's options win over the checkpoint's"
    own = make_scheduler(DEFAULT_SCHEDULER, {**config, "_class_name": "LCMScheduler"})
    assert type(own).__name__ == "LCMScheduler"


def test_an_invalid_request_round_trips_through_its_message() -> None:
    """Triton carries a python step's InvalidRequest as text; `parse` gives back its field and detail."""
    error = InvalidRequest("HEIGHT", "must be a multiple of 8 between 8 and 1024, got 70")
    assert (error.field, error.json_field, error.detail) == ("HEIGHT", "height", error.detail)
    parsed = InvalidRequest.parse(f"in ensemble 'txt2img', {error}", ["PROMPT", "HEIGHT", "WIDTH"])
    assert parsed is not None and (parsed.field, parsed.detail) == (error.field, error.detail)
    assert InvalidRequest.parse("in ensemble 'txt2img', something else went wrong", ["HEIGHT"]) is None
