"""Step 3 of txt2img: the scheduler loop (continuous batching or one request at a time), running
the live `unet` engine each step: in this process (unet_path inline, with the text encoder
and the VAE decoder) or through BLS (bls).
The code lives in sd_triton.runtime.triton_denoise (written by `sd-triton export`)."""

from sd_triton.runtime.triton_denoise import TritonPythonModel  # noqa: F401
