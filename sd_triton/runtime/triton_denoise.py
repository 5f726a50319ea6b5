"""Step 3 of txt2img as a Triton python model: the scheduler loop, running the live version of the
`unet` engine each step, in this process (parameter `unet_path` inline: triton_io.InlineEngine) or
through a BLS call to the `unet` model (bls: triton_io.PinnedUNet). Only importable inside Triton's
python backend.

On the inline path the model also runs the live versions of the `text_encoder` engine (on the
tokenizer's INPUT_IDS, as a request arrives) and the `vae_decoder` engine (then uint8, as a request
finishes, on a decode thread while the loop steps the others; requests finishing together share its
calls) in this process and answers IMAGES:
the ensemble is tokenizer -> denoise, without the three python hops of text_encoder, vae_decoder and
postprocess. A request may still bring PROMPT_EMBEDS
instead of INPUT_IDS, and ask for LATENTS: each request gets the outputs it asks for (the bls path's
ensemble asks for LATENTS; only the inline path can answer IMAGES).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from sd_triton.runtime.denoise import DenoiseJob, run_alone
from sd_triton.runtime.postprocess import to_uint8_images

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("sd_triton.triton")


@dataclass(frozen=True, eq=False)
class _Finished:
    """A request whose loop finished, waiting for its answer."""

    latents: np.ndarray
    wanted: set[str]  # the outputs it asked for
    engines: triton_io.EngineLog
    sender: Any  # its response sender
    failed: Callable[[Exception], None]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        # The scheduler's tensor math is small; torch's intra-op threads would only spin on the cores
        # the UNet computes on (CPU engines) and never help (GPU engines).
        torch.set_num_threads(1)
        self.config = PipelineConfig.load(triton_io.version_dir(args) / FILENAME)
        params = triton_io.model_params(args, DenoiseParams)
        # the live UNet; with the pipeline's ControlNets, for the requests that name them
        self.controls = triton_io.Controls(params, args, self.config)
        self.unet = self.controls.unet(triton_io.live_unet(params, args, self.config))
        self.text_encoder, self.decoder = triton_io.inline_text_and_image(params, args, self.config)
        # image-to-image and inpainting requests' init images; requests' LoRA adapters
        self.encoder = triton_io.ImageEncoder(params, args, self.config)
        self.adapters = triton_io.Adapters(args, self.config, inline=self.text_encoder.inline is not None)
        # finished requests are decoded and answered on a thread of their own, so the loop steps the
        # others meanwhile (the engines release the GIL), as it did while Triton's vae_decoder decoded;
        # those finished since its last turn share VAE calls (`_answer_finished`)
        self.answering = ThreadPoolExecutor(1, thread_name_prefix="decode") if self.decoder else None
        self.finished: list[_Finished] = []
        self.finished_lock = threading.Lock()
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
        if self.answering is not None:
            self.answering.shutdown(wait=True)

    def _params(self, request: Any) -> GenerationParams:
        return triton_io.generation_params(request, self.config)

    def _embeds(self, request: Any, params: GenerationParams, adapters: Any = None) -> tuple[np.ndarray, Any]:
        """PROMPT_EMBEDS (and an SDXL model's POOLED_EMBEDS), or on the inline path the text encoder's
        outputs for INPUT_IDS (and INPUT_IDS_2), with `adapters`' text-encoder weights; with an SDXL
        model's added conditioning (or None)."""
        conditioning = triton_io.Conditioning.read(request, self.config, params)  # checked first
        # the config's (optional) specs: either may be absent
        embeds = triton_io.get_array(request, c.DENOISE.input(c.PROMPT_EMBEDS.name))
        pooled = triton_io.get_array(request, c.POOLED_EMBEDS)
        inline = self.text_encoder.inline is not None
        if embeds is None:
            ids = [c.INPUT_IDS, c.INPUT_IDS_2][: self.text_encoder.tokenizers]  # SDXL: two tokenizers
            arrays = [triton_io.get_array(request, c.DENOISE.input(t.name)) if inline else None for t in ids]
            if arrays[0] is None:
                alternative = f" (or {c.INPUT_IDS.name})" if inline else ""
                raise InvalidRequest(c.PROMPT_EMBEDS.name, f"is required{alternative}")
            for spec, array in zip(ids, arrays, strict=True):
                if array is None:
                    raise InvalidRequest(spec.name, "is required by an SDXL model")
                if array.ndim != 2 or array.shape != arrays[0].shape or array.shape[1] % c.TOKEN_LENGTH:
                    raise InvalidRequest(
                        spec.name, f"must be [rows, {c.TOKEN_LENGTH} x chunks], got {list(array.shape)}"
                    )
            skips = triton_io.get_array(request, c.CLIP_SKIPS)
            vectors = [triton_io.get_array(request, t) for t in (c.TOKEN_EMBEDDINGS, c.TOKEN_EMBEDDINGS_2)]
            embeds, pooled = self.text_encoder(*arrays, clip_skips=skips, vectors=vectors, adapters=adapters)
        embeds = triton_io.weighted_embeds(embeds, triton_io.get_array(request, c.TOKEN_WEIGHTS), self.config)
        return conditioning.apply(self.config, params, embeds, pooled)

    def _outputs(
        self,
        latents: np.ndarray,
        wanted: set[str],
        engines: triton_io.EngineLog,
        decoded: np.ndarray | None = None,
    ) -> triton_io.Outputs:
        """What the request asked for of LATENTS, IMAGES (inline path only: `decoded`, the VAE's output,
        or decoded here) and ENGINES."""
        outputs = {c.ENGINES.name: engines.array()}
        if c.LATENTS.name in wanted or not wanted:
            outputs[c.LATENTS.name] = latents
        if c.IMAGES.name in wanted and self.decoder is not None:
            if decoded is None:
                decoded = triton_io.run_engine(
                    c.VAE_DECODER, self.decoder, latents, self.config.name_of(c.VAE_DECODER.name)
                )
            outputs[c.IMAGES.name] = to_uint8_images(decoded)
        return outputs

    def _job(self, request: Any) -> DenoiseJob:
        """A generation request's job: its inputs read and checked (refused before anything runs), its
        text encoded and its init image encoded."""
        params = self._params(request)
        image = self.encoder.read(request, params)
        handoff = triton_io.read_handoff(request, params, self.config)
        adapters = self.adapters.read(request)
        controls = self.controls.read(request, params)
        embeds, added = self._embeds(request, params, adapters)
        init = self.encoder.encode(image)
        return DenoiseJob(embeds, params, self.config, init, added, handoff, adapters, controls)

    def _denoise(self, request: Any) -> triton_io.Outputs:
        listing = self.adapters.listing(request)
        if listing is not None:  # a control request: a library
            return {c.ENGINES.name: listing}
        if triton_io.get_array(request, c.CANCEL) is not None:
            raise InvalidRequest(c.CANCEL.name, "dropping requests needs the `continuous` batching")
        job = self._job(request)
        engines = triton_io.EngineLog()
        self.unet.refresh()  # the request runs on the live UNet version
        latents = run_alone(job, self.unet, lambda i, n: engines.add(self.unet.last))
        self.unet.idle()
        return self._outputs(latents, set(request.requested_output_names()), engines)

    def _answer_finished(self) -> None:
        """On the decode thread: every request finished since its last turn answered, those that asked
        for IMAGES decoded together (requests finishing in the same iteration share VAE calls of up to
        its max batch: eight 256x256 images took 4.3 s one by one and 3.1 s in two calls of four, on
        this project's 2-core CPU)."""
        with self.finished_lock:
            finished, self.finished = self.finished, []
        decode = [f for f in finished if c.IMAGES.name in f.wanted]
        decoded: list[np.ndarray | Exception] = []
        if decode and self.decoder is not None:
            self.decoder.refresh()  # the version live now
            try:
                decoded = self.decoder.call_each([f.latents for f in decode])
            except Exception as exc:  # noqa: BLE001 - no engine to run: each of them fails
                decoded = [exc] * len(decode)
        images = {id(f): d for f, d in zip(decode, decoded, strict=True)}
        for f in finished:
            self._answer(f, images.get(id(f)))

    def _answer(self, finished: _Finished, decoded: np.ndarray | Exception | None) -> None:
        """One finished request's response (on the decode thread, or the loop's on the bls path)."""
        try:
            if isinstance(decoded, Exception):
                raise decoded
            outputs = self._outputs(finished.latents, finished.wanted, finished.engines, decoded)
        except Exception as exc:  # noqa: BLE001 - this request alone fails
            finished.failed(exc)
            return
        tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
        try:
            finished.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
        except Exception:  # noqa: BLE001 - on the decode thread nobody else would see it
            log.exception("denoise: sending a result failed")

    def _submit(self, request: Any) -> None:
        assert self.batcher is not None
        sender = request.get_response_sender()
        listing = self.adapters.listing(request)
        if listing is not None:  # a control request: a library
            tensor = pb_utils.Tensor(c.ENGINES.name, listing)
            sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]), flags=FINAL)
            return
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
            job = self._job(request)
        except (InvalidRequest, ValueError) as exc:
            sender.send(triton_io.error_response(str(exc)), flags=FINAL)
            return
        except Exception as exc:  # noqa: BLE001 - the inline text encoder failed: this request alone
            sender.send(triton_io.failure_response(c.DENOISE.name, exc), flags=FINAL)
            return

        engines = triton_io.EngineLog()
        wanted = set(request.requested_output_names())

        def step(index: int, steps: int) -> None:
            engines.add(self.unet.last)

        def failed(exc: Exception) -> None:
            sender.send(triton_io.failure_response(c.DENOISE.name, exc), flags=FINAL)

        def done(latents: np.ndarray) -> None:
            finished = _Finished(latents, wanted, engines, sender, failed)
            if self.answering is None:
                self._answer(finished, None)
                return
            with self.finished_lock:
                self.finished.append(finished)
                first = len(self.finished) == 1
            if first:  # else a turn of the decode thread is queued already and takes this one too
                self.answering.submit(self._answer_finished)

        cancelled, request_id = request.is_cancelled, request.request_id()
        self.batcher.submit(Ticket(job, done, failed, step, is_cancelled=cancelled, request_id=request_id))
