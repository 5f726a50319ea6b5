"""The parity gate of an engine swap: a fixed set of golden prompts and seeds rendered with the live
engine and with the candidate, compared on the 0-255 scale (max abs difference, PSNR)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# (prompt, seed): shapes and colours the demo model knows; any model renders them
GOLDEN: tuple[tuple[str, int], ...] = (
    ("a red circle on a blue background", 1),
    ("a green square at the top", 2),
    ("a yellow star in the middle", 3),
    ("fog over a harbour at dawn", 4),
)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@dataclass(frozen=True)
class ParityReport:
    images: list[dict[str, Any]]  # per golden image: prompt, seed, max_abs, psnr_db

    @property
    def max_abs(self) -> int:
        return max(int(i["max_abs"]) for i in self.images)

    @property
    def min_psnr_db(self) -> float:
        return min(float(i["psnr_db"]) for i in self.images)


def render_parity(current: Any, candidate: Any, **params: Any) -> ParityReport:
    """`current`, `candidate`: callables like LocalPipeline (prompt, seed=..., **params) -> .images."""
    images = []
    for prompt, seed in GOLDEN:
        a = current(prompt, seed=seed, **params).images
        b = candidate(prompt, seed=seed, **params).images
        images.append(
            {
                "prompt": prompt,
                "seed": seed,
                "max_abs": int(np.abs(a.astype(int) - b.astype(int)).max()),
                "psnr_db": round(psnr_db(a, b), 2),
            }
        )
    return ParityReport(images)


@dataclass(frozen=True)
class ParityGate:
    """Passes when every golden image is within both limits (None: that limit is off)."""

    min_psnr_db: float | None = 25.0
    max_abs: int | None = None

    def check(self, report: ParityReport) -> list[str]:
        """What fails, one line per image and limit; empty when the candidate passes."""
        failures = []
        for image in report.images:
            where = f"{image['prompt']!r} seed {image['seed']}"
            if self.min_psnr_db is not None and image["psnr_db"] < self.min_psnr_db:
                failures.append(f"{where}: PSNR {image['psnr_db']} dB < {self.min_psnr_db} dB")
            if self.max_abs is not None and image["max_abs"] > self.max_abs:
                failures.append(f"{where}: max abs {image['max_abs']} > {self.max_abs}")
        return failures
