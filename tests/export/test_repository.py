"""Repositories for the onnxruntime and tensorrt engine kinds (they cannot load on the CPU
server here, so their configs and profiles are checked by these tests) and settings validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.checkpoint import Checkpoint
from export.components import COMPONENTS
from export.pipeline import ExportOptions, run_export
from export.repository import CONFIG_FILE, RepositorySettings, parse
from sd_triton import contract as c
from sd_triton.cli import parse_engines
from tests.conftest import WORK_DIR
from tests.export.test_contract import check_config_against_contract


def load_config(repo: Path, name: str) -> mc.ModelConfig:
    return parse((repo / name / CONFIG_FILE).read_text())


@pytest.fixture(scope="module")
def tensorrt_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("trt") / "repo"
    settings = RepositorySettings(engines=dict.fromkeys(c.ENGINE_MODELS, "tensorrt"), precision="fp16")
    return repo, run_export(ExportOptions(model="tiny", repo=repo, settings=settings, work_dir=WORK_DIR))


@pytest.fixture(scope="module")
def onnxruntime_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("ort") / "repo"
    settings = RepositorySettings(engines=dict.fromkeys(c.ENGINE_MODELS, "onnxruntime"), ort_tensorrt=True)
    return repo, run_export(ExportOptions(model="tiny", repo=repo, settings=settings, work_dir=WORK_DIR))


def check_engine_common(config: mc.ModelConfig, name: str, expected_batch: int) -> None:
    check_config_against_contract(config, c.MODELS[name])
    assert config.max_batch_size == expected_batch
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert not config.backend


@pytest.mark.parametrize("name", c.ENGINE_MODELS)
def test_tensorrt_config_and_profile(tensorrt_repo, tiny_checkpoint, name: str) -> None:
    repo, manifest = tensorrt_repo
    limits = c.Limits()
    profile = COMPONENTS[name].profile(Checkpoint.open(tiny_checkpoint).dims, limits)
    max_batch = max(shapes[2][0] for shapes in profile.shapes.values())
    config = load_config(repo, name)
    check_engine_common(config, name, max_batch)
    assert config.platform == "tensorrt_plan"
    assert config.default_model_filename == "model.plan"
    # the profile covers every input, in the contract's rank, min <= opt <= max
    spec = c.MODELS[name]
    assert set(profile.shapes) == {t.name for t in spec.inputs}
    for tensor in spec.inputs:
        low, opt, high = profile.shapes[tensor.name]
        assert len(low) == len(opt) == len(high) == 1 + len(tensor.dims), tensor.name
        assert all(a <= b <= d for a, b, d in zip(low, opt, high, strict=True)), tensor.name
        for axis, fixed in enumerate(tensor.dims, start=1):
            if fixed != -1:
                assert low[axis] == opt[axis] == high[axis] == fixed, tensor.name
    # the batch range reaches what a request can send
    expected = limits.max_num_images if name == "vae_decoder" else limits.max_unet_batch
    assert max_batch == expected
    if name != "text_encoder":
        assert profile.shapes[spec.inputs[0].name][2][2] * 8 == limits.max_side
    # no GPU here: the plan is recorded as missing, with the reason, and the ONNX is in place
    entry = manifest["components"][name]
    assert entry["engine"] == "tensorrt" and entry["precision"] == "fp16"
    assert "tensorrt" in entry["plan"]["missing"] or "GPU" in entry["plan"]["missing"]
    assert (repo / name / "1" / "model.onnx").is_file()


@pytest.mark.parametrize("name", c.ENGINE_MODELS)
def test_onnxruntime_config(onnxruntime_repo, name: str) -> None:
    repo, manifest = onnxruntime_repo
    config = load_config(repo, name)
    check_engine_common(config, name, manifest_max_batch(name))
    assert config.platform == "onnxruntime_onnx"
    assert config.default_model_filename == "model.onnx"
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP32"
    assert (repo / name / "1" / "model.onnx").is_file()
    assert manifest["components"][name]["engine"] == "onnxruntime"


def manifest_max_batch(name: str) -> int:
    limits = c.Limits()
    return limits.max_num_images if name == "vae_decoder" else limits.max_unet_batch


def test_pipeline_steps_identical_across_engine_kinds(tensorrt_repo, onnxruntime_repo, exported) -> None:
    for name in (c.TXT2IMG.name, c.TOKENIZER.name, c.DENOISE.name, c.POSTPROCESS.name):
        texts = {
            (repo / name / CONFIG_FILE).read_text()
            for repo in (tensorrt_repo[0], onnxruntime_repo[0], exported["repo"])
        }
        assert len(texts) == 1, name


def test_python_ort_config(exported) -> None:
    for name in c.ENGINE_MODELS:
        config = load_config(exported["repo"], name)
        assert config.backend == "python"
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
        assert config.parameters["device"].string_value == "auto"
        assert config.max_batch_size == manifest_max_batch(name)


def test_mixed_engines_from_the_command_line() -> None:
    engines = parse_engines("unet=tensorrt,vae_decoder=onnxruntime")
    assert engines == {"text_encoder": "python-ort", "unet": "tensorrt", "vae_decoder": "onnxruntime"}
    assert parse_engines("onnxruntime") == dict.fromkeys(c.ENGINE_MODELS, "onnxruntime")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"precision": "fp16"}, ["precision=fp16", "engines[text_encoder]", "python-ort"]),
        ({"precision": "bf16"}, ["precision", "'bf16'"]),
        (
            {"engines": {**dict.fromkeys(c.ENGINE_MODELS, "python-ort"), "unet": "openvino"}},
            ["engines[unet]", "'openvino'"],
        ),
        ({"engines": {"unet": "tensorrt"}}, ["engines", "text_encoder", "vae_decoder"]),
        (
            {"engines": {**dict.fromkeys(c.ENGINE_MODELS, "python-ort"), "vae": "tensorrt"}},
            ["engines", "'vae'"],
        ),
        ({"denoise_instances": 0}, ["denoise_instances", "got 0"]),
    ],
)
def test_settings_validation_names_the_field(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        RepositorySettings(**kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)
