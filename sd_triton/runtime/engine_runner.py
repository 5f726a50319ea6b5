"""One engine version as a runner in this process, whatever its kind: what the python engine models run
(`python-ort`, `python-torch`) and what the denoise loop runs when its UNet path is `inline` (any kind:
an `onnxruntime` version is its ONNX file in ONNX Runtime, a `tensorrt` version its plan in TensorRT).
Triton-free, so tests load engines the way the models do.
"""

from __future__ import annotations

from pathlib import Path

from sd_triton.model_params import EngineParams
from sd_triton.runtime.ort_runner import BatchRunner, OrtRunner


def load_runner(
    component: str, version_dir: Path, kind: str, artifact: str, params: EngineParams
) -> BatchRunner:
    """`artifact`: the file (python-torch: the diffusers folder) in `version_dir` that `kind` loads;
    `params`: the runtime settings (device, threads, spinning, compile) of the component's config."""
    if kind == "python-torch":
        from sd_triton.runtime.torch_runner import TorchRunner  # torch and diffusers: only for this kind

        # the artifact: the component's checkpoint subfolder, or a folder of its subfolders (SDXL's text
        # encoders)
        root = version_dir if (version_dir / artifact / "config.json").is_file() else version_dir / artifact
        return TorchRunner(component, root, params.device, params.intra_op_threads, params.torch_compile)
    if kind == "tensorrt":
        from sd_triton.runtime.trt_runner import TrtRunner  # tensorrt and CUDA: only for this kind

        return TrtRunner(component, version_dir / artifact)
    if kind not in ("python-ort", "onnxruntime"):
        raise ValueError(
            f"engine kind {kind!r}: no in-process runner (python-ort, onnxruntime, python-torch, tensorrt)"
        )
    return OrtRunner(
        version_dir / artifact,  # model.int8.onnx: INT8
        device=params.device,
        threads=params.intra_op_threads,
        spinning=params.allow_spinning,
    )
