"""The one percentile every benchmark prints (perf/stats.py)."""

from __future__ import annotations

import math

from sd_triton.perf.stats import latency_percentiles, percentile


def test_percentile_interpolates_between_ranks() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 50) == 25.0
    assert percentile(values, 0) == 10.0 and percentile(values, 100) == 40.0
    assert percentile(values, 90) == 37.0  # 0.9 * 3 = 2.7 ranks: 30 + 0.7 * 10
    assert math.isnan(percentile([], 50))


def test_latency_percentiles_are_rounded_and_none_without_values() -> None:
    assert latency_percentiles([1.04, 2.0, 3.0]) == {"p50_ms": 2.0, "p95_ms": 2.9, "p99_ms": 3.0}
    assert latency_percentiles([], (50, 99)) == {"p50_ms": None, "p99_ms": None}
