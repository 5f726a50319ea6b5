"""Step 5 of txt2img: VAE output to UINT8 NHWC images.

Only importable inside Triton's python backend; the repository's `postprocess/1/model.py` imports
`TritonPythonModel` from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sd_triton import contract as c
from sd_triton.runtime import triton_io
from sd_triton.runtime.postprocess import to_uint8_images


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        return triton_io.respond(requests, c.POSTPROCESS, self._postprocess)

    def _postprocess(self, request: Any) -> dict[str, np.ndarray]:
        return {c.IMAGES.name: to_uint8_images(triton_io.get_array(request, c.DECODED))}
