"""The synthetic scenes and the image checker the demo model is judged by."""

from __future__ import annotations

import random

import numpy as np

from sd_triton.export.demo_data import (
    COLORS,
    POSITIONS,
    Thing,
    batch,
    check_image,
    draw,
    held_in_prompts,
    random_scene,
)


def test_scenes_are_reproducible_and_captioned() -> None:
    first, second = batch(random.Random(3), 8), batch(random.Random(3), 8)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    assert first[0].shape == (8, 3, 64, 64) and -1.0 <= first[0].min() and first[0].max() <= 1.0
    scene = random_scene(random.Random(5))
    assert scene.caption.startswith("a ") and scene.caption.endswith(f"on a {scene.background} background")


def test_checker_accepts_every_true_scene() -> None:
    for scene, _ in held_in_prompts(40, seed=9):
        check = check_image(draw(scene), scene.things[0], scene.background)
        assert check.ok, (scene.caption, check)


def test_checker_rejects_wrong_colour_background_and_position() -> None:
    scene, _ = held_in_prompts(1, seed=9)[0]
    thing, image = scene.things[0], draw(scene)
    other_color = next(c for c in COLORS if c not in (thing.color, scene.background))
    far = max(
        POSITIONS,
        key=lambda p: (
            abs(POSITIONS[p][0] - POSITIONS[thing.position][0])
            + abs(POSITIONS[p][1] - POSITIONS[thing.position][1])
        ),
    )
    assert not check_image(image, Thing(thing.shape, other_color, thing.position), scene.background).ok
    assert not check_image(image, thing, other_color).ok
    assert not check_image(image, Thing(thing.shape, thing.color, far), scene.background).ok
