"""INT8 engines on CPU: the export quantizes the UNet and text encoder (ONNX Runtime, dynamic), the
configs point the engines at the INT8 graph, Triton serves it, the gateway's provenance says int8, and
the parity gate measures it against FP32 (and refuses a broken candidate)."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from sd_triton import contract as c
from sd_triton.export.engines import engine_rows, table
from sd_triton.export.parity import GOLDEN, ParityGate, psnr_db, render_parity
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.quantize import INT8_FILE
from sd_triton.export.repository import CONFIG_FILE, RepositorySettings, parse
from sd_triton.gateway.process import GatewayProcess
from sd_triton.runtime.local import LocalPipeline
from sd_triton.triton_server import TritonServer
from tests.conftest import WORK_DIR, free_port, triton_server

INT8 = ("unet", "text_encoder")
PARAMS = {"height": 64, "width": 64, "steps": 6, "guidance_scale": 7.5, "scheduler": "ddim"}


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("int8") / "model_repository"
    manifest = run_export(
        ExportOptions(model="tiny", repo=repo, settings=RepositorySettings(int8=INT8), work_dir=WORK_DIR)
    )
    return repo, manifest


def test_the_export_writes_int8_graphs_and_points_the_configs_at_them(int8_repo) -> None:
    repo, manifest = int8_repo
    for name in c.ENGINE_MODELS:
        config = parse((repo / name / CONFIG_FILE).read_text())
        entry = manifest["components"][name]
        if name in INT8:
            assert config.parameters["model_file"].string_value == INT8_FILE
            assert config.parameters["precision"].string_value == "int8" == entry["precision"]
            assert (repo / name / "1" / INT8_FILE).is_file()
            assert list(entry["int8"]["artifacts"]) == [f"{name}/1/{INT8_FILE}"]
        else:
            assert config.parameters["model_file"].string_value == "model.onnx" and "int8" not in entry
            assert config.parameters["precision"].string_value == "fp32"
    # idempotent: the same export again reuses the INT8 graphs (same artifact, not rewritten)
    unet_int8 = repo / "unet" / "1" / INT8_FILE
    written = unet_int8.stat().st_mtime_ns
    again = run_export(
        ExportOptions(model="tiny", repo=repo, settings=RepositorySettings(int8=INT8), work_dir=WORK_DIR)
    )
    assert again["components"]["unet"]["int8"] == manifest["components"]["unet"]["int8"]
    assert unet_int8.stat().st_mtime_ns == written


def test_onnxruntime_kind_loads_the_int8_graph() -> None:
    from sd_triton.export.repository import engine_config

    settings = RepositorySettings(engines=dict.fromkeys(c.ENGINE_MODELS, "onnxruntime"), int8=("unet",))
    assert engine_config(c.UNET, settings).default_model_filename == INT8_FILE
    assert engine_config(c.VAE_DECODER, settings).default_model_filename == "model.onnx"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"int8": ("vae_decoder",)}, ["int8", "vae_decoder", "cannot be INT8"]),
        (
            {"int8": ("unet",), "engines": dict.fromkeys(c.ENGINE_MODELS, "tensorrt")},
            ["int8", "unet", "tensorrt"],
        ),
        (
            {
                "int8": ("unet",),
                "engines": dict.fromkeys(c.ENGINE_MODELS, "onnxruntime"),
                "ort_tensorrt": True,
            },
            ["TensorRT accelerator"],
        ),
    ],
)
def test_int8_settings_name_the_problem(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        RepositorySettings(**kwargs)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_parity_of_int8_against_fp32_and_a_broken_candidate_fails(int8_repo) -> None:
    repo, _ = int8_repo
    fp32 = LocalPipeline(repo)
    int8 = LocalPipeline(repo, model_files={"unet": INT8_FILE, "text_encoder": INT8_FILE})
    report = render_parity(fp32, int8, **PARAMS)
    assert [(i["prompt"], i["seed"]) for i in report.images] == list(GOLDEN)
    assert 0 < report.max_abs and report.min_psnr_db > 30  # close, not identical
    assert ParityGate().check(report) == []
    assert ParityGate(max_abs=0).check(report)  # a stricter gate refuses it, naming the limit

    def broken(prompt: str, seed: int, **params: object) -> SimpleNamespace:  # a candidate drawing noise
        shape = (1, params["height"], params["width"], 3)
        return SimpleNamespace(images=np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))

    failures = ParityGate().check(render_parity(fp32, broken, **PARAMS))
    assert len(failures) == len(GOLDEN) and all("PSNR" in f and "< 25.0 dB" in f for f in failures)
    image = np.zeros((2, 2, 3), np.uint8)
    assert psnr_db(image, image) == math.inf


@pytest.fixture(scope="module")
def int8_triton(int8_repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo, _ = int8_repo
    with triton_server(repo, tmp_path_factory.mktemp("int8-triton") / "triton.log") as triton:
        yield triton


@pytest.fixture(scope="module")
def int8_gateway(
    int8_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log_file = tmp_path_factory.mktemp("int8-gateway") / "gateway.log"
    with GatewayProcess(int8_triton.grpc_url, port=free_port(), log_file=log_file) as gateway:
        yield gateway


def test_engine_list_says_what_each_component_runs(int8_repo, int8_triton: TritonServer) -> None:
    repo, manifest = int8_repo
    rows = {row["component"]: row for row in engine_rows(repo, f"localhost:{int8_triton.http_port}")}
    assert set(rows) == set(c.ENGINE_MODELS)
    unet, vae = rows["unet"], rows["vae_decoder"]
    assert (unet["engine"], unet["precision"], unet["artifact"]) == (
        "python-ort",
        "int8",
        f"unet/1/{INT8_FILE}",
    )
    assert unet["sha256"] == manifest["components"]["unet"]["int8"]["artifacts"][f"unet/1/{INT8_FILE}"]
    assert (vae["precision"], vae["artifact"]) == ("fp32", "vae_decoder/1/model.onnx")
    assert (
        vae["sha256"]
        == manifest["components"]["vae_decoder"]["onnx"]["artifacts"]["vae_decoder/1/model.onnx"]
    )
    assert all(row["loaded_versions"] == ["1"] for row in rows.values())
    text = table(list(rows.values()))
    assert f"| unet | 1 | python-ort | int8 | unet/1/{INT8_FILE} | {unet['sha256'][:12]} | 1 | - |" in text


def test_triton_serves_the_int8_graphs_and_the_provenance_says_so(int8_repo, int8_gateway) -> None:
    repo, _ = int8_repo
    body = {"prompt": GOLDEN[0][0], "seed": GOLDEN[0][1], **PARAMS}
    response = httpx.post(f"{int8_gateway.url}/v1/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    components = result["provenance"]["components"]
    assert components["unet"]["precision"] == components["text_encoder"]["precision"] == "int8"
    assert components["vae_decoder"]["precision"] == "fp32"
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]["base64"]))))
    local = LocalPipeline(repo, model_files={"unet": INT8_FILE, "text_encoder": INT8_FILE})
    expected = local(GOLDEN[0][0], seed=GOLDEN[0][1], **PARAMS).images[0]
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 2


def test_engine_list_command(int8_repo, capsys: pytest.CaptureFixture[str]) -> None:
    from sd_triton.cli import main

    repo, _ = int8_repo
    assert main(["engine", "list", "--repo", str(repo), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["component"], r["precision"]) for r in rows] == [
        ("text_encoder", "int8"), ("unet", "int8"), ("vae_decoder", "fp32"), ("vae_encoder", "fp32"),
    ]  # fmt: skip
    assert all(r["loaded_versions"] is None for r in rows)  # no Triton asked
