"""TensorRT engine builds from the exported ONNX, with the component's min/opt/max profile.

Needs an NVIDIA GPU and the `tensorrt` package (extra `gpu`); elsewhere the export writes the
repository, records the plan as missing with the reason, and the same export rerun on the GPU host
builds it. A timing cache (one per GPU and TensorRT version) is reused across builds.

A plan only runs on the GPU model and TensorRT version that built it: each build records both
(engine.json `build`), and `sd-triton triton` refuses to start Triton on a plan built elsewhere
(`mismatch`).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from pathlib import Path
from typing import Any

from sd_triton.export.components import Profile

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


def build_target() -> dict[str, str] | None:
    """The GPU and TensorRT version a plan built here is tied to; None without both."""
    if unavailable_reason() is not None:
        return None
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
        "tensorrt": trt.__version__,
    }


def mismatch(build: dict[str, Any] | None, target: dict[str, str] | None) -> str | None:
    """Why a plan built for `build` cannot run on `target`, or None when it can (or nothing is known)."""
    if not build:
        return None
    if target is None:
        return f"the plan was built for {build.get('gpu')} (TensorRT {build.get('tensorrt')}); no GPU here"
    for key, what in (("gpu", "GPU"), ("compute_capability", "compute capability"), ("tensorrt", "TensorRT")):
        if key in build and build[key] != target.get(key):
            return (
                f"the plan was built for {what} {build[key]!r}, this machine has {target.get(key)!r}: "
                "rebuild it here (sd-triton export, or sd-triton engine set ... tensorrt)"
            )
    return None


def timing_cache_path(work_dir: Path, target: dict[str, str]) -> Path:
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{target['gpu']}-trt{target['tensorrt']}")
    return work_dir / f"tensorrt-timing-{name}.cache"


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profile: Profile,
    fp16: bool,
    timing_cache: Path | None = None,
    refit: bool = False,
) -> dict[str, Any]:
    """Builds the plan; returns what engine.json records of the build (GPU, TensorRT, seconds). `refit`:
    its weights can be set again (the ONNX initializers' names; LoRA adapters, runtime/lora_weights.py)."""
    import tensorrt as trt

    target = build_target() or {}
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
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.shapes.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    started = time.monotonic()
    log.info(
        "TensorRT: building %s (fp16=%s, refit=%s, timing cache %s); this takes minutes for a full-size UNet",
        plan_path,
        fp16,
        refit,
        "reused" if cache_bytes else "new",
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path} (see the TensorRT log above)")
    plan_path.write_bytes(serialized)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    seconds = time.monotonic() - started
    log.info("TensorRT: built %s in %.0f s", plan_path, seconds)
    built = {**target, "fp16": fp16, "seconds": round(seconds, 1), "profile": profile.shapes}
    return {**built, "refit": True} if refit else built
