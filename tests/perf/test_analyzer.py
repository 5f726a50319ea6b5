"""perf_analyzer for real against the session's Triton server (tiny model), its CSV parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_triton.perf.analyzer import Sweep, parse_csv, run_sweep, table
from sd_triton.perf.inputs import Request, batch_size_for, write_inputs
from sd_triton.perf.tools import ensure_perf_analyzer
from sd_triton.triton_server import TritonServer
from tests.perf.test_tools import ROOT

# plumbing, not precision: windows may vary up to 5x on a busy CI machine
QUICK = {"measurement_ms": 500, "stability_percentage": 400, "max_trials": 10}


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    return ensure_perf_analyzer(ROOT / ".tools")


@pytest.mark.parametrize("model", ["unet", "text_encoder", "vae_decoder", "vae_encoder"])
def test_each_component_is_measured_with_its_input_data(
    model: str, perf_analyzer: Path, triton: TritonServer, exported: dict, tmp_path: Path
) -> None:
    request = Request(height=64, width=48)
    data = write_inputs(exported["repo"], tmp_path / "inputs", request, (model,))[model]
    sweep = Sweep(model, triton.grpc_url, data, batch_size_for(model, request), concurrency=(1, 2), **QUICK)
    rows = run_sweep(sweep, perf_analyzer, tmp_path)
    assert [r.level for r in rows] == [1.0, 2.0]
    for row in rows:
        assert row.throughput > 0
        assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms
        assert row.compute_infer_ms > 0
    saved = (tmp_path / f"{model}.csv").read_text().strip().splitlines()
    assert len(saved) == 3 and saved[0].startswith("Concurrency,Inferences/Second")
    assert "c.infer" in table(rows)


def test_the_whole_pipeline_under_a_request_rate(
    perf_analyzer: Path, triton: TritonServer, exported: dict, tmp_path: Path
) -> None:
    request = Request(steps=2)
    data = write_inputs(exported["repo"], tmp_path / "inputs", request, ("txt2img",))["txt2img"]
    rows = run_sweep(
        Sweep("txt2img", triton.grpc_url, data, request_rates=(4.0,), **QUICK), perf_analyzer, tmp_path
    )
    assert len(rows) == 1 and rows[0].mode == "request-rate" and rows[0].level == 4.0
    assert 1.0 < rows[0].throughput < 8.0  # an open loop at about 4 requests/s
    assert rows[0].p50_ms > 0


def test_image_to_image_requests_through_perf_analyzer(
    perf_analyzer: Path, triton: TritonServer, exported: dict, tmp_path: Path
) -> None:
    request = Request(steps=4, height=32, width=32, init_image=True, strength=0.5)
    data = write_inputs(exported["repo"], tmp_path / "inputs", request, ("txt2img",))["txt2img"]
    rows = run_sweep(
        Sweep("txt2img", triton.grpc_url, data, concurrency=(1,), **QUICK), perf_analyzer, tmp_path
    )
    assert len(rows) == 1 and rows[0].throughput > 0 and rows[0].p50_ms > 0


def test_a_failing_run_says_why(perf_analyzer: Path, triton: TritonServer, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="perf_analyzer failed on no_such_model"):
        run_sweep(Sweep("no_such_model", triton.grpc_url, **QUICK), perf_analyzer, tmp_path)


def test_sweep_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="concurrency levels must be >= 1"):
        Sweep("unet", "localhost:1", concurrency=(0,))
    with pytest.raises(ValueError, match="request rates must be > 0"):
        Sweep("unet", "localhost:1", request_rates=(-1.0,))
    with pytest.raises(ValueError, match="protocol must be grpc or http"):
        Sweep("unet", "localhost:1", protocol="tcp")


def test_csv_without_the_expected_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        parse_csv("Concurrency,Inferences/Second\n1,2.0\n", "concurrency")
