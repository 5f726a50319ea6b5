"""The statistics every benchmark prints, defined once: percentiles are numpy's default (linear
interpolation between the two nearest ranks), over milliseconds, rounded to 0.1 ms in documents."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`; NaN when there are none."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan


def latency_percentiles(
    values_ms: Sequence[float], qs: Sequence[int] = (50, 95, 99)
) -> dict[str, float | None]:
    """{"p50_ms": ..., "p95_ms": ..., "p99_ms": ...}, rounded to 0.1 ms; None when there are no values."""
    return {f"p{q}_ms": round(percentile(values_ms, q), 1) if len(values_ms) else None for q in qs}
