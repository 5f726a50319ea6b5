"""`sd-triton perf soak`, short: 45 s of steady load on the tiny model through the code path `make soak`
runs, against the session's Triton and a gateway started as the soak starts one; and the figures and
verdicts computed from made-up samples."""

from __future__ import annotations

import argparse
import logging

import pytest

from sd_triton.perf.cli import add_parser
from sd_triton.perf.soak import MB, Outcome, Running, Sample, SoakSettings, run_soak, summary, table
from sd_triton.perf.stack import bench_gateway
from sd_triton.triton_server import TritonServer
from tests.conftest import WORK_DIR, free_port

log = logging.getLogger(__name__)

# 45 s: a 15 s warm-up, then two windows of 15 s (about 400 requests each at 4 steps on two cores), so
# each window's p99 still rests on a few hundred requests rather than on the slowest two. (75 s, with 30 s
# windows, until 2026-12: the suite's time is better spent elsewhere; `make soak` judges the targets.)
SHORT = SoakSettings(
    preset="tiny", minutes=0.75, warmup_fraction=1 / 3, steps=4, concurrency=4, windows=2, sample_s=1.0
)
# Memory: the soak's own 5% target holds on this short run (the gateway's RSS moved by 0.2-0.7% and
# Triton's process tree by 0.1% after the warm-up in the runs that set these bounds).
# Latency: 30 s windows on a shared two-core machine are at the mercy of other processes: the p99 (the
# slowest ~6 of ~700 requests) drifted by -22% to +88% between the two windows in those runs, with
# the p50 within 17%. So the short run only catches a gross slowdown, a tail tripled or a median up
# by half; the 10% p99 target is judged by `make soak`.
CI_MAX_P99_DRIFT_PCT = 200.0
CI_MAX_P50_DRIFT_PCT = 50.0


