"""TensorRT engine builds from the exported ONNX, with the component's min/opt/max profile.

Needs an NVIDIA GPU and the `tensorrt` package (extra `gpu`); elsewhere the export writes the
repository and leaves the plans to `sd-triton build-engines` on the GPU host.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from export.components import Profile

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 8 << 30


def unavailable_reason() -> str | None:
    """Why no engine can be built on this machine, or None when one can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install 'sd-triton[gpu]')"
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, fp16: bool) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.shapes.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    started = time.monotonic()
    log.info("TensorRT: building %s (fp16=%s); this takes minutes for a full-size UNet", plan_path, fp16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path} (see the TensorRT log above)")
    plan_path.write_bytes(serialized)
    log.info("TensorRT: built %s in %.0f s", plan_path, time.monotonic() - started)
