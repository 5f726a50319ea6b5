"""Engine versions loaded in-process by kind (sd_triton/runtime/engine_runner.py): what the python engine
models and the inline UNet path run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from sd_triton import contract as c
from sd_triton.model_params import EngineParams
from sd_triton.runtime.engine_runner import load_runner
from sd_triton.runtime.trt_runner import unavailable_reason


def unet_feeds(repo, rows: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    graph = onnx.load(str(repo / "unet" / "1" / "model.onnx"), load_external_data=False).graph
    width = graph.input[2].type.tensor_type.shape.dim[2].dim_value
    return {
        "sample": rng.standard_normal((rows, 4, 8, 8), dtype=np.float32),
        "timestep": np.full((rows, 1), 500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, c.TOKEN_LENGTH, width), dtype=np.float32),
    }


@pytest.mark.parametrize("kind", ["python-ort", "onnxruntime"])
def test_onnx_kinds_run_the_version_file(exported, kind: str) -> None:
    repo = exported["repo"]
    runner = load_runner("unet", repo / "unet" / "1", kind, "model.onnx", EngineParams(intra_op_threads=1))
    feeds = unet_feeds(repo)
    out = runner.run(feeds)["noise_pred"]
    assert out.shape == feeds["sample"].shape and np.isfinite(out).all() and out.std() > 0
    # the settings reach ONNX Runtime: another thread count gives the same numbers
    again = load_runner("unet", repo / "unet" / "1", kind, "model.onnx", EngineParams(intra_op_threads=2))
    np.testing.assert_allclose(again.run(feeds)["noise_pred"], out, atol=1e-5)


def test_tensorrt_without_a_gpu_says_why(exported) -> None:
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: the plan path is exercised by perf/gpu/bench.py instead")
    with pytest.raises(RuntimeError, match="cannot run the TensorRT plan") as info:
        load_runner("unet", exported["repo"] / "unet" / "1", "tensorrt", "model.plan", EngineParams())
    assert reason in str(info.value)


def test_an_unknown_kind_is_named(exported) -> None:
    with pytest.raises(ValueError, match="engine kind 'openvino'"):
        load_runner("unet", exported["repo"] / "unet" / "1", "openvino", "model.xml", EngineParams())