@pytest.fixture(scope="module")
def document(exported: dict, triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    gateway = bench_gateway(triton.grpc_url, free_port())  # result cache off, as `make soak` has it
    gateway.log_file = tmp_path_factory.mktemp("soak") / "gateway.log"
    with gateway:
        assert triton.process is not None and gateway.process is not None
        pids = {"gateway": gateway.process.pid, "triton": triton.process.pid}
        document = run_soak(SHORT, WORK_DIR, Running(exported["repo"], gateway.url, pids))
    log.info("short soak:\n%s", table(document))
    return document


def test_a_short_soak_has_no_errors_and_holds_its_memory(document: dict) -> None:
    assert document["requests"] > 100 and document["errors"] == 0, document["error_samples"]
    assert [w["window"] for w in document["windows"]] == ["warm-up", "1", "2"]
    for window in document["windows"]:
        assert window["requests"] > 0 and window["errors"] == 0
        assert 0 < window["p50_ms"] <= window["p99_ms"]
        assert window["rss_mb"]["gateway"] > 0 and window["rss_mb"]["triton"] > 0
    assert document["p99_drift_pct"] < CI_MAX_P99_DRIFT_PCT, table(document)
    assert document["p50_drift_pct"] < CI_MAX_P50_DRIFT_PCT, table(document)
    for group in ("gateway", "triton"):
        rss = document["rss"][group]
        assert rss["growth_pct"] < SHORT.max_rss_growth_pct, table(document)
        assert rss["after_warmup_mb"] > 0 and rss["samples"] >= 2 * SHORT.rss_samples
    # Triton's group is the server and one python backend stub per model instance
    names = [p["name"] for p in document["rss"]["triton"]["processes"]]
    assert names.count("triton") == 1
    assert {"stub:tokenizer", "stub:denoise", "stub:unet"} <= set(names)
    assert [p["name"] for p in document["rss"]["gateway"]["processes"]] == ["gateway"]
    text = table(document)
    assert "| errors | 0 | <= 0 | PASS |" in text and "triton RSS after warm-up" in text


def _settings() -> SoakSettings:
    # 100 s: warm-up 0-20 s, window 1 20-60 s, window 2 60-100 s
    return SoakSettings(minutes=100 / 60, warmup_fraction=0.2, windows=2, rss_samples=2)


def _outcomes(start: float, latency_ms: float, count: int) -> list[Outcome]:
    return [Outcome(start + i, start + i + latency_ms / 1000) for i in range(count)]


def test_drift_and_growth_are_judged_against_their_targets() -> None:
    outcomes = _outcomes(0, 900, 20) + _outcomes(20, 100, 40) + _outcomes(60, 125, 40)
    outcomes.append(Outcome(99.5, 100.1, "HTTP 500: boom"))  # started in window 2, ended after it
    samples = [
        Sample(t, {"gateway": {1: int(mb * MB)}, "triton": {2: 500 * MB, 3: int(mb * MB)}})
        for t, mb in ((10, 50), (20, 100), (30, 100), (40, 104), (80, 106), (90, 110), (99, 110))
    ]
    document = summary(_settings(), outcomes, samples, {1: "gateway", 2: "triton", 3: "stub:unet"})
    assert [w["requests"] for w in document["windows"]] == [20, 40, 41]
    assert document["windows"][2]["errors"] == 1 and document["errors"] == 1
    assert document["p99_drift_pct"] == 25.0  # the warm-up's 900 ms is not judged
    assert document["p50_drift_pct"] == 25.0
    gateway, triton = document["rss"]["gateway"], document["rss"]["triton"]
    assert (gateway["after_warmup_mb"], gateway["end_mb"], gateway["growth_pct"]) == (100.0, 110.0, 10.0)
    assert triton["growth_pct"] == pytest.approx(100 * (610 / 600 - 1), abs=0.01)
    assert [(p["name"], p["growth_pct"]) for p in triton["processes"]] == [
        ("triton", 0.0),
        ("stub:unet", 10.0),
    ]
    assert [t["met"] for t in document["targets"]] == [False, False, False, True]
    assert document["passed"] is False and "soak: FAIL" in table(document)


def test_cpu_cores_are_split_between_the_stack_and_the_rest_of_the_machine() -> None:
    def sample(at_s: float, gateway: float, triton: float, driver: float, machine: float) -> Sample:
        cpu = {"gateway": gateway, "triton": triton, "driver": driver, "machine": machine}
        return Sample(at_s, {"gateway": {1: MB}, "triton": {2: MB}}, cpu)

    # window 1 (20-60 s): over 30 s the gateway used 6 s, Triton 30 s, the driver 3 s, the machine 57 s
    samples = [sample(20, 10, 100, 5, 200), sample(50, 16, 130, 8, 257), sample(70, 16, 130, 8, 257)]
    windows = summary(_settings(), _outcomes(20, 100, 40), samples, {})["windows"]
    assert windows[1]["cpu_cores"] == {"gateway": 0.2, "triton": 1.0, "others": 0.6}
    assert windows[2]["cpu_cores"] == {"gateway": None, "triton": None, "others": None}  # one sample


def test_a_figure_that_was_not_measured_fails() -> None:
    outcomes = _outcomes(0, 100, 20) + _outcomes(20, 100, 40)  # nothing in the last window
    document = summary(_settings(), outcomes, [], {})
    assert document["p99_drift_pct"] is None and document["rss"]["triton"]["growth_pct"] is None
    assert [t["met"] for t in document["targets"]] == [True, None, None, None]
    assert document["passed"] is False and "FAIL (not measured)" in table(document)


def test_a_steady_run_passes() -> None:
    outcomes = _outcomes(0, 100, 20) + _outcomes(20, 100, 40) + _outcomes(60, 105, 40)
    samples = [Sample(t, {"gateway": {1: 100 * MB}, "triton": {2: 600 * MB}}) for t in range(20, 100, 5)]
    document = summary(_settings(), outcomes, samples, {})
    assert document["passed"] is True and document["p99_drift_pct"] == 5.0


@pytest.mark.parametrize(
    ("field", "value"), [("minutes", 0), ("windows", 1), ("warmup_fraction", 1.0), ("concurrency", 0)]
)
def test_settings_name_the_bad_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SoakSettings(**{field: value})


def test_make_soak_minutes_reach_the_settings() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["perf", "soak", "--minutes", "30"])
    assert (args.preset, args.minutes, args.concurrency, args.windows) == ("small", 30.0, 4, 4)
    assert args.run.__name__ == "_perf_soak" and args.out is None  # perf/results/soak-small.json
