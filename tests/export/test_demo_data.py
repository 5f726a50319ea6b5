"""The synthetic scenes and the image checker the demo model is judged by."""

from __future__ import annotations

import random

import numpy as np

from sd_triton.export.demo_data import (
    COLORS,
    HELD_OUT,
    POSITION_TOLERANCE,
    POSITIONS,
    SHAPES,
    Scene,
    Thing,
    batch,
    check_image,
    check_scenes,
    draw,
    held_in_prompts,
    held_out_prompts,
    is_held_out,
    nearest_position,
    random_scene,
    shuffled,
    success_rates,
)


def test_scenes_are_reproducible_and_captioned() -> None:
    first, second = batch(random.Random(3), 8), batch(random.Random(3), 8)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    assert first[0].shape == (8, 3, 64, 64) and -1.0 <= first[0].min() and first[0].max() <= 1.0
    scene = random_scene(random.Random(5))
    assert scene.caption.startswith("a ") and scene.caption.endswith(f"on a {scene.background} background")


def test_training_never_draws_a_held_out_combination() -> None:
    rng = random.Random(11)
    scenes = [random_scene(rng) for _ in range(5000)]
    assert not any(is_held_out(thing, scene.background) for scene in scenes for thing in scene.things)
    # ... while every colour, shape, position and background on its own is still drawn
    things = [thing for scene in scenes for thing in scene.things]
    assert {t.color for t in things} == set(COLORS) and {t.shape for t in things} == set(SHAPES)
    assert {t.position for t in things} == set(POSITIONS)
    assert {s.background for s in scenes} == set(COLORS)
    assert 150 < len(HELD_OUT) < 250
    held_out = held_out_prompts(40)
    assert all(is_held_out(scene.things[0], scene.background) for scene, _ in held_out)
    assert not any(is_held_out(scene.things[0], scene.background) for scene, _ in held_in_prompts(40))


def test_checker_accepts_every_true_scene() -> None:
    for scene, _ in held_in_prompts(40, seed=9) + held_out_prompts(40, seed=9):
        check = check_image(draw(scene), scene.things[0], scene.background)
        assert check.ok, (scene.caption, check)


def test_checker_tells_every_shape_from_every_other() -> None:
    for drawn in SHAPES:
        for position in POSITIONS:
            scene = Scene((Thing(drawn, "red", position),), "blue")
            check = check_image(draw(scene), scene.things[0], "blue")
            assert check.shape == drawn and check.ok, (scene.caption, check)
            for other in SHAPES:
                if other != drawn:
                    assert not check_image(draw(scene), Thing(other, "red", position), "blue").ok


def test_no_centroid_passes_two_positions() -> None:
    for x in np.linspace(0, 1, 101):
        for y in np.linspace(0, 1, 101):
            passing = [
                p for p, (fx, fy) in POSITIONS.items() if max(abs(x - fx), abs(y - fy)) <= POSITION_TOLERANCE
            ]
            assert len(passing) <= 1, (x, y, passing)
            if passing:
                assert nearest_position((x, y))[0] == passing[0]


def test_the_negative_control_scores_low_on_true_scenes() -> None:
    prompts = held_in_prompts(40, seed=5)
    checks = check_scenes([draw(scene) for scene, _ in prompts], shuffled(prompts))
    assert all(scene != other for (scene, _), other in zip(prompts, shuffled(prompts), strict=True))
    assert success_rates(checks)["ok"] <= 0.05


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
