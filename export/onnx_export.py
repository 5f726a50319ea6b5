"""PyTorch -> ONNX for one component, then a check of the graph against PyTorch."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from sd_triton.export.components import Component, ModelDims

log = logging.getLogger(__name__)

OPSET = 17
TWO_GIB = 2**31
# Shapes of the check: the traced one (odd latent sides, so the UNet's explicit-upsample-size path
# is the one traced) and a second one that proves the axes are dynamic.
TRACE_SHAPE = (2, (9, 11))
CHECK_SHAPE = (3, (7, 10))
# max abs diff allowed between ONNX Runtime and PyTorch (fp32) on the check inputs
TOLERANCE = 1e-3


class OnnxCheckError(RuntimeError):
    pass


def export_onnx(component: Component, checkpoint: Path, dims: ModelDims, out: Path) -> float:
    """Write `out` (model.onnx, one external-data file beside it when over 2 GiB) and return the
    max abs diff against PyTorch over the check inputs."""
    module = component.load(checkpoint)
    trace_inputs = component.sample_inputs(dims, TRACE_SHAPE[0], TRACE_SHAPE[1])
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module,
                trace_inputs,
                str(raw),
                input_names=component.input_names,
                output_names=component.output_names,
                dynamic_axes=component.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
            )
        _save_single(raw, out)
    diffs = [
        _max_abs_diff(module, out, component, component.sample_inputs(dims, batch, hw))
        for batch, hw in (TRACE_SHAPE, CHECK_SHAPE)
    ]
    diff = max(diffs)
    if not diff <= TOLERANCE:
        raise OnnxCheckError(f"{component.name}: ONNX differs from PyTorch by {diff:.3g} (> {TOLERANCE})")
    return diff


def _save_single(raw: Path, out: Path) -> None:
    """Keep the graph as one file, or one file plus `model.onnx.data` for models over 2 GiB."""
    size = sum(f.stat().st_size for f in raw.parent.iterdir())
    out.unlink(missing_ok=True)
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)
    if size < TWO_GIB and not any(f != raw for f in raw.parent.iterdir()):
        shutil.move(raw, out)
        return
    model = onnx.load(str(raw))
    onnx.save_model(
        model, str(out), save_as_external_data=True, location=data.name, all_tensors_to_one_file=True
    )


def _max_abs_diff(
    module: torch.nn.Module, path: Path, component: Component, inputs: tuple[torch.Tensor, ...]
) -> float:
    with torch.no_grad():
        output = module(*inputs)
    expected = [o.numpy() for o in (output if isinstance(output, tuple) else (output,))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in zip(component.input_names, inputs, strict=True)}
    diff = 0.0
    for name, actual, wanted in zip(
        component.output_names, session.run(component.output_names, feeds), expected, strict=True
    ):
        if actual.shape != wanted.shape:
            raise OnnxCheckError(
                f"{component.name}: ONNX output {name} shape {actual.shape} != PyTorch {wanted.shape}"
            )
        diff = max(diff, float(np.abs(actual - wanted).max()))
    return diff
