"""Step 1 of txt2img: CLIP tokenization of prompt and negative prompt.
The code lives in sd_triton.runtime.triton_tokenizer (written by `sd-triton export`)."""

from sd_triton.runtime.triton_tokenizer import TritonPythonModel  # noqa: F401
