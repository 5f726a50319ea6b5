"""INT8 engines for CPUs: ONNX Runtime's dynamic quantization of an exported graph. Weights of the
MatMul and Gemm nodes (attention, projections, feed-forward: most of a UNet's and a text encoder's
multiply-adds besides convolutions) become INT8, activations are quantized on the fly; convolutions
stay FP32 (ConvInteger is slower than FP32 convolution on CPU). The result is `model.int8.onnx` next to
`model.onnx`; both python-ort and Triton's onnxruntime backend run it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
INT8_COMPONENTS = ("unet", "text_encoder")  # the VAE decoder is conv-bound and sensitive: not offered
QUANTIZED_OPS = ["MatMul", "Gemm"]


def quantize_int8(source: Path, target: Path) -> float:
    """Write the dynamically quantized graph of `source` to `target`; returns the seconds it took."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.monotonic()
    target.unlink(missing_ok=True)
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=QUANTIZED_OPS,
        use_external_data_format=source.with_name(source.name + ".data").is_file(),
    )
    seconds = time.monotonic() - started
    log.info(
        "  %s: INT8 (dynamic, %s weights) in %.1f s",
        target.parent.parent.name,
        "/".join(QUANTIZED_OPS),
        seconds,
    )
    return seconds
