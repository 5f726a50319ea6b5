"""`sd-triton engine set` / `engine rollback` on files (no Triton here; tests/integration/test_engine_swap.py
swaps under load): new version folders, the parity gate's figures and refusals, reuse, history, and
the TensorRT checks that can run without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf.json_format import MessageToDict

from sd_triton.cli import main
from sd_triton.engine_record import EngineRecord
from sd_triton.export.checkpoint import sha256_tree
from sd_triton.export.engine_swap import EngineSwapError, GateSettings, SwapOptions, rollback, set_engine
from sd_triton.export.engines import engine_rows, tensorrt_problems
from sd_triton.export.manifest import Manifest
from sd_triton.export.parity import GOLDEN, ParityGate
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.quantize import INT8_FILE
from sd_triton.export.repository import CONFIG_FILE, parse, render
from sd_triton.export.tensorrt import mismatch
from sd_triton.served_model import EngineInfo, engine_info
from tests.conftest import WORK_DIR

GATE = GateSettings(steps=4)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("swap") / "model_repository"
    run_export(ExportOptions(model="tiny", repo=path, work_dir=WORK_DIR))
    return path


def live_version(repo: Path, name: str) -> int:
    """The live version as the manifest records it, checked against the version config.pbtxt serves."""
    served = list(parse((repo / name / CONFIG_FILE).read_text()).version_policy.specific.versions)
    live = Manifest.load(repo).live_version(name)
    assert served[-1:] in ([], [live]), f"{name}: config.pbtxt serves {served}, the manifest says {live}"
    return live


def _snapshot(repo: Path) -> dict[str, str]:
    return {
        "config": (repo / "unet" / CONFIG_FILE).read_text(),
        "manifest": (repo / "manifest.json").read_text(),
        "versions": ",".join(sorted(p.name for p in (repo / "unet").iterdir() if p.is_dir())),
    }


def test_the_export_records_version_1_of_every_engine(repo: Path) -> None:
    manifest = json.loads((repo / "manifest.json").read_text())
    for name in ("text_encoder", "unet", "vae_decoder"):
        record = EngineRecord.load(repo / name / "1")
        assert record is not None and (record.version, record.kind, record.precision) == (
            1,
            "python-ort",
            "fp32",
        )
        assert record.sha256 == manifest["components"][name]["onnx"]["artifacts"][f"{name}/1/model.onnx"]
        assert live_version(repo, name) == 1 and manifest["live"][name] == [1]


def test_set_int8_gates_then_makes_version_2_live(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "engine",
            "set",
            "unet",
            "python-ort",
            "--precision",
            "int8",
            "--repo",
            str(repo),
            "--gate-steps",
            "4",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    # the gate's figures, one row per golden image, then the verdict
    assert all(f"| {prompt} | {seed} |" in out for prompt, seed in GOLDEN) and "gate: PASSED" in out
    record = EngineRecord.load(repo / "unet" / "2")
    assert record is not None and (record.kind, record.precision, record.artifact) == (
        "python-ort",
        "int8",
        INT8_FILE,
    )
    assert record.parity is not None and record.parity["passed"] and record.parity["against_version"] == 1
    assert record.parity["min_psnr_db"] >= 25.0 and len(record.parity["images"]) == len(GOLDEN)
    config = parse((repo / "unet" / CONFIG_FILE).read_text())
    assert list(config.version_policy.specific.versions) == [2]
    assert config.parameters["model_file"].string_value == INT8_FILE
    assert config.parameters["artifact_sha256"].string_value == record.sha256
    assert (repo / "unet" / "2" / "model.py").is_file()
    assert json.loads((repo / "manifest.json").read_text())["live"]["unet"] == [1, 2]
    row = next(r for r in engine_rows(repo) if r["component"] == "unet")
    assert (row["version"], row["precision"], row["artifact"]) == (2, "int8", f"unet/2/{INT8_FILE}")
    assert row["parity"]["passed"] is True


def test_set_back_to_fp32_reuses_the_exported_graph(repo: Path) -> None:
    result = set_engine(repo, SwapOptions("unet", "python-ort", gate=GATE))
    assert result.switched and result.record is not None and result.record.version == 3
    # a hard link to version 1's graph, not a copy or a rebuild
    assert (repo / "unet" / "3" / "model.onnx").stat().st_ino == (
        repo / "unet" / "1" / "model.onnx"
    ).stat().st_ino
    # gated against the live INT8 version: the same pair of engines as version 2's gate, the same figures
    int8 = EngineRecord.load(repo / "unet" / "2")
    assert int8 is not None and int8.parity is not None and result.report is not None
    assert [i["psnr_db"] for i in result.report.images] == [i["psnr_db"] for i in int8.parity["images"]]


def test_rollback_returns_to_the_previous_version(repo: Path) -> None:
    record = rollback(repo, "unet")
    assert (record.version, record.precision) == (2, "int8")
    assert live_version(repo, "unet") == 2
    assert json.loads((repo / "manifest.json").read_text())["live"]["unet"] == [1, 2]
    assert parse((repo / "unet" / CONFIG_FILE).read_text()).parameters["model_file"].string_value == INT8_FILE


def _renamed_input(source: Path, target: Path) -> Path:
    model = onnx.load(str(source))
    model.graph.input[0].name = "latent"
    for node in model.graph.node:
        node.input[:] = ["latent" if name == "sample" else name for name in node.input]
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize("broken", ["corrupt", "wrong input names"])
def test_a_broken_candidate_is_refused_and_nothing_changes(repo: Path, tmp_path: Path, broken: str) -> None:
    if broken == "corrupt":
        artifact = tmp_path / "model.onnx"
        artifact.write_bytes((repo / "unet" / "1" / "model.onnx").read_bytes()[:5000])
    else:
        artifact = _renamed_input(repo / "unet" / "1" / "model.onnx", tmp_path / "model.onnx")
    before = _snapshot(repo)
    result = set_engine(repo, SwapOptions("unet", "python-ort", artifact=artifact, gate=GATE))
    assert not result.switched
    assert len(result.failures) == 1 and "the candidate does not run" in result.failures[0]
    if broken == "wrong input names":
        assert "sample" in result.failures[0] or "latent" in result.failures[0]
    assert _snapshot(repo) == before  # no version folder left, config and history untouched


def test_a_failed_gate_refuses_and_force_switches(repo: Path) -> None:
    strict = GateSettings(steps=4, gate=ParityGate(min_psnr_db=None, max_abs=0))
    before = _snapshot(repo)
    refused = set_engine(repo, SwapOptions("unet", "python-ort", gate=strict))  # fp32 vs the live int8
    assert not refused.switched and refused.failures
    assert all("max abs" in line for line in refused.failures) and _snapshot(repo) == before
    assert (
        main(
            [
                "engine",
                "set",
                "unet",
                "python-ort",
                "--repo",
                str(repo),
                "--max-abs",
                "0",
                "--gate-steps",
                "4",
            ]
        )
        == 1
    )
    forced = set_engine(repo, SwapOptions("unet", "python-ort", force=True, gate=strict))
    assert forced.switched and forced.record is not None
    assert forced.record.parity is not None
    assert (forced.record.parity["passed"], forced.record.parity["forced"]) == (False, True)
    assert rollback(repo, "unet").version == 2


def test_set_python_torch_links_the_checkpoint_weights(repo: Path) -> None:
    result = set_engine(repo, SwapOptions("unet", "python-torch", gate=GATE))
    assert result.switched and result.record is not None and result.report is not None
    record = result.record
    assert (record.kind, record.precision, record.artifact) == ("python-torch", "fp32", "unet")
    # the checkpoint's own weight files, hard-linked into the version folder
    source = Path(json.loads((repo / "manifest.json").read_text())["source"]["path"]) / "unet"
    linked = repo / "unet" / str(record.version) / "unet"
    files = [p for p in source.rglob("*") if p.is_file()]
    assert files and all((linked / f.relative_to(source)).stat().st_ino == f.stat().st_ino for f in files)
    assert record.sha256 == sha256_tree(repo / "unet" / str(record.version) / "unet")
    assert result.report.min_psnr_db >= 25.0  # against the live INT8 graph
    config = MessageToDict(parse((repo / "unet" / CONFIG_FILE).read_text()), preserving_proto_field_name=True)
    assert config["backend"] == "python" and config["parameters"]["model_file"]["string_value"] == "unet"
    assert engine_info(config) == EngineInfo("python-torch", "fp32", record.version, record.sha256)
    assert rollback(repo, "unet").version == 2


@pytest.mark.parametrize(
    ("component", "kind", "precision", "words"),
    [
        ("vae_decoder", "python-ort", "int8", ["precision", "vae_decoder", "int8"]),
        ("unet", "python-ort", "fp16", ["fp16", "TensorRT"]),
        ("unet", "tensorrt", "int8", ["int8", "tensorrt"]),
        ("unet", "python-torch", "int8", ["int8", "python-torch"]),
        ("vae", "python-ort", None, ["component", "vae"]),
    ],
)
def test_bad_changes_name_the_problem(
    repo: Path, component: str, kind: str, precision: str | None, words: list[str]
) -> None:
    before = _snapshot(repo)
    with pytest.raises(EngineSwapError) as error:
        set_engine(repo, SwapOptions(component, kind, precision, gate=GATE))
    assert all(w in str(error.value) for w in words), str(error.value)
    assert _snapshot(repo) == before


@pytest.mark.parametrize("precision", [None, "fp16"])  # fp32 (the export's) or FP16 for this component alone
def test_a_tensorrt_build_needs_a_gpu_and_says_so(repo: Path, precision: str | None) -> None:
    before = _snapshot(repo)
    with pytest.raises(
        EngineSwapError, match="cannot build a TensorRT plan here: (the tensorrt package|no CUDA GPU)"
    ):
        set_engine(repo, SwapOptions("unet", "tensorrt", precision, gate=GATE))
    assert _snapshot(repo) == before


def test_rollback_without_history_is_refused(repo: Path) -> None:
    with pytest.raises(EngineSwapError, match="no earlier version"):
        rollback(repo, "vae_decoder")


def test_a_plan_built_for_another_gpu_or_tensorrt_is_refused() -> None:
    build = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.3.0"}
    assert mismatch(build, dict(build)) is None
    assert mismatch(None, None) is None  # nothing recorded: nothing to check
    other_gpu = mismatch(build, {**build, "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    assert other_gpu is not None and "NVIDIA H100 80GB HBM3" in other_gpu and "NVIDIA L4" in other_gpu
    other_trt = mismatch(build, {**build, "tensorrt": "10.5.0"})
    assert other_trt is not None and "TensorRT '10.3.0'" in other_trt and "10.5.0" in other_trt
    no_gpu = mismatch(build, None)
    assert no_gpu is not None and "no GPU here" in no_gpu


def test_sd_triton_triton_refuses_a_mismatched_plan(tmp_path: Path, repo: Path) -> None:
    # a repository whose live UNet is a TensorRT plan built on an H100 with TensorRT 10.3
    copy = tmp_path / "trt_repo"
    for name in ("text_encoder", "unet", "vae_decoder"):
        (copy / name / "1").mkdir(parents=True)
        (copy / name / CONFIG_FILE).write_text((repo / name / CONFIG_FILE).read_text())
        (copy / name / "1" / "engine.json").write_bytes((repo / name / "1" / "engine.json").read_bytes())
    (copy / "unet" / "2").mkdir()
    config = parse((repo / "unet" / CONFIG_FILE).read_text())
    del config.version_policy.specific.versions[:]
    config.version_policy.specific.versions.append(2)
    (copy / "unet" / CONFIG_FILE).write_text(render(config))
    manifest = Manifest.load(repo)
    manifest.live["unet"] = [1, 2]
    manifest.save(copy)
    build = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.3.0"}
    plan = EngineRecord(
        "unet", 2, "tensorrt", "fp16", "model.plan", "ab" * 32, "2026-01-01T00:00:00+00:00", build=build
    )
    plan.save(copy / "unet" / "2")
    assert tensorrt_problems(copy, target=dict(build)) == []
    problems = tensorrt_problems(copy, target={**build, "tensorrt": "10.5.0"})
    assert len(problems) == 1 and problems[0].startswith("unet/2/model.plan: the plan was built for TensorRT")
    unbuilt = EngineRecord("unet", 2, "tensorrt", "fp16", "model.plan", "", "2026-01-01T00:00:00+00:00")
    unbuilt.save(copy / "unet" / "2")
    assert "never built" in tensorrt_problems(copy, target=dict(build))[0]
    # on this machine (no GPU): `sd-triton triton` does not start Triton on it, and the containers'
    # entry point check (`sd-triton engine check`) stops there too; the exported repository passes it
    assert main(["triton", "--repo", str(copy)]) == 2
    assert main(["engine", "check", "--repo", str(copy)]) == 2
    assert main(["engine", "check", "--repo", str(repo)]) == 0
