"""`sd-triton perf img2img`'s arithmetic: ratios per round against that round's text-to-image."""

from __future__ import annotations

import pytest

from sd_triton.perf.img2img import Img2ImgBenchSettings, modes, summary, table


def test_ratios_are_per_round_against_that_rounds_text_to_image() -> None:
    times = {
        "txt2img": [[100.0, 110.0], [200.0, 200.0]],
        "img2img s=0.5": [[55.0, 50.0], [120.0, 100.0]],
    }
    rows = summary(times)["rows"]
    assert rows["txt2img"] == {"p50_ms": 155.0, "ratio": 1.0, "ratio_spread": [1.0, 1.0]}
    # round 1: 52.5 / 105 = 0.5; round 2: 110 / 200 = 0.55
    assert rows["img2img s=0.5"]["ratio"] == 0.525 and rows["img2img s=0.5"]["ratio_spread"] == [0.5, 0.55]
    document = {"settings": vars(Img2ImgBenchSettings(steps=10)) | {"strengths": (0.5,)}, "size": [64, 64]}
    text = table({**document, **summary(times)})
    assert "| img2img s=0.5 | 77.5 | 0.525 | 0.5–0.55 | 0.5 |" in text  # p50 of all four requests


def test_every_strength_is_a_mode_and_inpainting_one_more() -> None:
    chosen = modes(Img2ImgBenchSettings(strengths=(0.3, 1.0)), 32, 48)
    assert list(chosen) == ["txt2img", "img2img s=0.3", "img2img s=1", "inpaint s=1"]
    assert chosen["img2img s=0.3"]["strength"] == 0.3 and "mask" in chosen["inpaint s=1"]


@pytest.mark.parametrize(
    "bad", [{"steps": 0}, {"strengths": (0.0,)}, {"strengths": (1.5,)}, {"strengths": ()}]
)
def test_settings_are_checked(bad: dict) -> None:
    with pytest.raises(ValueError):
        Img2ImgBenchSettings(**bad)
