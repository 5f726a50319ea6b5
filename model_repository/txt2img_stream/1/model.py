"""txt2img with one streamed response per denoising step (decoupled).
The code lives in sd_triton.runtime.triton_stream (written by `sd-triton export`)."""

from sd_triton.runtime.triton_stream import TritonPythonModel  # noqa: F401
