"""Step 5 of txt2img: VAE output to UINT8 NHWC images."""

from sd_triton import contract as c
from sd_triton.runtime import triton_io
from sd_triton.runtime.postprocess import to_uint8_images


class TritonPythonModel:
    def execute(self, requests):
        return triton_io.respond(requests, c.POSTPROCESS, self._postprocess)

    def _postprocess(self, request):
        return {c.IMAGES.name: to_uint8_images(triton_io.get_array(request, c.DECODED))}
