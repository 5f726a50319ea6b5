"""export/artifacts.py: one builder per engine kind, one reuse rule for the export and `engine set`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sd_triton.engine_record import EngineRecord
from sd_triton.export import tensorrt
from sd_triton.export.artifacts import BUILDERS, ArtifactSource, ArtifactUnavailable, make_artifact
from sd_triton.export.checkpoint import sha256_file
from sd_triton.export.components import Profile
from sd_triton.export.quantize import INT8_FILE


def _graph(path: Path, scale: float = 64) -> Path:
    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8) / scale, "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, ArtifactSource]:
    model_dir = tmp_path / "unet"
    onnx_path = _graph(model_dir / "1" / "model.onnx")
    weights = tmp_path / "checkpoint" / "unet"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    return model_dir, ArtifactSource(
        component="unet", onnx=onnx_path, onnx_sha256=sha256_file(onnx_path), weights=weights
    )


def _record(model_dir: Path, version: int, kind: str, precision: str, artifact: str, made) -> None:
    (model_dir / str(version)).mkdir(exist_ok=True)
    EngineRecord(
        "unet", version, kind, precision, artifact, made.sha256, "2026-01-01T00:00:00+00:00",
        artifact_key=made.key,
    ).save(model_dir / str(version))  # fmt: skip


def test_an_artifact_with_the_same_key_is_linked_not_built_again(model) -> None:
    model_dir, source = model
    first = make_artifact(model_dir, 1, "python-ort", "int8", INT8_FILE, source)
    assert first.reused_from is None and json.loads(first.key)["precision"] == "int8"
    _record(model_dir, 1, "python-ort", "int8", INT8_FILE, first)
    (model_dir / "2").mkdir()
    second = make_artifact(model_dir, 2, "onnxruntime", "int8", INT8_FILE, source)
    assert (second.reused_from, second.sha256, second.key) == (1, first.sha256, first.key)
    assert (model_dir / "2" / INT8_FILE).stat().st_ino == (model_dir / "1" / INT8_FILE).stat().st_ino
    # another precision is another key: the FP32 graph is the exported one, linked
    fp32 = make_artifact(model_dir, 2, "onnxruntime", "fp32", "model.onnx", source)
    assert fp32.key != first.key and fp32.reused_from is None
    assert (model_dir / "2" / "model.onnx").stat().st_ino == source.onnx.stat().st_ino


def test_a_damaged_artifact_is_made_again(model) -> None:
    model_dir, source = model
    first = make_artifact(model_dir, 1, "python-ort", "int8", INT8_FILE, source)
    _record(model_dir, 1, "python-ort", "int8", INT8_FILE, first)
    (model_dir / "1" / INT8_FILE).write_bytes(b"damaged")
    again = make_artifact(model_dir, 1, "python-ort", "int8", INT8_FILE, source)
    assert again.reused_from is None and again.sha256 == first.sha256
    # a changed source is a changed key: nothing reused
    _graph(source.onnx, scale=32)
    source = replace(source, onnx_sha256=sha256_file(source.onnx))
    changed = make_artifact(model_dir, 1, "python-ort", "int8", INT8_FILE, source)
    assert changed.key != first.key


def test_python_torch_links_the_weights_keyed_by_their_hash(model) -> None:
    model_dir, source = model
    made = make_artifact(model_dir, 1, "python-torch", "fp32", "unet", source)
    assert (model_dir / "1" / "unet" / "config.json").read_text() == "{}"
    (source.weights / "config.json").write_text('{"changed": 1}')
    (source.weights / "extra.json").write_text("{}")
    _record(model_dir, 1, "python-torch", "fp32", "unet", made)
    again = make_artifact(model_dir, 1, "python-torch", "fp32", "unet", source)
    assert again.key != made.key and (model_dir / "1" / "unet" / "extra.json").is_file()


@pytest.mark.skipif(tensorrt.unavailable_reason() is None, reason="a GPU with TensorRT builds the plan")
def test_a_tensorrt_plan_is_keyed_by_profile_and_gpu_and_refused_without_one(model) -> None:
    model_dir, source = model
    profile = Profile({"x": ((1, 8), (1, 8), (2, 8))})
    planned = replace(source, profile=profile, work_dir=model_dir)
    with pytest.raises(ArtifactUnavailable, match="unet: cannot build a TensorRT plan here: "):
        make_artifact(model_dir, 1, "tensorrt", "fp16", "model.plan", planned)
    key = BUILDERS["tensorrt"].key(planned, "fp16")
    assert key["profile"] == profile.shapes and key["target"] is None and key["precision"] == "fp16"
    refittable = BUILDERS["tensorrt"].key(replace(planned, refit=True), "fp16")
    assert "refit" not in key and refittable == {**key, "refit": True}  # neither plan stands for the other
