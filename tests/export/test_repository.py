"""Repositories for the onnxruntime and tensorrt engine kinds (they cannot load on the CPU
server here, so their configs and profiles are checked by these tests) and settings validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from sd_triton import contract as c
from sd_triton.export.checkpoint import Checkpoint
from sd_triton.export.cli import parse_engines
from sd_triton.export.components import COMPONENTS
from sd_triton.export.pipeline import ExportOptions, engine_profile, repository_settings, run_export
from sd_triton.export.repository import CONFIG_FILE, RepositorySettings, all_configs, parse, render
from sd_triton.served_model import ServedModel
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
    # continuous batching (the default) sends the UNet whole batches: no second batcher in the way
    assert config.HasField("dynamic_batching") == (name != c.UNET.name)
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # text encoder, VAE: no window to wait
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert not config.backend


@pytest.mark.parametrize("name", c.ENGINE_MODELS)
def test_tensorrt_config_and_profile(tensorrt_repo, tiny_checkpoint, name: str) -> None:
    repo, manifest = tensorrt_repo
    limits = c.Limits()
    checkpoint = Checkpoint.open(tiny_checkpoint)
    profile = engine_profile(COMPONENTS[name], checkpoint, RepositorySettings(), limits)
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
    # the batch range reaches what a request can send (the UNet: what the batcher sends)
    assert max_batch == manifest_max_batch(name)
    assert profile.shapes == {
        k: (lo, opt, (max_batch, *hi[1:]))
        for k, (lo, opt, hi) in COMPONENTS[name].profile(checkpoint.dims, limits).shapes.items()
    }
    if name != "text_encoder":  # latents (8x down) or, for the VAE encoder, pixels
        scale = 1 if name == c.VAE_ENCODER.name else 8
        assert profile.shapes[spec.inputs[0].name][2][2] * scale == limits.max_side
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
    if name == c.UNET.name:
        return max(limits.max_unet_batch, RepositorySettings().max_batch_rows)
    if name == c.TEXT_ENCODER.name:  # a row per prompt chunk
        return limits.max_unet_batch * limits.max_prompt_chunks
    return (
        limits.max_num_images if name in (c.VAE_DECODER.name, c.VAE_ENCODER.name) else limits.max_unet_batch
    )


def mode_configs(tiny_checkpoint: Path, **kwargs) -> dict[str, mc.ModelConfig]:
    checkpoint = Checkpoint.open(tiny_checkpoint)
    settings = repository_settings(RepositorySettings(**kwargs), checkpoint, c.Limits())
    return all_configs(settings, ServedModel("tiny", 64, 64, 8, c.Limits()))


def test_batching_none_gives_every_unet_call_one_request(tiny_checkpoint) -> None:
    configs = mode_configs(tiny_checkpoint, batching="none", denoise_instances=5)
    denoise = configs[c.DENOISE.name]
    assert denoise.instance_group[0].count == 5
    assert denoise.parameters["batching"].string_value == "none"
    for name in c.ENGINE_MODELS:
        assert not configs[name].HasField("dynamic_batching"), name
    assert configs[c.UNET.name].max_batch_size == c.Limits().max_unet_batch


def test_batching_dynamic_lets_triton_merge_the_loops_unet_calls(tiny_checkpoint) -> None:
    configs = mode_configs(tiny_checkpoint, batching="dynamic", denoise_instances=8, max_queue_delay_us=1500)
    assert configs[c.DENOISE.name].instance_group[0].count == 8
    for name in c.ENGINE_MODELS:
        assert configs[name].dynamic_batching.max_queue_delay_microseconds == 1500, name


def test_batching_continuous_runs_one_batcher(tiny_checkpoint) -> None:
    configs = mode_configs(tiny_checkpoint, batching="continuous", max_batch_rows=32, max_wait_us=700)
    denoise = configs[c.DENOISE.name]
    assert denoise.instance_group[0].count == 1  # one scheduling loop sees every request
    assert {k: v.string_value for k, v in denoise.parameters.items()} == {
        "unet_model": "unet",
        "unet_path": "inline",  # auto: a continuous loop runs the UNet in its own process
        "batching": "continuous",
        "max_batch": "32",
        "max_wait_us": "700",
    }  # sd_triton.model_params.DenoiseParams
    unet = configs[c.UNET.name]
    assert unet.max_batch_size == 32 and not unet.HasField("dynamic_batching")
    # the text encoder and the VAE still batch requests that join or finish in the same iteration, without
    # waiting for more
    for name in (c.TEXT_ENCODER.name, c.VAE_DECODER.name):
        assert configs[name].HasField("dynamic_batching"), name
        assert configs[name].dynamic_batching.max_queue_delay_microseconds == 0, name
        assert "dynamic_batching {\n}" in render(configs[name]), name


@pytest.mark.parametrize("batching", ["none", "dynamic", "continuous"])
def test_the_streaming_model_is_decoupled_with_its_own_batcher(tiny_checkpoint, batching: str) -> None:
    configs = mode_configs(tiny_checkpoint, batching=batching, max_batch_rows=24, max_wait_us=300)
    stream = configs[c.TXT2IMG_STREAM.name]
    assert stream.model_transaction_policy.decoupled  # one response per step, then the images
    assert stream.backend == "python" and stream.instance_group[0].count == 1
    assert {k: v.string_value for k, v in stream.parameters.items()} == {
        "unet_model": "unet",
        "unet_path": "inline",  # auto: the stream's loop batches continuously in every mode
        "max_batch": "24",
        "max_wait_us": "300",
    }  # sd_triton.model_params.BatchingParams


@pytest.mark.parametrize(
    ("batching", "unet_path", "denoise_path"),
    [("continuous", "auto", "inline"), ("dynamic", "auto", "bls"), ("none", "auto", "bls"),
     ("continuous", "bls", "bls"), ("none", "inline", "inline")],
)  # fmt: skip
def test_the_unet_path_of_each_loop(
    tiny_checkpoint, batching: str, unet_path: str, denoise_path: str
) -> None:
    configs = mode_configs(tiny_checkpoint, batching=batching, unet_path=unet_path)
    assert configs[c.DENOISE.name].parameters["unet_path"].string_value == denoise_path
    stream_path = "bls" if unet_path == "bls" else "inline"
    assert configs[c.TXT2IMG_STREAM.name].parameters["unet_path"].string_value == stream_path


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
    assert engines == {
        "text_encoder": "python-ort",
        "unet": "tensorrt",
        "vae_decoder": "onnxruntime",
        "vae_encoder": "python-ort",
    }
    assert parse_engines("onnxruntime") == dict.fromkeys(c.ENGINE_MODELS, "onnxruntime")


def test_tensorrt_refit_covers_the_components_adapters_change() -> None:
    """`--tensorrt-refit`: the UNet's and the text encoder's plans are built refittable, the VAE's not."""
    from sd_triton.cli import build_parser
    from sd_triton.cliargs import from_args

    line = ["export", "--model", "tiny", "--engine", "tensorrt", "--tensorrt-refit"]
    args = build_parser().parse_args(line)
    settings = from_args(RepositorySettings, args, engines=parse_engines(args.engine))
    assert sorted(m for m in c.ENGINE_MODELS if settings.refit(m)) == ["text_encoder", "unet"]
    assert not any(RepositorySettings().refit(m) for m in c.ENGINE_MODELS)


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
        ({"batching": "static"}, ["batching", "continuous", "'static'"]),
        ({"max_batch_rows": 0}, ["max_batch_rows", "got 0"]),
        ({"max_wait_us": -5}, ["max_wait_us", "got -5"]),
        ({"unet_path": "grpc"}, ["unet_path", "inline", "'grpc'"]),
        ({"unet_path": "inline", "batching": "dynamic"}, ["unet_path=inline", "batching=dynamic", "bls"]),
        ({"fp16": ("unet",)}, ["fp16 needs TensorRT", "engines[unet]", "python-ort"]),
        (
            {
                "engines": {**dict.fromkeys(c.ENGINE_MODELS, "onnxruntime")},
                "int8": ("unet",),
                "fp16": ("unet",),
            },
            ["fp16 needs TensorRT", "engines[unet]"],
        ),
        (
            {
                "engines": {**dict.fromkeys(c.ENGINE_MODELS, "onnxruntime")},
                "ort_tensorrt": True,
                "fp16": ("unet",),
                "int8": ("unet",),
            },
            ["int8", "unet"],
        ),
    ],
)
def test_settings_validation_names_the_field(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        RepositorySettings(**kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_python_torch_export_links_the_weights_and_records_them(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from sd_triton.engine_record import EngineRecord
    from sd_triton.export.checkpoint import sha256_tree

    repo = tmp_path / "repo"
    settings = RepositorySettings(
        engines={**dict.fromkeys(c.ENGINE_MODELS, "python-ort"), "vae_decoder": "python-torch"}
    )
    run_export(ExportOptions(model="tiny", repo=repo, settings=settings, work_dir=WORK_DIR))
    config = load_config(repo, "vae_decoder")
    check_config_against_contract(config, c.VAE_DECODER)
    assert config.backend == "python" and list(config.version_policy.specific.versions) == [1]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert (params["engine"], params["model_file"], params["precision"]) == ("python-torch", "vae", "fp32")
    weights = repo / "vae_decoder" / "1" / "vae"
    assert sorted(p.name for p in weights.iterdir()) == sorted(
        p.name for p in (tiny_checkpoint / "vae").iterdir()
    )
    record = EngineRecord.load(repo / "vae_decoder" / "1")
    assert record is not None and (record.kind, record.artifact) == ("python-torch", "vae")
    assert record.sha256 == sha256_tree(weights) == params["artifact_sha256"]
    # idempotent: the same export again leaves the record as it was
    run_export(ExportOptions(model="tiny", repo=repo, settings=settings, work_dir=WORK_DIR))
    assert EngineRecord.load(repo / "vae_decoder" / "1") == record


def test_one_component_fp16_in_an_fp32_repository(tiny_checkpoint: Path) -> None:
    engines = {**dict.fromkeys(c.ENGINE_MODELS, "python-ort"), "unet": "tensorrt"}
    settings = RepositorySettings(engines=engines, fp16=("unet",))  # type: ignore[arg-type]
    assert [settings.precision_of(name) for name in c.ENGINE_MODELS] == ["fp32", "fp16", "fp32", "fp32"]
    configs = all_configs(settings, ServedModel("tiny", 64, 64, 8))
    assert {name: configs[name].parameters["precision"].string_value for name in c.ENGINE_MODELS} == {
        "text_encoder": "fp32", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32",
    }  # fmt: skip
    assert (
        configs["unet"].platform == "tensorrt_plan" and configs["unet"].default_model_filename == "model.plan"
    )
