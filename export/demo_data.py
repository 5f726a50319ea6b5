"""Synthetic captioned scenes for the demo model: coloured shapes on plain backgrounds.

Every scene is drawn from a seed, so a dataset is reproducible; captions are plain English
("a red circle on a blue background", "a green square at the top left").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
# region name -> centre as fractions of the image (x, y)
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    position: str


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str

    @property
    def caption(self) -> str:
        parts = []
        for thing in self.things:
            where = "" if thing.position == "center" and len(self.things) == 1 else _where(thing.position)
            parts.append(f"a {thing.color} {thing.shape}{where}")
        return " and ".join(parts) + f" on a {self.background} background"


def _where(position: str) -> str:
    if position in ("left", "right"):
        return f" on the {position}"
    return " in the center" if position == "center" else f" at the {position}"


def random_scene(rng: random.Random) -> Scene:
    count = 1 if rng.random() < 0.75 else 2
    background = rng.choice(list(COLORS))
    positions = (
        rng.sample(list(POSITIONS), count)
        if count == 1
        else rng.choice(
            [("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left")]
        )
    )
    things = []
    for position in positions:
        color = rng.choice([c for c in COLORS if c != background])
        things.append(Thing(rng.choice(SHAPES), color, position))
    return Scene(tuple(things), background)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    points = []  # a five-pointed star
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw(scene: Scene, size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3]."""
    image = Image.new("RGB", (size, size), COLORS[scene.background])
    pen = ImageDraw.Draw(image)
    radius = size * (0.2 if len(scene.things) == 1 else 0.16)
    for thing in scene.things:
        fx, fy = POSITIONS[thing.position]
        cx, cy = fx * size, fy * size
        if thing.shape == "circle":
            pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=COLORS[thing.color])
        else:
            pen.polygon(_polygon(thing.shape, cx, cy, radius), fill=COLORS[thing.color])
    return np.asarray(image)


def batch(rng: random.Random, n: int) -> tuple[np.ndarray, list[str]]:
    """Images as float32 [n, 3, H, W] in [-1, 1] and their captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([draw(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return images.transpose(0, 3, 1, 2), [s.caption for s in scenes]


# --- checking a generated image against its caption, with simple image statistics ---

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
NAMES = list(COLORS)


def nearest_color(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(((PALETTE - rgb.astype(np.float32)) ** 2).sum(axis=1)))]


@dataclass(frozen=True)
class Check:
    background: str  # the palette colour nearest the image border's median
    object_color: str | None  # the commonest palette colour among non-background pixels
    centroid: tuple[float, float] | None  # of the object's pixels, as fractions (x, y)
    ok_background: bool
    ok_color: bool
    ok_position: bool

    @property
    def ok(self) -> bool:
        return self.ok_background and self.ok_color and self.ok_position


def check_image(image: np.ndarray, thing: Thing, background: str, tolerance: float = 0.17) -> Check:
    """Does a uint8 [H, W, 3] image show `thing` on `background`? Background: the border's median
    colour. Object: pixels whose nearest palette colour is the object's, at least 2 % of the image,
    with their centroid within `tolerance` (fraction of the side) of the named region's centre."""
    height, width = image.shape[:2]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    seen_background = nearest_color(np.median(border, axis=0))
    pixels = image.reshape(-1, 3).astype(np.float32)
    labels = np.argmin(((pixels[:, None, :] - PALETTE[None]) ** 2).sum(axis=2), axis=1)
    background_index = NAMES.index(seen_background)
    counts = np.bincount(labels[labels != background_index], minlength=len(NAMES))
    object_color = NAMES[int(np.argmax(counts))] if counts.sum() else None
    mask = (labels == NAMES.index(thing.color)).reshape(height, width)
    centroid = None
    ok_position = False
    if mask.mean() >= 0.02:
        ys, xs = np.nonzero(mask)
        centroid = (float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height)
        fx, fy = POSITIONS[thing.position]
        ok_position = max(abs(centroid[0] - fx), abs(centroid[1] - fy)) <= tolerance
    return Check(
        background=seen_background,
        object_color=object_color,
        centroid=centroid,
        ok_background=seen_background == background,
        ok_color=object_color == thing.color,
        ok_position=ok_position,
    )


def success_rates(checks: list[Check]) -> dict[str, float]:
    """The share of images with the background, the object colour, the position and all three right."""
    keys = ("ok_background", "ok_color", "ok_position", "ok")
    return {key: sum(bool(getattr(c, key)) for c in checks) / max(1, len(checks)) for key in keys}


def held_in_prompts(count: int = 20, seed: int = 1234) -> list[tuple[Scene, int]]:
    """A fixed set of single-object scenes (all of them in the training distribution) with seeds."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < count:
        scene = random_scene(rng)
        if len(scene.things) == 1:
            scenes.append((scene, rng.randrange(2**31)))
    return scenes
