"""Step 3 of txt2img as a Triton python model: the scheduler loop, running the live version of the
`unet` engine each step, in this process (parameter `unet_path` inline: triton_io.InlineUNet) or through
a BLS call to the `unet` model (bls: triton_io.PinnedUNet). Only importable inside Triton's python backend.

Parameter `batching` (config.pbtxt) picks how requests share UNet calls:

- `continuous` (one instance): `execute` hands each request to a `ContinuousBatcher` worker and
  returns at once; every iteration the worker runs one UNet call per latent shape for all active
  requests, and answers each request through its response sender when its last step is done.
- anything else: each `execute` runs its requests' loops to the end, one request at a time; how
  their UNet calls meet is left to the `unet` model's own dynamic batcher.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from sd_triton import contract as c
from sd_triton.model_params import DenoiseParams
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.requests import GenerationParams, InvalidRequest, decode_text
from sd_triton.runtime import triton_io
from sd_triton.runtime.batching import BatchingConfig, ContinuousBatcher, Ticket
from sd_triton.runtime.denoise import DenoiseJob, denoise

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        # The scheduler's tensor math is small; torch's intra-op threads would only spin on the cores
        # the UNet computes on (CPU engines) and never help (GPU engines).
        torch.set_num_threads(1)
        self.config = PipelineConfig.load(triton_io.version_dir(args) / FILENAME)
        params = triton_io.model_params(args, DenoiseParams)
        self.unet = triton_io.live_unet(params, args)
        self.batcher: ContinuousBatcher | None = None
        if params.batching == "continuous":
            config = BatchingConfig(max_batch=params.max_batch, max_wait_s=params.max_wait_us / 1e6)
            # the worker and the stub's main thread (execute) hand the GIL back and forth every step;
            # Python's default 5 ms switch interval showed as a few % at one request on `tiny`
            sys.setswitchinterval(0.0005)
            self.batcher = ContinuousBatcher(self.unet, config)
            self.batcher.start()

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.batcher is None:
            return triton_io.respond(requests, c.DENOISE, self._denoise)
        for request in requests:
            self._submit(request)
        return None

    def finalize(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    def _params(self, request: Any) -> GenerationParams:
        return triton_io.generation_params(request, self.config)

    def _embeds(self, request: Any) -> np.ndarray:
        embeds = triton_io.get_array(request, c.PROMPT_EMBEDS)
        assert embeds is not None  # a required input
        return embeds

    def _denoise(self, request: Any) -> triton_io.Outputs:
        if triton_io.get_array(request, c.CANCEL) is not None:
            raise InvalidRequest(c.CANCEL.name, "dropping requests needs the `continuous` batching")
        params = self._params(request)
        engines = triton_io.EngineLog()
        self.unet.refresh()  # the request runs on the live UNet version
        latents = denoise(
            self._embeds(request), params, self.config, self.unet, lambda i, n: engines.add(self.unet.last)
        )
        self.unet.idle()
        return {c.LATENTS.name: latents, c.ENGINES.name: engines.array()}

    def _submit(self, request: Any) -> None:
        assert self.batcher is not None
        sender = request.get_response_sender()
        drop = triton_io.get_array(request, c.CANCEL)
        if drop is not None:  # a control request: generations to drop (the gateway's cancels)
            try:
                self.batcher.drop([decode_text(c.CANCEL.name, raw) for raw in drop.reshape(-1)])
            except InvalidRequest as exc:
                sender.send(triton_io.error_response(str(exc)), flags=FINAL)
                return
            sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
            return
        try:
            job = DenoiseJob(self._embeds(request), self._params(request), self.config)
        except (InvalidRequest, ValueError) as exc:
            sender.send(triton_io.error_response(str(exc)), flags=FINAL)
            return

        engines = triton_io.EngineLog()

        def step(index: int, steps: int) -> None:
            engines.add(self.unet.last)

        def done(latents: np.ndarray) -> None:
            tensors = [
                pb_utils.Tensor(c.LATENTS.name, latents),
                pb_utils.Tensor(c.ENGINES.name, engines.array()),
            ]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)

        def failed(exc: Exception) -> None:
            sender.send(triton_io.failure_response(c.DENOISE.name, exc), flags=FINAL)

        cancelled, request_id = request.is_cancelled, request.request_id()
        self.batcher.submit(Ticket(job, done, failed, step, is_cancelled=cancelled, request_id=request_id))
