"""sd-triton: Stable Diffusion served by NVIDIA Triton, behind a thin FastAPI gateway."""

__version__ = "0.1.0"
