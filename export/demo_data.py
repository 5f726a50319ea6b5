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
from scipy import ndimage

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


def _combinations() -> list[tuple[str, str, str, str]]:
    """Every single-object combination: (colour, shape, position, background)."""
    return [
        (color, shape, position, background)
        for color in COLORS
        for shape in SHAPES
        for position in POSITIONS
        for background in COLORS
        if background != color
    ]


# one in ten colour x shape x position x background combinations, never drawn for training (any
# stage), so the held-out checks ask for scenes the model has only seen the parts of
_ALL_COMBINATIONS = _combinations()
HELD_OUT: frozenset[tuple[str, str, str, str]] = frozenset(
    random.Random(2026).sample(_ALL_COMBINATIONS, len(_ALL_COMBINATIONS) // 10)
)


def is_held_out(thing: Thing, background: str) -> bool:
    return (thing.color, thing.shape, thing.position, background) in HELD_OUT


def random_scene(rng: random.Random) -> Scene:
    """A training scene: never one with a held-out combination in it."""
    while True:
        scene = _any_scene(rng)
        if not any(is_held_out(thing, scene.background) for thing in scene.things):
            return scene


def _any_scene(rng: random.Random) -> Scene:
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
# a shape's area over its radius squared, as draw() draws it (the star's inner radius is 0.45)
AREA_PER_R2 = {
    "circle": math.pi,
    "square": 4.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * 0.45 * math.sin(math.pi / 5),
}
# the named regions' centres are 0.23 of the side apart: within 0.11 of one, a centroid is nearer
# to it than to any other, so "left" and "center" can never both pass
POSITION_TOLERANCE = 0.11


def nearest_color(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(((PALETTE - rgb.astype(np.float32)) ** 2).sum(axis=1)))]


@dataclass(frozen=True)
class Check:
    background: str  # the palette colour nearest the image border's median
    object_color: str | None  # the commonest palette colour among non-background pixels
    shape: str | None  # the shape whose outline, fitted to the object's pixels, overlaps them best
    centroid: tuple[float, float] | None  # of the object's pixels, as fractions (x, y)
    ok_background: bool
    ok_color: bool
    ok_shape: bool
    ok_position: bool

    @property
    def ok(self) -> bool:
        return self.ok_background and self.ok_color and self.ok_shape and self.ok_position


def _outline(shape: str, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """A boolean mask of `shape` drawn as draw() draws it."""
    image = Image.new("L", (width, height), 0)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        pen.polygon(_polygon(shape, cx, cy, radius), fill=255)
    return np.asarray(image) > 0


def classify_shape(mask: np.ndarray) -> str:
    """The shape that, centred on the mask's centroid with the mask's area, overlaps it best (IoU)."""
    ys, xs = np.nonzero(mask)
    cx, cy, area = float(xs.mean() + 0.5), float(ys.mean() + 0.5), float(mask.sum())

    def overlap(shape: str) -> float:
        outline = _outline(shape, cx, cy, math.sqrt(area / AREA_PER_R2[shape]), *mask.shape)
        return float((outline & mask).sum() / max(1, (outline | mask).sum()))

    return max(SHAPES, key=overlap)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels of the object's colour elsewhere,
    such as a blurred edge between two colours, do not move its centroid or outline)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def nearest_position(centroid: tuple[float, float]) -> tuple[str, float]:
    """The named region whose centre is nearest (largest of the x and y distances) and that distance."""
    name = min(
        POSITIONS, key=lambda p: max(abs(centroid[0] - POSITIONS[p][0]), abs(centroid[1] - POSITIONS[p][1]))
    )
    fx, fy = POSITIONS[name]
    return name, max(abs(centroid[0] - fx), abs(centroid[1] - fy))


def check_image(image: np.ndarray, thing: Thing, background: str) -> Check:
    """Does a uint8 [H, W, 3] image show `thing` on `background`? Background: the palette colour
    nearest the border's median. Object: the commonest palette colour among the other pixels; its
    largest connected region (at least 2 % of the image) gives the shape (best-fitting outline) and the
    centroid, which must be within POSITION_TOLERANCE of the named region's centre."""
    height, width = image.shape[:2]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    seen_background = nearest_color(np.median(border, axis=0))
    pixels = image.reshape(-1, 3).astype(np.float32)
    labels = np.argmin(((pixels[:, None, :] - PALETTE[None]) ** 2).sum(axis=2), axis=1)
    background_index = NAMES.index(seen_background)
    counts = np.bincount(labels[labels != background_index], minlength=len(NAMES))
    object_color = NAMES[int(np.argmax(counts))] if counts.sum() else None
    shape, centroid, ok_position = None, None, False
    if object_color is not None:
        mask = _largest_region((labels == NAMES.index(object_color)).reshape(height, width))
        if mask.mean() >= 0.02:
            ys, xs = np.nonzero(mask)
            centroid = (float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height)
            shape = classify_shape(mask)
            region, distance = nearest_position(centroid)
            ok_position = region == thing.position and distance <= POSITION_TOLERANCE
    return Check(
        background=seen_background,
        object_color=object_color,
        shape=shape,
        centroid=centroid,
        ok_background=seen_background == background,
        ok_color=object_color == thing.color,
        ok_shape=shape == thing.shape,
        ok_position=ok_position,
    )


CHECKS = ("ok_background", "ok_color", "ok_shape", "ok_position", "ok")


def check_scenes(images: list[np.ndarray], scenes: list[Scene]) -> list[Check]:
    """Each uint8 [H, W, 3] image checked against its single-object scene, in order."""
    return [
        check_image(image, scene.things[0], scene.background)
        for image, scene in zip(images, scenes, strict=True)
    ]


def success_rates(checks: list[Check]) -> dict[str, float]:
    """The share of images with each check right, and with all four right ("ok")."""
    return {key: sum(bool(getattr(c, key)) for c in checks) / max(1, len(checks)) for key in CHECKS}


def held_in_prompts(count: int = 20, seed: int = 1234) -> list[tuple[Scene, int]]:
    """A fixed set of single-object training-distribution scenes (no held-out combination) with seeds."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < count:
        scene = random_scene(rng)
        if len(scene.things) == 1:
            scenes.append((scene, rng.randrange(2**31)))
    return scenes


def held_out_prompts(count: int = 20, seed: int = 4321) -> list[tuple[Scene, int]]:
    """A fixed set of single-object scenes from the held-out combinations (never drawn in training)."""
    rng = random.Random(seed)
    picked = rng.sample(sorted(HELD_OUT), count)
    return [
        (Scene((Thing(shape, color, position),), background), rng.randrange(2**31))
        for color, shape, position, background in picked
    ]


def shuffled(prompts: list[tuple[Scene, int]]) -> list[Scene]:
    """The negative control's captions: each image is checked against the next prompt's scene that is
    not its own (a fixed derangement), so a checker that passes anything would score high here."""
    scenes = [scene for scene, _ in prompts]
    others = []
    for i, scene in enumerate(scenes):
        following = scenes[i + 1 :] + scenes[:i]
        others.append(next((other for other in following if other != scene), scene))
    return others
