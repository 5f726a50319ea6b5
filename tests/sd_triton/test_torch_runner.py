"""The python-torch engine kind's runner: the component's PyTorch module, fed and answered by contract
names like the ONNX Runtime runner, gives the same outputs as the exported graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sd_triton.export.checkpoint import Checkpoint
from sd_triton.export.components import COMPONENTS
from sd_triton.runtime.ort_runner import OrtRunner
from sd_triton.runtime.torch_runner import TorchRunner, choose_device


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_torch_runner_matches_the_exported_graph(exported: dict, tiny_checkpoint: Path, name: str) -> None:
    component = COMPONENTS[name]
    dims = Checkpoint.open(tiny_checkpoint).dims
    inputs = component.sample_inputs(dims, batch=2, latent_hw=(8, 6))
    feeds = {n: t.numpy() for n, t in zip(component.input_names, inputs, strict=True)}
    torch_out = TorchRunner(name, tiny_checkpoint, device="cpu").run(feeds)
    onnx_out = OrtRunner(exported["repo"] / name / "1" / "model.onnx", device="cpu").run(feeds)
    (output,) = component.output_names
    assert torch_out[output].shape == onnx_out[output].shape
    assert np.abs(torch_out[output] - onnx_out[output]).max() < 1e-3


def test_requests_are_batched_and_split_back(tiny_checkpoint: Path) -> None:
    runner = TorchRunner("vae_decoder", tiny_checkpoint, device="cpu")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, 4, 8, 8)).astype(np.float32) for n in (1, 2))
    alone = [runner.run({"latent_sample": x})["sample"] for x in (a, b)]
    together = runner.run_batch([{"latent_sample": a}, {"latent_sample": b}])
    for single, batched in zip(alone, together, strict=True):
        assert isinstance(batched, dict)
        assert np.abs(single - batched["sample"]).max() < 1e-4


def test_devices_are_checked() -> None:
    assert choose_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be auto, cuda or cpu"):
        choose_device("tpu")
