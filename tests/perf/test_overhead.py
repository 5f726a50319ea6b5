"""`sd-triton perf overhead`: the per-step split and its targets as pure functions, then one short run
on the tiny model (the floor in this process, continuous batching behind a real Triton and gateway)."""

from __future__ import annotations

import json

import pytest

from sd_triton.perf.overhead import (
    FLOOR,
    OverheadSettings,
    judged,
    round_split,
    run_overhead,
    run_split,
    summarize,
    table,
    targets_of,
)
from sd_triton.perf.report import write_report
from tests.conftest import WORK_DIR


def test_a_round_is_the_slope_split_into_the_unet_and_the_rest() -> None:
    low = run_split(10, p50_ms=300.0, requests=4, unet_ms=7.0, unet_calls=40)
    high = run_split(30, p50_ms=500.0, requests=4, unet_ms=9.0, unet_calls=60)  # 2 request steps a call
    split = round_split(low, high)
    assert split["step_ms"] == 10.0  # (500 - 300) / 20
    assert split["unet_ms"] == 8.0 and split["other_ms"] == 2.0
    assert split["request_steps_per_call"] == 2.0 and split["other_ms_per_request_step"] == 1.0
    assert split["p50_low_ms"] == 300.0


def test_rows_keep_the_median_and_the_spread_of_the_rounds() -> None:
    row = summarize([{"step_ms": 3.0}, {"step_ms": 1.0}, {"step_ms": 2.0}])
    assert row == {"step_ms": 2.0, "step_ms_spread": [1.0, 3.0], "rounds": 3}


def test_a_limit_inside_the_spread_is_inconclusive() -> None:
    assert judged("x <= 1", [0.5, 0.6, 0.7], 1.0)["met"] is True
    assert judged("x <= 1", [1.5, 1.6, 1.7], 1.0)["met"] is False
    inside = judged("x <= 1", [0.8, 1.1, 1.2], 1.0)
    assert inside["met"] is None and "spread [0.800, 1.200]" in inside["inconclusive"]
    below_floor = judged("ratio <= 1.15", [0.7, 0.8, 0.9], 1.15, floor=1.0)
    assert below_floor["met"] is None and "floor" in below_floor["anomaly"]


def test_targets_are_what_serving_adds_over_the_floor_at_concurrency_1() -> None:
    def split(step_ms: float, other_ms: float, p50: float) -> dict:
        return {"step_ms": step_ms, "other_ms": other_ms, "p50_low_ms": p50}

    per_round = {
        (FLOOR, 1): [split(7.0, 0.5, 100.0), split(7.2, 0.6, 102.0)],
        ("continuous", 1): [split(9.0, 2.4, 130.0), split(9.4, 2.6, 131.0)],
        ("continuous", 8): [split(20.0, 5.0, 400.0), split(21.0, 5.0, 410.0)],  # not judged
    }
    slope, outside, ratio = targets_of(per_round, "tiny", "continuous")
    assert slope["value"] == pytest.approx(2.1) and slope["met"] is False  # 2.0 and 2.2 over the floor
    assert outside["value"] == pytest.approx(1.95) and outside["met"] is False
    assert ratio["target"].endswith("<= 1.15x the floor's at concurrency 1")
    assert ratio["value"] == pytest.approx((1.3 + 131 / 102) / 2, abs=1e-3) and ratio["met"] is False


def test_the_second_step_count_must_be_higher() -> None:
    with pytest.raises(ValueError, match="steps_high must be above steps"):
        OverheadSettings(steps=10, steps_high=10)


def test_the_inline_path_is_measured_where_the_loop_batches_continuously() -> None:
    names = [name for name, _, _ in OverheadSettings().stacks()]
    assert names == ["none/bls", "request/bls", "dynamic/bls", "continuous/inline", "continuous/bls"]
    with pytest.raises(ValueError, match="unet_paths: 'grpc'"):
        OverheadSettings(unet_paths=("grpc",))
    with pytest.raises(ValueError, match="no stack to measure"):
        OverheadSettings(modes=("dynamic",), unet_paths=("inline",))


def test_a_short_run_on_tiny_splits_every_step(tmp_path) -> None:
    settings = OverheadSettings(
        preset="tiny",
        steps=2,
        steps_high=6,
        concurrency=(1,),
        min_requests=2,
        repeats=1,
        modes=("continuous",),
    )
    document = run_overhead(settings, WORK_DIR)
    rows = {row["system"]: row for row in document["rows"]}
    assert set(rows) == {FLOOR, "continuous/inline", "continuous/bls"}
    for row in rows.values():
        assert row["rounds"] == 1 and row["unet_ms"] > 0
        assert row["other_ms"] == pytest.approx(row["step_ms"] - row["unet_ms"], abs=2e-3)
    # at concurrency 1 every UNet call carries one request's step (its CFG pair)
    for system in ("continuous/inline", "continuous/bls"):
        assert rows[system]["request_steps_per_call"] == pytest.approx(1.0, abs=0.05), system
        adds = document["serving_adds_ms_per_step"][f"{system} at concurrency 1"]
        assert adds["step_ms"] == pytest.approx(rows[system]["step_ms"] - rows[FLOOR]["step_ms"], abs=2e-3)
    assert rows[FLOOR]["request_steps_per_call"] == 1.0
    assert len(document["targets"]) == 3 and "continuous/inline" in document["targets"][0]["target"]
    text = table(document)
    assert "serving adds per step, continuous/inline at concurrency 1" in text and "target " in text
    # perf report renders it: the split per system, what serving adds and its share of a GPU step
    result = tmp_path / "overhead-tiny.json"
    result.write_text(json.dumps(document))
    report = write_report([result], tmp_path / "REPORT.md").read_text()
    assert "## Serving overhead per denoising step, `tiny` preset" in report
    assert "| continuous/inline at concurrency 1 |" in report and "share of a GPU step" in report
