"""The export is idempotent: same inputs reuse every artifact; a changed checkpoint re-exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_triton.cli import main
from sd_triton.export.checkpoint import Checkpoint, sha256_file
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import MANIFEST
from sd_triton.pipeline_config import PipelineConfig
from tests.conftest import WORK_DIR


def onnx_state(repo: Path) -> dict[str, tuple[float, str]]:
    return {
        name: (
            (repo / name / "1" / "model.onnx").stat().st_mtime_ns,
            sha256_file(repo / name / "1" / "model.onnx"),
        )
        for name in ("text_encoder", "unet", "vae_decoder")
    }


def test_rerun_reuses_and_changed_checkpoint_reexports(tiny_checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = run_export(ExportOptions(model=str(tiny_checkpoint), repo=repo, work_dir=WORK_DIR))
    before = onnx_state(repo)

    # 1. the same inputs: nothing is exported again, the manifest keeps its figures
    second = run_export(ExportOptions(model=str(tiny_checkpoint), repo=repo, work_dir=WORK_DIR))
    assert onnx_state(repo) == before
    assert second["components"] == first["components"]

    # 2. new UNet weights: the UNet is re-exported, the others reused
    changed = tmp_path / "changed"
    shutil.copytree(tiny_checkpoint, changed)
    unet = UNet2DConditionModel.from_pretrained(changed / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(changed / "unet")
    third = run_export(ExportOptions(model=str(changed), repo=repo, work_dir=WORK_DIR))
    after = onnx_state(repo)
    assert after["unet"] != before["unet"]
    assert after["text_encoder"] == before["text_encoder"]
    assert after["vae_decoder"] == before["vae_decoder"]
    assert (
        third["components"]["unet"]["onnx"]["source_sha256"]
        != first["components"]["unet"]["onnx"]["source_sha256"]
    )

    # 3. a hand-damaged artifact is noticed and rebuilt
    (repo / "vae_decoder" / "1" / "model.onnx").write_bytes(b"broken")
    run_export(ExportOptions(model=str(changed), repo=repo, work_dir=WORK_DIR))
    assert onnx_state(repo)["vae_decoder"][1] == before["vae_decoder"][1]


def test_manifest_records_hashes_engines_and_diffs(exported: dict) -> None:
    repo = exported["repo"]
    manifest = json.loads((repo / MANIFEST).read_text())
    assert manifest["source"]["model"] == "tiny"
    for name in ("text_encoder", "unet", "vae_decoder"):
        entry = manifest["components"][name]
        assert entry["engine"] == "python-ort" and entry["precision"] == "fp32"
        assert 0 <= entry["onnx"]["max_abs_diff_vs_pytorch"] < 1e-3
        for rel, digest in entry["onnx"]["artifacts"].items():
            assert sha256_file(repo / rel) == digest
    tokenizer_files = manifest["components"]["tokenizer"]["artifacts"]
    assert any(rel.endswith(("tokenizer.json", "vocab.json")) for rel in tokenizer_files)
    pipeline = PipelineConfig.load(repo / "denoise" / "1" / "pipeline.json")
    assert pipeline.vae_scale_factor == 8 and pipeline.latent_channels == 4
    assert pipeline.scheduler_config["prediction_type"] == "epsilon"


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["export", "--model", str(tmp_path / "nowhere"), "--repo", str(tmp_path / "repo")])
    assert code == 2
    assert "not a diffusers checkpoint folder" in caplog.text and "nowhere" in caplog.text


def test_a_scheduler_class_the_loop_cannot_run_is_refused_first(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint that names a scheduler this loop cannot run (a flow-matching one) is refused before
    any ONNX work, naming the file, the class and what runs."""
    folder = tmp_path / "flow"
    shutil.copytree(tiny_checkpoint, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "_class_name": "FlowMatchEulerDiscreteScheduler"})
    )
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    )
    code = main(["export", "--model", str(folder), "--repo", str(tmp_path / "repo")])
    assert code == 2
    assert "scheduler_config.json" in caplog.text and "FlowMatchEulerDiscreteScheduler" in caplog.text
    assert "EulerDiscreteScheduler" in caplog.text  # what it runs instead
    assert not (tmp_path / "repo" / "unet" / "1" / "model.onnx").exists()


def test_model_index_names_the_default_scheduler_class(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """diffusers builds the scheduler class model_index.json names; the export reads the same."""
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_checkpoint, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "scheduler": ["diffusers", "DDIMScheduler"]})
    )
    assert Checkpoint.open(folder).scheduler_config["_class_name"] == "DDIMScheduler"
    assert Checkpoint.open(tiny_checkpoint).scheduler_config["_class_name"] == "PNDMScheduler"
