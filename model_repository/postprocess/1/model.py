"""Step 5 of txt2img: VAE output to UINT8 NHWC images.
The code lives in sd_triton.runtime.triton_postprocess (written by `sd-triton export`)."""

from sd_triton.runtime.triton_postprocess import TritonPythonModel  # noqa: F401
