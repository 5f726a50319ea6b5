"""Every config.pbtxt and every ONNX graph agree with the contract module."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from sd_triton import contract as c
from sd_triton.export.checkpoint import Checkpoint
from sd_triton.export.components import COMPONENTS
from sd_triton.export.repository import ARTIFACT_SHA256, CONFIG_FILE, MODEL_PY, ensemble_steps, parse, render

ROOT = Path(__file__).resolve().parents[2]
SOURCE_REPO = ROOT / "model_repository"
ONNX_TYPES = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_INT32": onnx.TensorProto.INT32}


def check_config_against_contract(config, spec: c.ModelSpec) -> None:
    assert config.name == spec.name
    assert (config.max_batch_size > 0) == spec.batching, (
        f"{spec.name}: max_batch_size {config.max_batch_size}"
    )
    for kind, tensors, specs in (
        ("input", config.input, spec.inputs),
        ("output", config.output, spec.outputs),
    ):
        assert [t.name for t in tensors] == [s.name for s in specs], f"{spec.name} {kind} names"
        for tensor, tspec in zip(tensors, specs, strict=True):
            where = f"{spec.name}.{kind}.{tspec.name}"
            assert mc.DataType.Name(tensor.data_type) == tspec.dtype, where
            assert tuple(tensor.dims) == tspec.dims, where
            if kind == "input":
                assert tensor.optional == tspec.optional, where


@pytest.mark.parametrize("which", ["committed", "exported"])
@pytest.mark.parametrize("name", list(c.MODELS))
def test_config_matches_contract(exported, which: str, name: str) -> None:
    repo = SOURCE_REPO if which == "committed" else exported["repo"]
    config = parse((repo / name / CONFIG_FILE).read_text())
    check_config_against_contract(config, c.MODELS[name])


def _machine_independent(config_text: str) -> str:
    """The config without the artifact's sha256: the same UNet exported on an AMD and an Intel CPU gave
    ONNX files with other bytes, so no committed file may carry one."""
    config = parse(config_text)
    if ARTIFACT_SHA256 in config.parameters:
        del config.parameters[ARTIFACT_SHA256]
    return render(config)


def test_committed_configs_are_what_export_writes(demo_repo: Path) -> None:
    """The configs and model.py files in git are what `make export` (the demo model, python-ort, default
    limits) writes, byte for byte but the artifact hashes: nobody edited one by hand, and the test passes
    on any machine."""
    for name in c.MODELS:
        committed = (SOURCE_REPO / name / CONFIG_FILE).read_text()
        assert ARTIFACT_SHA256 not in committed, f"{name}: a committed config holds an artifact hash"
        assert committed == _machine_independent((demo_repo / name / CONFIG_FILE).read_text()), name
    written = sorted(p.relative_to(demo_repo) for p in demo_repo.glob(f"*/1/{MODEL_PY}"))
    assert written == sorted(p.relative_to(SOURCE_REPO) for p in SOURCE_REPO.glob(f"*/1/{MODEL_PY}"))
    for path in written:
        assert (SOURCE_REPO / path).read_text() == (demo_repo / path).read_text(), path


def test_every_python_model_has_a_model_py(demo_repo: Path) -> None:
    for name in c.MODELS:
        config = parse((demo_repo / name / CONFIG_FILE).read_text())
        if config.backend == "python":
            assert (demo_repo / name / "1" / MODEL_PY).is_file(), name


@pytest.mark.parametrize("architecture", c.ARCHITECTURES)
@pytest.mark.parametrize("unet_path", ["bls", "inline"])
def test_ensemble_wiring_is_complete(unet_path: str, architecture: str) -> None:
    """Each step gets every required input of its model, from an ensemble input or an earlier
    step's output; every ensemble output is produced."""
    available = {t.name for t in c.TXT2IMG.inputs}
    optional = {t.name for t in c.TXT2IMG.inputs if t.optional}
    for model, inputs, outputs in ensemble_steps(unet_path, architecture):
        spec = c.models(architecture)[model]
        required = {t.name for t in spec.inputs if not t.optional}
        assert required <= set(inputs), f"{model} misses {required - set(inputs)}"
        assert set(inputs) <= {t.name for t in spec.inputs}, model
        for model_input, tensor in inputs.items():
            assert tensor in available, f"{model}.{model_input} <- {tensor}: not produced before"
            if tensor in optional:
                assert spec.input(model_input).optional, f"{model}.{model_input} must be optional"
        assert set(outputs) <= {t.name for t in spec.outputs}, model
        available |= set(outputs.values())
    assert {t.name for t in c.TXT2IMG.outputs} <= available


def _check_dims(where: str, actual: list[int | str], expected: tuple[int, ...]) -> None:
    """`actual` includes the batch axis; a str is a symbolic (dynamic) axis."""
    assert len(actual) == 1 + len(expected), f"{where}: rank {len(actual)}"
    for axis, (got, want) in enumerate(zip(actual[1:], expected, strict=True), start=1):
        if want != -1:
            assert got == want, f"{where}: axis {axis} is {got}, contract says {want}"


@pytest.mark.parametrize("name", c.ENGINE_MODELS)
def test_onnx_graph_matches_contract(exported, tiny_checkpoint, name: str) -> None:
    path = exported["repo"] / name / "1" / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    spec = c.MODELS[name]
    for values, specs in ((graph.input, spec.inputs), (graph.output, spec.outputs)):
        assert [v.name for v in values] == [s.name for s in specs]
        for value, tspec in zip(values, specs, strict=True):
            assert value.type.tensor_type.elem_type == ONNX_TYPES[tspec.dtype], tspec.name
    for value, tspec in zip(graph.input, spec.inputs, strict=True):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert isinstance(dims[0], str), f"{tspec.name}: the batch axis must be dynamic"
        _check_dims(f"{name} input {tspec.name}", dims, tspec.dims)
    # output shapes are symbolic in the graph: check them on a real run
    component = COMPONENTS[name]
    dims = Checkpoint.open(tiny_checkpoint).dims
    inputs = component.sample_inputs(dims, batch=3, latent_hw=(5, 7))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
    for array, tspec in zip(session.run(None, feeds), spec.outputs, strict=True):
        assert array.shape[0] == 3, tspec.name
        _check_dims(f"{name} output {tspec.name}", list(array.shape), tspec.dims)
