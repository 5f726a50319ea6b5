"""`txt2img_stream` as a Triton python model (decoupled): the whole txt2img pipeline for one request,
streaming one response per denoising step before the final one with the images. Called directly
over gRPC streaming, so a client that cancels its stream stops the request at the next step.
Only importable inside Triton's python backend.

Every call into the Triton stub (BLS, is_cancelled, sending responses) happens on the batcher's
one worker thread; `execute` only hands requests over. For each request the worker

1. tokenizes and encodes the prompt (BLS to `tokenizer`; the `text_encoder` engine in this process
   on the inline UNet path, a BLS call to it on the bls path), and an image-to-image request's image
   (`vae_encoder`, the same way), when it admits it,
2. advances it with every other active request, one UNet call per latent shape per step
   (`ContinuousBatcher`), sending a step response (STEP, STEPS_TOTAL, PREVIEW_IMAGES when asked),
3. decodes it (the `vae_decoder` engine, in this process or by BLS as the text encoder, then uint8)
   and sends the final response (IMAGES, truncation; LATENTS when asked: a hand-off's base).

Requests here batch with each other; `txt2img` requests batch in `denoise`'s own batcher.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from sd_triton import contract as c
from sd_triton.model_params import BatchingParams
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.requests import InvalidRequest
from sd_triton.runtime import triton_io
from sd_triton.runtime.batching import BatchingConfig, ContinuousBatcher, Ticket
from sd_triton.runtime.denoise import DenoiseJob
from sd_triton.runtime.postprocess import to_uint8_images
from sd_triton.runtime.preview import preview_images

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _int32(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        torch.set_num_threads(1)  # see triton_denoise: the scheduler math is small
        self.config = PipelineConfig.load(triton_io.version_dir(args) / FILENAME)
        params = triton_io.model_params(args, BatchingParams)
        self.controls = triton_io.Controls(params, args, self.config)  # the pipeline's ControlNets
        self.unet = self.controls.unet(triton_io.live_unet(params, args, self.config))
        self.text_encoder, self.decoder = triton_io.inline_text_and_image(params, args, self.config)
        # image-to-image and inpainting requests' init images; requests' LoRA adapters
        self.encoder = triton_io.ImageEncoder(params, args, self.config)
        self.adapters = triton_io.Adapters(args, self.config, inline=self.text_encoder.inline is not None)
        config = BatchingConfig(
            max_batch=params.max_batch,
            max_wait_s=params.max_wait_us / 1e6,
            # a cancelled job stops at its next step: ask every request before every UNet call
            # (a 0.1 ms round trip to the server per request)
            cancel_check_s=0.0,
        )
        # requests accepted and not yet answered, for `sd-triton triton`'s drain and for ops; set on the
        # worker thread only (a metric update is a call into the stub too)
        self.metric_family = pb_utils.MetricFamily(
            name=c.STREAM_IN_FLIGHT_METRIC,
            description="txt2img_stream requests accepted and not yet answered",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.in_flight_gauge = self.metric_family.Metric(labels={"model": c.TXT2IMG_STREAM.name})
        self.in_flight = 0
        self.lock = threading.Lock()
        sys.setswitchinterval(0.0005)
        self.batcher = ContinuousBatcher(self.unet, config)
        self.batcher.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._submit(request)
        return None

    def finalize(self) -> None:
        self.batcher.stop()

    def _count(self, change: int) -> int:
        with self.lock:
            self.in_flight += change
            return self.in_flight

    def _answered(self) -> None:
        """On the worker thread, after a request's final response."""
        self.in_flight_gauge.set(self._count(-1))

    def _submit(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            params = triton_io.generation_params(request, self.config)
            # the tokenizer's inputs, as the request has them (it reads them again by BLS)
            text = {spec.name: triton_io.get_array(request, spec) for spec in c.TOKENIZER.inputs}
            want_preview = bool(triton_io.get_scalar(request, c.PREVIEW) or False)
            image = self.encoder.read(request, params)
            handoff = triton_io.read_handoff(request, params, self.config)
            adapters = self.adapters.read(request)
            controls = self.controls.read(request, params)
            conditioning = triton_io.Conditioning.read(request, self.config, params)
            wanted = set(request.requested_output_names())
        except (InvalidRequest, ValueError) as exc:
            sender.send(triton_io.error_response(str(exc)), flags=FINAL)
            return
        if want_preview and self.config.preview_weights is None:
            message = f"{c.PREVIEW.name}: this export has no preview map (re-export the model)"
            sender.send(triton_io.error_response(message), flags=FINAL)
            return
        truncation: dict[str, np.ndarray] = {}
        engines = triton_io.EngineLog()
        scale = self.config.vae_scale_factor
        shape = (self.config.latent_channels, params.height // scale, params.width // scale)

        self._count(+1)

        def prepare() -> DenoiseJob:
            self.in_flight_gauge.set(self._count(0))
            inputs = {name: value for name, value in text.items() if value is not None}
            ids = [c.INPUT_IDS.name, c.INPUT_IDS_2.name][: self.text_encoder.tokenizers]  # SDXL: two
            counts = [c.PROMPT_TRUNCATED_TOKENS.name, c.NEGATIVE_PROMPT_TRUNCATED_TOKENS.name]
            tables = [c.TOKEN_EMBEDDINGS.name, c.TOKEN_EMBEDDINGS_2.name][: self.text_encoder.tokenizers]
            outputs = [*ids, *counts, *tables, c.TOKEN_WEIGHTS.name, c.CLIP_SKIPS.name]
            tokens = triton_io.bls_infer_all(self.config.name_of(c.TOKENIZER.name), inputs, outputs)
            truncation.update({name: tokens[name] for name in counts})
            skips = tokens[c.CLIP_SKIPS.name]
            embeds, pooled = self.text_encoder(
                *(tokens[name] for name in ids),
                clip_skips=skips,
                vectors=[tokens[name] for name in tables],
                adapters=adapters,
            )
            embeds = triton_io.weighted_embeds(embeds, tokens[c.TOKEN_WEIGHTS.name], self.config)
            embeds, added = conditioning.apply(self.config, params, embeds, pooled)
            init = self.encoder.encode(image)
            return DenoiseJob(embeds, params, self.config, init, added, handoff, adapters, controls)

        def step(index: int, steps: int) -> None:
            engines.add(self.unet.last)
            tensors = [
                pb_utils.Tensor(c.STEP.name, _int32(index + 1)),
                pb_utils.Tensor(c.STEPS_TOTAL.name, _int32(steps)),
            ]
            if want_preview:
                assert ticket.job is not None and self.config.preview_weights is not None
                previews = preview_images(ticket.job.latents.numpy(), self.config.preview_weights)
                tensors.append(pb_utils.Tensor(c.PREVIEW_IMAGES.name, previews))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))

        def done(latents: np.ndarray) -> None:
            try:
                decoded = triton_io.run_engine(
                    c.VAE_DECODER, self.decoder, latents, self.config.name_of(c.VAE_DECODER.name)
                )
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                failed(exc)
                return
            ran = params.steps if ticket.job is None else ticket.job.steps  # img2img, a hand-off: fewer
            outputs = {
                c.IMAGES.name: to_uint8_images(decoded),
                c.STEP.name: _int32(ran),
                c.STEPS_TOTAL.name: _int32(ran),
                c.ENGINES.name: engines.array(),
                **truncation,
            }
            if c.LATENTS.name in wanted:  # a hand-off's base: the refiner starts from them
                outputs[c.LATENTS.name] = latents
            tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
            self._answered()

        def failed(exc: Exception) -> None:
            try:
                sender.send(triton_io.failure_response(c.TXT2IMG_STREAM.name, exc), flags=FINAL)
            finally:
                self._answered()

        ticket = Ticket(
            None, done, failed, step, is_cancelled=request.is_cancelled, prepare=prepare, latent_shape=shape,
            adapters=adapters, controlled=controls is not None,
        )  # fmt: skip
        self.batcher.submit(ticket)
