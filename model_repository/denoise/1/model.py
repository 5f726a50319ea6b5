"""Step 3 of txt2img: the scheduler loop, calling the `unet` model through BLS each step."""

from sd_triton import contract as c
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.requests import validate_params
from sd_triton.runtime import triton_io as io
from sd_triton.runtime.denoise import denoise

SAMPLE, TIMESTEP, HIDDEN = (t.name for t in c.UNET.inputs)


class TritonPythonModel:
    def initialize(self, args):
        self.config = PipelineConfig.load(io.version_dir(args) / FILENAME)
        self.unet_model = io.parameters(args).get("unet_model", c.UNET.name)

    def execute(self, requests):
        return io.respond(requests, c.DENOISE, self._denoise)

    def _denoise(self, request):
        params = validate_params(
            height=io.get_scalar(request, c.HEIGHT),
            width=io.get_scalar(request, c.WIDTH),
            steps=io.get_scalar(request, c.STEPS),
            guidance_scale=io.get_scalar(request, c.GUIDANCE_SCALE),
            seed=io.get_scalar(request, c.SEED),
            scheduler=io.get_text(request, c.SCHEDULER),
            num_images=io.get_scalar(request, c.NUM_IMAGES),
            limits=self.config.limits,
            spatial_multiple=self.config.vae_scale_factor,
        )
        embeds = io.get_array(request, c.PROMPT_EMBEDS)
        return {c.LATENTS.name: denoise(embeds, params, self.config, self._unet)}

    def _unet(self, sample, timestep, hidden):
        inputs = {SAMPLE: sample, TIMESTEP: timestep, HIDDEN: hidden}
        return io.bls_infer(self.unet_model, inputs, c.UNET.outputs[0].name)
