"""Engine swaps under load (issue 8's acceptance): the UNet switched between python-ort FP32 and INT8
in a running Triton (explicit model control) while requests run through the real gateway, sync and
async jobs. No request fails; every response's provenance names the UNet version that was live while
it ran, and its pixels are that engine's; a broken candidate is refused while the live engine serves."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from sd_triton.engine_record import EngineRecord
from sd_triton.export.engine_swap import GateSettings, SwapOptions, rollback, set_engine
from sd_triton.export.engines import engine_rows, loaded_versions
from sd_triton.export.parity import psnr_db
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from sd_triton.gateway.process import GatewayProcess
from sd_triton.runtime.local import LocalPipeline
from sd_triton.triton_server import TritonServer
from tests.conftest import WORK_DIR, free_port, triton_server
from tests.gateway.test_jobs import png
from tests.load import Load

log = logging.getLogger(__name__)
PARAMS = {"height": 64, "width": 64, "steps": 6, "guidance_scale": 7.5, "scheduler": "ddim"}
PROMPT = "a red circle on a blue background"
GATE = GateSettings(steps=4)


@pytest.fixture(scope="module", params=["inline", "bls"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, TritonServer, GatewayProcess]]:
    """Its own repository, Triton and gateway: this module changes the live engines. Once per UNet path:
    the loop's own copy of the engine (inline) and a BLS call to Triton's per step."""
    work = tmp_path_factory.mktemp(f"swap-load-{request.param}")
    repo = work / "model_repository"
    settings = RepositorySettings(unet_path=request.param)
    run_export(ExportOptions(model="tiny", repo=repo, settings=settings, work_dir=WORK_DIR))
    triton = triton_server(repo, work / "triton.log")
    with triton, GatewayProcess(triton.grpc_url, port=free_port(), log_file=work / "gateway.log") as gateway:
        yield repo, triton, gateway


def _versions(result: dict[str, Any]) -> list[int]:
    return [engine["version"] for engine in result["body"]["provenance"]["unet_engines"]]


def test_swaps_under_load_lose_nothing_and_provenance_follows_the_live_engine(stack, tmp_path: Path) -> None:
    repo, triton, gateway = stack
    triton_http = f"localhost:{triton.http_port}"
    marks: dict[str, float] = {}
    with Load(gateway.url, {"prompt": PROMPT, **PARAMS}) as load:
        load.wait_for(0, 6)
        # 1. FP32 -> INT8 while the load runs (the gate first, then Triton's load: the swap itself).
        to_int8 = set_engine(
            repo, SwapOptions("unet", "python-ort", "int8", gate=GATE, triton_http=triton_http)
        )
        assert to_int8.load_window is not None
        marks["int8_start"], marks["int8_live"] = to_int8.load_window
        assert to_int8.switched and to_int8.record is not None and to_int8.record.version == 2
        assert to_int8.report is not None and to_int8.report.min_psnr_db >= 25.0
        log.info(
            "gate FP32 -> INT8: min PSNR %.1f dB, max abs %d",
            to_int8.report.min_psnr_db,
            to_int8.report.max_abs,
        )
        load.wait_for(marks["int8_live"], 6)
        # 2. A broken candidate: refused by the gate, the INT8 engine keeps serving.
        broken = tmp_path / "model.onnx"
        broken.write_bytes((repo / "unet" / "1" / "model.onnx").read_bytes()[:4096])
        refused = set_engine(
            repo, SwapOptions("unet", "python-ort", artifact=broken, gate=GATE, triton_http=triton_http)
        )
        assert not refused.switched and "does not run" in refused.failures[0]
        assert loaded_versions(triton_http)["unet"] == ["2"]
        marks["refused"] = time.monotonic()
        load.wait_for(marks["refused"], 4)
        # 3. Roll back to FP32.
        marks["rollback_start"] = time.monotonic()
        assert rollback(repo, "unet", triton_http).version == 1
        marks["rollback_live"] = time.monotonic()
        load.wait_for(marks["rollback_live"], 6)
    results = load.results

    # Nothing failed, sync or async.
    assert not load.failures(), load.failures()
    assert {r["kind"] for r in results} == {"sync", "job"}
    assert {r["body"]["cache"] for r in results} == {"bypass"}  # Cache-Control: no-cache, jobs included

    # Provenance follows the live engine: only v1 before the swap, only v2 between the swap and the
    # rollback, only v1 after it; a request that overlapped a swap ran on one engine or both in order.
    def phase(r: dict[str, Any]) -> list[int] | None:
        if r["end"] < marks["int8_start"]:
            return [1]
        if r["start"] > marks["int8_live"] and r["end"] < marks["rollback_start"]:
            return [2]
        if r["start"] > marks["rollback_live"]:
            return [1]
        return None

    counts = {"v1 before": 0, "v2": 0, "v1 after": 0, "overlapping": 0, "ran on both": 0}
    for r in results:
        expected, versions = phase(r), _versions(r)
        if expected is None:
            assert versions in ([1], [2], [1, 2], [2, 1]), versions
            counts["overlapping"] += 1
            counts["ran on both"] += len(versions) == 2
        else:
            assert versions == expected, (r["kind"], r["start"], r["end"], marks, versions)
            counts[
                "v2"
                if expected == [2]
                else "v1 after"
                if r["start"] > marks["rollback_live"]
                else "v1 before"
            ] += 1
    log.info("responses per phase: %s", counts)
    assert counts["v1 before"] and counts["v2"] and counts["v1 after"], counts

    # ... with each version's own hash and precision, and that engine's pixels.
    records = {v: EngineRecord.load(repo / "unet" / str(v)) for v in (1, 2)}
    local = {
        v: LocalPipeline(repo, model_files={"unet": str(repo / "unet" / str(v) / r.artifact)})
        for v, r in records.items()
        if r
    }
    expected_images: dict[tuple[int, int], np.ndarray] = {}
    for r in results:
        versions = _versions(r)
        engine = r["body"]["provenance"]["unet_engines"][-1]
        record = records[engine["version"]]
        assert record is not None and (engine["sha256"], engine["precision"]) == (
            record.sha256,
            record.precision,
        )
        if len(versions) == 1:
            key = (versions[0], r["seed"])
            if key not in expected_images:
                expected_images[key] = local[versions[0]](PROMPT, seed=r["seed"], **PARAMS).images[0]
            served = png(r["body"]["images"][0]["base64"])
            if record.precision == "fp32":
                assert np.abs(served.astype(int) - expected_images[key]).max() <= 2, (r["kind"], key)
            else:  # dynamic INT8 scales activations per UNet batch: who shares the call moves a few levels
                assert psnr_db(served, expected_images[key]) >= 40.0, (r["kind"], key)

    # Triton and `engine list` agree: version 1 live and loaded again.
    unet = next(row for row in engine_rows(repo, triton_http) if row["component"] == "unet")
    assert (unet["version"], unet["precision"], unet["loaded_versions"]) == (1, "fp32", ["1"])


def test_the_python_torch_kind_serves_the_same_images(stack) -> None:
    """The UNet switched to PyTorch in Triton's python backend: the gate passes, responses say
    python-torch, and the pixels are the ONNX graph's (FP32 both)."""
    repo, triton, gateway = stack
    triton_http = f"localhost:{triton.http_port}"
    result = set_engine(repo, SwapOptions("unet", "python-torch", gate=GATE, triton_http=triton_http))
    assert result.switched and result.record is not None and result.report is not None
    assert result.report.max_abs <= 2  # PyTorch vs the ONNX graph of the same weights
    body = {"prompt": PROMPT, "seed": 7, **PARAMS}
    response = httpx.post(
        f"{gateway.url}/v1/generate", json=body, headers={"Cache-Control": "no-cache"}, timeout=120
    )
    assert response.status_code == 200, response.text
    unet = response.json()["provenance"]["components"]["unet"]
    assert (unet["engine"], unet["version"], unet["sha256"]) == (
        "python-torch",
        result.record.version,
        result.record.sha256,
    )
    served = png(response.json()["images"][0]["base64"]).astype(int)
    expected = LocalPipeline(repo)(PROMPT, seed=7, **PARAMS).images[0].astype(int)  # ONNX Runtime, FP32
    assert np.abs(served - expected).max() <= 2
    assert rollback(repo, "unet", triton_http).kind == "python-ort"
