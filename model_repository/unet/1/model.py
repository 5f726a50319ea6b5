"""Runs this folder's model.onnx with ONNX Runtime when config.pbtxt says `backend: "python"`
(engine kind python-ort); ignored by the onnxruntime and tensorrt kinds."""

from sd_triton.runtime.triton_ort import TritonPythonModel  # noqa: F401
