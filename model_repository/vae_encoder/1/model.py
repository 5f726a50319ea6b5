"""Runs this version's engine when config.pbtxt says `backend: "python"`: the ONNX graph with ONNX
Runtime (kind python-ort) or the PyTorch module from the diffusers weights (parameter
`engine: python-torch`); ignored by the onnxruntime and tensorrt kinds.
The code lives in sd_triton.runtime.triton_engine (written by `sd-triton export`)."""

from sd_triton.runtime.triton_engine import TritonPythonModel  # noqa: F401
