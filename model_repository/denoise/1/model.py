"""Step 3 of txt2img: the scheduler loop, calling the `unet` model through BLS each step."""

from sd_triton import contract as c
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.requests import validate_params
from sd_triton.runtime import triton_io
from sd_triton.runtime.denoise import denoise

SAMPLE, TIMESTEP, HIDDEN = (t.name for t in c.UNET.inputs)


class TritonPythonModel:
    def initialize(self, args):
        self.config = PipelineConfig.load(triton_io.version_dir(args) / FILENAME)
        self.unet_model = triton_io.parameters(args).get("unet_model", c.UNET.name)

    def execute(self, requests):
        return triton_io.respond(requests, c.DENOISE, self._denoise)

    def _denoise(self, request):
        params = validate_params(
            height=triton_io.get_scalar(request, c.HEIGHT),
            width=triton_io.get_scalar(request, c.WIDTH),
            steps=triton_io.get_scalar(request, c.STEPS),
            guidance_scale=triton_io.get_scalar(request, c.GUIDANCE_SCALE),
            seed=triton_io.get_scalar(request, c.SEED),
            scheduler=triton_io.get_text(request, c.SCHEDULER),
            num_images=triton_io.get_scalar(request, c.NUM_IMAGES),
            limits=self.config.limits,
            spatial_multiple=self.config.vae_scale_factor,
        )
        embeds = triton_io.get_array(request, c.PROMPT_EMBEDS)
        return {c.LATENTS.name: denoise(embeds, params, self.config, self._unet)}

    def _unet(self, sample, timestep, hidden):
        inputs = {SAMPLE: sample, TIMESTEP: timestep, HIDDEN: hidden}
        return triton_io.bls_infer(self.unet_model, inputs, c.UNET.outputs[0].name)
