"""Glue shared by the thin `model.py` files of the Triton python models.

Only importable inside Triton's python backend (it needs `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from sd_triton import contract as c
from sd_triton import control, embeddings, prompts
from sd_triton.contract import ModelSpec, TensorSpec
from sd_triton.engine_record import ENGINE_FILE, EngineRecord, versions_on_disk
from sd_triton.lora import INDEX, LORA_COMPONENTS, AdapterSet, LoraLibrary, indexed_graph, library_dir
from sd_triton.model_params import (
    UNET_PATHS,
    BatchingParams,
    EngineParams,
    ModelParams,
    pbtxt_max_batch_size,
    pbtxt_parameters,
)
from sd_triton.pipeline_config import PipelineConfig
from sd_triton.requests import (
    DEFAULTS,
    INPUTS,
    GenerationParams,
    InvalidRequest,
    decode_text,
    start_step,
    validate_params,
)
from sd_triton.runtime.controlnets import ControlledUNet, ControlNetLibrary, JobControl, job_control
from sd_triton.runtime.engine_runner import load_runner
from sd_triton.runtime.lora_weights import GraphWeights
from sd_triton.runtime.ort_runner import BatchRunner

log = logging.getLogger("sd_triton.triton")
CONFIG_FILE = "config.pbtxt"

Outputs = dict[str, np.ndarray]


P = TypeVar("P", bound=ModelParams)


def version_dir(args: dict[str, Any]) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def model_params(args: dict[str, Any], kind: type[P]) -> P:
    """The model's typed config parameters (sd_triton.model_params), defaults for those absent."""
    return kind.from_model_config(json.loads(args["model_config"]))


def get_array(request: Any, spec: TensorSpec) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
    if tensor is None:
        if spec.optional:
            return None
        raise InvalidRequest(spec.name, "is required")
    return tensor.as_numpy()


def get_scalar(request: Any, spec: TensorSpec) -> Any:
    """The single element of a [1] input; an empty or longer batch is the caller's error."""
    array = get_array(request, spec)
    if array is None:
        return None
    if array.size != 1:
        what = "empty batch" if array.size == 0 else f"{array.size} elements"
        raise InvalidRequest(spec.name, f"must hold exactly 1 element per request, got {what}")
    return array.reshape(-1)[0]


def get_text(request: Any, spec: TensorSpec, default: str | None = None) -> str:
    value = get_scalar(request, spec)
    return default if value is None and default is not None else decode_text(spec.name, value)


def generation_params(request: Any, config: PipelineConfig) -> GenerationParams:
    """A request's generation inputs, checked against the exported model's limits."""
    fields = {
        name: get_text(request, spec, default=getattr(DEFAULTS, name))
        if spec.dtype == "TYPE_STRING"
        else get_scalar(request, spec)
        for name, spec in INPUTS.items()
    }
    return validate_params(limits=config.limits, spatial_multiple=config.vae_scale_factor, **fields)


def error_response(message: str, code: Any = None) -> Any:
    """A response carrying an error (INVALID_ARG unless `code` says otherwise)."""
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def failure_response(model: str, exc: Exception) -> Any:
    """The final response of a request the batcher dropped: CANCELLED when its client cancelled it."""
    from sd_triton.runtime.batching import Cancelled  # not at the top: engines' stubs import this module

    code = pb_utils.TritonError.CANCELLED if isinstance(exc, Cancelled) else pb_utils.TritonError.INTERNAL
    return error_response(f"{model}: {exc}", code)


def respond(requests: Sequence[Any], spec: ModelSpec, handle: Callable[[Any], Outputs]) -> list[Any]:
    """One response per request (the outputs `handle` gives of `spec`'s); a request's bad input answers
    INVALID_ARG to it alone."""
    responses = []
    for request in requests:
        try:
            outputs = handle(request)
        except InvalidRequest as exc:
            responses.append(error_response(str(exc)))
            continue
        tensors = [pb_utils.Tensor(t.name, outputs[t.name]) for t in spec.outputs if t.name in outputs]
        responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
    return responses


def bls_infer(model: str, inputs: dict[str, np.ndarray], output: str, version: int = -1) -> np.ndarray:
    """One synchronous BLS call; an error from the called model raises."""
    return bls_infer_all(model, inputs, [output], version)[output]


def bls_infer_all(
    model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str], version: int = -1
) -> Outputs:
    request = pb_utils.InferenceRequest(
        model_name=model,
        model_version=version,
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        requested_output_names=list(outputs),
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


class LiveEngine:
    """An engine a denoising loop calls (the UNet; inline, the text encoder and VAE decoder too),
    following the version Triton has READY for its model, so the caller knows which engine ran each call
    (that version's engine.json, `last`). `sd-triton engine set` loads a new version while the old one
    serves; the loop moves to it within RESOLVE_EVERY_S."""

    RESOLVE_EVERY_S = 0.5  # a newer version is picked up within this long
    READY_WAIT_S = 60.0  # a call waits this long for some version to be ready (a reload in progress)

    def __init__(self, model: str, model_dir: Path) -> None:
        self.model = model
        self.model_dir = model_dir
        self.version = -1  # -1: no version folders on disk (calls are not pinned, provenance unknown)
        self.resolved_at = -1e9
        self.last: dict[str, Any] | None = None  # the provenance of the latest call
        self._records: dict[int, dict[str, Any]] = {}

    def _resolve(self) -> int:
        deadline = time.monotonic() + self.READY_WAIT_S
        while True:
            versions = versions_on_disk(self.model_dir)
            ready = next((v for v in versions if pb_utils.is_model_ready(self.model, str(v))), None)
            if ready is not None or not versions:
                self.version = -1 if ready is None else ready
                self.resolved_at = time.monotonic()
                return self.version
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.model}: none of versions {versions} is ready")
            time.sleep(0.05)

    def refresh(self) -> None:
        """A request joins the loop: the next call asks Triton for the READY version first."""
        self.resolved_at = -1e9

    def idle(self) -> None:
        """The loop has nothing to do (called on its thread)."""

    def _due(self) -> bool:
        return time.monotonic() - self.resolved_at > self.RESOLVE_EVERY_S

    def _resolve_when_due(self) -> int:
        if self._due():
            self._resolve()
        return self.version

    def provenance(self, version: int) -> dict[str, Any] | None:
        if version < 0:
            return None
        if version not in self._records:
            record = EngineRecord.load(self.model_dir / str(version))
            self._records[version] = (
                record.provenance() if record else {"component": self.model, "version": version}
            )
        return self._records[version]


class PinnedUNet(LiveEngine):
    """The `bls` UNet path: every call a BLS request to the UNet model, pinned to the READY version; a
    call to a version unloaded meanwhile is retried once on the one now ready."""

    def __init__(self, model: str, model_dir: Path, spec: ModelSpec) -> None:
        """`spec`: the UNet's contract (SD's, or SDXL's with the added conditioning)."""
        super().__init__(model, model_dir)
        self.spec = spec

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> noise_pred."""
        version = self._resolve_when_due()
        inputs = dict(zip((t.name for t in self.spec.inputs), arrays, strict=True))
        output = self.spec.outputs[0].name
        try:
            noise = bls_infer(self.model, inputs, output, version)
        except RuntimeError:
            if self._resolve() == version:
                raise  # the version is still the live one: a real error
            log.info("%s: version %d went away during the call; retrying on version %d", self.model,
                     version, self.version)  # fmt: skip
            version = self.version
            noise = bls_infer(self.model, inputs, output, version)
        self.last = self.provenance(version)
        return noise


class InlineEngine(LiveEngine):
    """An engine model's READY version loaded and run in this process (engine_runner: any kind), no
    round trip to Triton per call: the `inline` path's UNet (every step), text encoder (every request
    that arrives) and VAE decoder (every request that finishes). Triton's model stays loaded: it is
    what `engine set` loads and gates, what is_model_ready reports, and what perf_analyzer measures.

    A version is loaded here by a thread as soon as its engine.json appears (`engine set` writes it just
    before Triton's load) or Triton has it READY, while the loop keeps calling the one it runs. The
    loop switches at the first call after the load; a call after `refresh` (a request joined) runs on the
    READY version, waiting for its load if need be, so a request that starts after Triton's switch runs
    on the new engine alone. The last KEEP versions stay loaded (a rollback switches back at once)."""

    KEEP = 2

    def __init__(self, model: str, model_dir: Path, spec: ModelSpec, owner: str | None = None) -> None:
        """`spec`: the contract of the engine model `model`; `owner`: the denoising loop's model, the
        label of the timer's metrics (the UNet's; none for other engines)."""
        super().__init__(model, model_dir)
        self.spec = spec
        self.timer = InlineTimer(owner) if owner else None
        self.running = -1  # the version the calls run on
        self.runners: OrderedDict[int, BatchRunner] = OrderedDict()  # least recently used first
        self._loading: dict[int, threading.Thread] = {}
        self._loaded: dict[int, BatchRunner] = {}  # handed over by the loading threads, under _lock
        self._failed: set[int] = set()  # versions whose background load failed: not retried there
        self._lock = threading.Lock()
        self._sync = True  # the next call runs on the READY version
        # rows per call at most (the engine's profile; Triton's max_batch_size): `call_each` splits there
        self.max_batch = pbtxt_max_batch_size((model_dir / CONFIG_FILE).read_text())
        # LoRA: the pipeline's adapter library (its index of this engine's graphs), and the checkpoint
        # components this engine runs
        pipeline = model[: -len(spec.name) - 1] if model != spec.name else ""
        self.lora_index = library_dir(model_dir.parent, pipeline) / INDEX
        self.lora_components = LORA_COMPONENTS.get(spec.name, ())

    def refresh(self) -> None:
        super().refresh()
        self._sync = True

    def idle(self) -> None:
        if self.timer:
            self.timer.flush()

    def load(self, version: int) -> BatchRunner:
        """That version's engine, with the runtime settings of the model's config.pbtxt."""
        if version < 0:
            raise RuntimeError(
                f"{self.model}: the inline UNet path needs version folders in {self.model_dir}"
            )
        folder = self.model_dir / str(version)
        params = EngineParams.from_parameters(pbtxt_parameters((self.model_dir / CONFIG_FILE).read_text()))
        record = EngineRecord.load(folder)
        kind, artifact = (record.kind, record.artifact) if record else (params.engine, params.model_file)
        log.info("%s: loading version %d (%s) into the denoising loop's process", self.model, version, kind)
        runner = load_runner(self.spec.name, folder, kind, artifact, params)  # the component, not the model
        graph = indexed_graph(self.model_dir, record) if record and self.lora_components else None
        if graph is not None:  # adapters from the library's index of the graph (python-torch: none needed)
            runner.lora = GraphWeights(graph[1], self.lora_index, graph[0], self.lora_components)
        return runner

    def _load_in_background(self, version: int) -> None:
        if version < 0 or version in self.runners or version in self._loading or version in self._failed:
            return

        def work() -> None:
            try:
                runner = self.load(version)
            except Exception:  # noqa: BLE001 - the loop keeps the engine it has
                log.exception("%s: loading version %d failed", self.model, version)
                self._failed.add(version)
                return
            with self._lock:
                self._loaded[version] = runner

        thread = threading.Thread(target=work, name=f"load-{self.model}-{version}", daemon=True)
        self._loading[version] = thread
        thread.start()

    def _keep(self, version: int, runner: BatchRunner) -> None:
        self.runners[version] = runner
        self.runners.move_to_end(version)
        for old in [v for v in self.runners if v != self.running][: max(0, len(self.runners) - self.KEEP)]:
            del self.runners[old]

    def _collect(self) -> None:
        with self._lock:
            loaded, self._loaded = self._loaded, {}
        for version, runner in loaded.items():
            self._keep(version, runner)
        self._loading = {v: t for v, t in self._loading.items() if t.is_alive()}

    def _current(self) -> tuple[int, BatchRunner]:
        # 1. When due: Triton's READY version, and the newest version on disk, loading in the background.
        if self._due():
            self.idle()
            self._resolve()
            versions = versions_on_disk(self.model_dir)
            newest = next((v for v in versions if (self.model_dir / str(v) / ENGINE_FILE).is_file()), None)
            for version in {self.version, newest} - {None}:
                self._load_in_background(version)  # type: ignore[arg-type]
        self._collect()
        # 2. The READY version when a request joined (or nothing is loaded yet): waiting for its load.
        ready = self.version
        if ready not in self.runners and (self._sync or not self.runners):
            if ready in self._loading:
                self._loading[ready].join()
                self._collect()
            if ready not in self.runners:
                self._keep(ready, self.load(ready))
        self._sync = False
        # 3. The READY version once it is loaded; until then the one running.
        if ready in self.runners:
            if ready != self.running and self.running >= 0:
                log.info("%s: the denoising loop runs version %d now", self.model, ready)
            self.running = ready
        self.runners.move_to_end(self.running)
        return self.running, self.runners[self.running]

    def __call__(self, *arrays: np.ndarray, adapters: AdapterSet | None = None) -> np.ndarray:
        """The engine's first output for its inputs in contract order (with `adapters`' weights)."""
        return self.run_all(*arrays, adapters=adapters)[self.spec.outputs[0].name]

    def run_all(self, *arrays: np.ndarray, adapters: AdapterSet | None = None) -> Outputs:
        """The engine's outputs for its inputs in contract order; `adapters`: LoRA adapters' weight
        deltas added for this call (BatchRunner.run_adapted)."""
        version, runner = self._current()
        feeds = dict(zip((t.name for t in self.spec.inputs), arrays, strict=True))
        started = time.perf_counter()
        outputs = runner.run(feeds) if adapters is None else runner.run_adapted(feeds, adapters)
        if self.timer:
            self.timer.add(time.perf_counter() - started, len(arrays[0]))
        self.last = self.provenance(version)
        return outputs

    def call_each(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        """The first output of a one-input engine (the VAE decoder) for each input: inputs of one shape
        run together, in calls of up to `max_batch` rows (BatchRunner.run_each). A call that fails
        gives its inputs its error; the others get their outputs."""
        version, runner = self._current()
        name, output = self.spec.inputs[0].name, self.spec.outputs[0].name
        ran = runner.run_each([{name: array} for array in inputs], self.max_batch)
        self.last = self.provenance(version)
        return [r if isinstance(r, Exception) else r[output] for r in ran]


class InlineTimer:
    """The inline UNet calls' count, time and rows as Triton metrics (counters labelled by the loop's
    model). Kept here and sent every RESOLVE_EVERY_S and when the loop idles, not per call: each metric
    update is a round trip to Triton."""

    METRICS = (
        (
            c.INLINE_UNET_CALLS_METRIC,
            "UNet calls the denoising loop ran in its own process (inline UNet path)",
        ),
        (c.INLINE_UNET_US_METRIC, "Microseconds those inline UNet calls took"),
        (c.INLINE_UNET_ROWS_METRIC, "Batch rows those inline UNet calls carried"),
    )

    def __init__(self, owner: str) -> None:
        kind = pb_utils.MetricFamily.COUNTER
        # a family must outlive its metrics
        self.families = [pb_utils.MetricFamily(name=n, description=d, kind=kind) for n, d in self.METRICS]
        self.metrics = [family.Metric(labels={"model": owner}) for family in self.families]
        self.pending = [0.0, 0.0, 0.0]  # calls, microseconds, rows

    def add(self, seconds: float, rows: int) -> None:
        self.pending = [self.pending[0] + 1, self.pending[1] + 1e6 * seconds, self.pending[2] + rows]

    def flush(self) -> None:
        if self.pending[0]:
            for metric, value in zip(self.metrics, self.pending, strict=True):
                metric.increment(value)
            self.pending = [0.0, 0.0, 0.0]


def live_unet(params: BatchingParams, args: dict[str, Any], config: PipelineConfig) -> LiveEngine:
    """The UNet of a denoising loop's config (`unet_model`, `unet_path`), for the model's architecture."""
    if params.unet_path not in UNET_PATHS:
        raise ValueError(
            f"parameters.unet_path must be one of {', '.join(UNET_PATHS)}, got {params.unet_path!r}"
        )
    model_dir = version_dir(args).parents[1] / params.unet_model  # the export names it in the pipeline
    spec = c.models(config.architecture)[c.UNET.name]
    if params.unet_path == "inline":
        return InlineEngine(
            params.unet_model, model_dir, spec, owner=json.loads(args["model_config"])["name"]
        )
    return PinnedUNet(params.unet_model, model_dir, spec)


class TextEncoder:
    """A loop's text encoder: its engine in this process on the inline UNet path, or (`inline` None) the
    bls path's BLS call to Triton's `text_encoder` model; SD's one encoder or SDXL's two."""

    def __init__(self, config: PipelineConfig, inline: InlineEngine | None) -> None:
        self.spec = c.models(config.architecture)[c.TEXT_ENCODER.name]
        self.model = config.name_of(c.TEXT_ENCODER.name)  # Triton's model, in the loop's pipeline
        self.inline = inline
        # the token ids it takes, one array per tokenizer (SDXL: two)
        self.tokenizers = sum(t.name.startswith("input_ids") for t in self.spec.inputs)
        self.widths = list(config.text_widths or [])  # each encoder's: its learned vectors' width

    def __call__(
        self,
        *input_ids: np.ndarray,
        clip_skips: np.ndarray | None = None,
        vectors: Sequence[np.ndarray | None] = (),
        adapters: AdapterSet | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids (one array per tokenizer, [rows, 77 x k]: k chunks) -> (the prompt embeddings [rows,
        77 x k, D], the chunks' outputs side by side; SDXL's pooled embeddings, the first chunk's);
        `clip_skips`: each row's clip skip [rows, 1] (CLIP_SKIPS; none: 0); `vectors`: per encoder, each
        row's learned token vectors [rows, E, width] (TOKEN_EMBEDDINGS, _2; none: no learned tokens);
        `adapters`: with LoRA adapters' text-encoder weights (the inline path only)."""
        names = [t.name for t in self.spec.outputs]
        rows, length = input_ids[0].shape
        if length % c.TOKEN_LENGTH:
            raise InvalidRequest(c.INPUT_IDS.name, f"must be [rows, 77 x chunks], got {[rows, length]}")
        chunks = length // c.TOKEN_LENGTH
        skips = np.zeros((rows, 1), np.int32) if clip_skips is None else np.asarray(clip_skips, np.int32)
        if skips.shape != (rows, 1):
            raise InvalidRequest(c.CLIP_SKIPS.name, f"must be [{rows}, 1], got {list(skips.shape)}")
        ids = [ids.reshape(-1, c.TOKEN_LENGTH) for ids in input_ids]  # one chunk a row
        tables = []
        given = [*vectors, None, None]  # an encoder's absent: no learned tokens
        specs = (c.TOKEN_EMBEDDINGS, c.TOKEN_EMBEDDINGS_2)
        for spec, table, width in zip(specs, given, self.widths, strict=False):
            table = np.zeros((rows, 1, width), np.float32) if table is None else np.asarray(table, np.float32)
            if table.ndim != 3 or table.shape[0] != rows or table.shape[2] != width or not table.shape[1]:
                raise InvalidRequest(spec.name, f"must be [{rows}, E >= 1, {width}], got {list(table.shape)}")
            tables.append(np.repeat(table, chunks, axis=0))
        by_name = {
            "input_ids": ids[0],
            "clip_skip": np.repeat(skips, chunks, axis=0),
            "input_ids_2": ids[-1],
            **dict(zip(("token_embeddings", "token_embeddings_2"), tables, strict=False)),
        }
        arrays = [by_name[t.name] for t in self.spec.inputs]
        if self.inline is None:
            if adapters is not None:
                raise InvalidRequest(c.LORAS.name, "adapters need the inline UNet path (unet_path inline)")
            feeds = dict(zip((t.name for t in self.spec.inputs), arrays, strict=True))
            outputs = bls_infer_all(self.model, feeds, names)
        else:
            self.inline.refresh()
            outputs = self.inline.run_all(*arrays, adapters=adapters)
        embeds = outputs[names[0]]
        embeds = embeds.reshape(rows, length, embeds.shape[-1])
        pooled = outputs[names[1]].reshape(rows, chunks, -1)[:, 0] if len(names) > 1 else None
        return embeds, pooled


def inline_text_and_image(
    params: BatchingParams, args: dict[str, Any], config: PipelineConfig
) -> tuple[TextEncoder, InlineEngine | None]:
    """A loop's text encoder and VAE decoder: run in its process on the inline UNet path; on the bls
    path the text encoder calls Triton's model, and no decoder (`run_engine` calls Triton's)."""
    text = TextEncoder(config, None)
    if params.unet_path != "inline":
        return text, None
    models = version_dir(args).parents[1]
    text.inline = InlineEngine(text.model, models / text.model, text.spec)
    decoder = config.name_of(c.VAE_DECODER.name)
    return text, InlineEngine(decoder, models / decoder, c.VAE_DECODER)


@dataclass(frozen=True)
class Conditioning:
    """A request's inputs that shape its text conditioning, read and checked before anything runs: an
    SDXL model's time ids (None for SD, which refuses the size inputs) and whether a negative prompt came."""

    time_ids: np.ndarray | None
    negative_prompt_given: bool

    @classmethod
    def read(cls, request: Any, config: PipelineConfig, params: GenerationParams) -> Conditioning:
        from sd_triton.runtime.denoise import size_conditioning  # torch: not for the engines' stubs

        sizes, negative = (
            get_array(request, c.SIZE_CONDITIONING),
            get_array(request, c.NEGATIVE_SIZE_CONDITIONING),
        )
        scores = (get_scalar(request, c.AESTHETIC_SCORE), get_scalar(request, c.NEGATIVE_AESTHETIC_SCORE))
        ids = size_conditioning(
            params, config, sizes, negative, *(None if s is None else float(s) for s in scores)
        )
        return cls(ids, get_array(request, c.NEGATIVE_PROMPT) is not None)

    def apply(
        self, config: PipelineConfig, params: GenerationParams, embeds: np.ndarray, pooled: np.ndarray | None
    ) -> tuple[np.ndarray, Any]:
        """The text embeddings and the SDXL conditioning (denoise.AddedConditioning, or None)."""
        from sd_triton.runtime.denoise import sdxl_conditioning

        return sdxl_conditioning(embeds, pooled, params, config, self.time_ids, self.negative_prompt_given)


class Adapters:
    """A loop's LoRA adapters: its pipeline's library, and each request's set read from LORAS (the
    inline UNet path only: the loop's own engines apply them). It answers the control requests for the
    pipeline's libraries too: LoRA adapters, and the textual-inversion embeddings the tokenizer reads (a
    control request to the tokenizer would count as a txt2img request in flight: TritonServer.drain)."""

    def __init__(self, args: dict[str, Any], config: PipelineConfig, inline: bool) -> None:
        models = version_dir(args).parents[1]
        self.library = LoraLibrary(library_dir(models, config.pipeline))
        self.embeddings = embeddings.library_dir(models, config.pipeline)
        self.inline = inline

    def listing(self, request: Any) -> np.ndarray | None:
        """A control request's ENGINES output: the LoRA library's listing (LORA_LIBRARY) or the embedding
        library's (EMBEDDING_LIBRARY), a JSON list; None for any other request."""
        if get_array(request, c.LORA_LIBRARY) is not None:
            listing = self.library.listing()
        elif get_array(request, c.EMBEDDING_LIBRARY) is not None:
            listing = [record.summary() for record in embeddings.records(self.embeddings)]
        else:
            return None
        return np.array([json.dumps(listing).encode()], dtype=object)

    def read(self, request: Any) -> AdapterSet | None:
        text = get_scalar(request, c.LORAS)
        if text is None:
            return None
        adapters = self.library.resolve(decode_text(c.LORAS.name, text))
        if adapters is not None and not self.inline:
            raise InvalidRequest(c.LORAS.name, "adapters need the inline UNet path (this loop's is bls)")
        return adapters


def weighted_embeds(embeds: np.ndarray, weights: np.ndarray | None, config: PipelineConfig) -> np.ndarray:
    """The prompt embeddings with the tokenizer's TOKEN_WEIGHTS applied (prompts.weighted: each of the
    pipeline's text encoders' part on its own), checked to be one weight per token."""
    if weights is not None and (weights.ndim != 2 or weights.shape != embeds.shape[:2]):
        raise InvalidRequest(
            c.TOKEN_WEIGHTS.name,
            f"must be one per token, {list(embeds.shape[:2])}, got {list(weights.shape)}",
        )
    return prompts.weighted(embeds, weights, config.text_widths or ())


class Controls:
    """A loop's ControlNets: its pipeline's (ControlNetLibrary, run with the UNet engine's settings), and
    each request's read from CONTROLNETS and CONTROL_IMAGES (the inline UNet path only)."""

    def __init__(self, params: BatchingParams, args: dict[str, Any], config: PipelineConfig) -> None:
        """The library lives in the pipeline's denoise model folder (txt2img_stream reads it there too)."""
        models = version_dir(args).parents[1]
        engine = EngineParams.from_parameters(
            pbtxt_parameters((models / params.unet_model / CONFIG_FILE).read_text())
        )
        self.library = ControlNetLibrary(models / config.name_of(c.DENOISE.name), engine)
        self.inline = params.unet_path == "inline"

    def read(self, request: Any, params: GenerationParams) -> JobControl | None:
        text, images = get_scalar(request, c.CONTROLNETS), get_array(request, c.CONTROL_IMAGES)
        if text is None and images is None:
            return None
        refs = control.parse_refs(decode_text(c.CONTROLNETS.name, text) if text is not None else "")
        job = job_control(refs, images, params, self.library.names)
        if job is not None and not self.inline:
            raise InvalidRequest(c.CONTROLNETS.name, "ControlNets need the inline UNet path (this is bls)")
        return job

    def unet(self, unet: LiveEngine) -> Any:
        """The loop's UNet callable: with the ControlNets where the pipeline has any."""
        return ControlledUNet(unet, self.library) if self.library.names and self.inline else unet


def read_handoff(request: Any, params: GenerationParams, config: PipelineConfig) -> Any:
    """A base + refiner request's hand-off (denoise.Handoff: DENOISING_END on the base; DENOISING_START
    and START_LATENTS on the refiner), checked before anything runs; None without one."""
    end, start = get_scalar(request, c.DENOISING_END), get_scalar(request, c.DENOISING_START)
    latents = get_array(request, c.START_LATENTS)
    if end is None and start is None and latents is None:
        return None
    from sd_triton.runtime.denoise import Handoff  # torch: not for the engines' stubs

    handoff = Handoff(
        end=None if end is None else float(end),
        start=None if start is None else float(start),
        latents=latents,
    )
    if latents is not None:
        scale = config.vae_scale_factor
        expected = [params.num_images, config.latent_channels, params.height // scale, params.width // scale]
        if list(latents.shape) != expected:
            raise InvalidRequest(
                c.START_LATENTS.name,
                f"must be [NUM_IMAGES, C, HEIGHT/8, WIDTH/8] = {expected}, got {list(latents.shape)}",
            )
        if get_array(request, c.IMAGE) is not None:
            raise InvalidRequest(c.DENOISING_START.name, "starts from START_LATENTS, not from an IMAGE")
    return handoff


class ImageEncoder:
    """A loop's VAE encoder for image-to-image and inpainting requests: in its process on the inline UNet
    path, Triton's `vae_encoder` model by BLS on the bls path. A repository exported before image inputs
    has neither: its image requests are refused, naming the input."""

    def __init__(self, params: BatchingParams, args: dict[str, Any], config: PipelineConfig) -> None:
        self.model = config.name_of(c.VAE_ENCODER.name)
        folder = version_dir(args).parents[1] / self.model
        self.config = config
        self.available = (folder / CONFIG_FILE).is_file()
        inline = self.available and params.unet_path == "inline"
        self.engine = InlineEngine(self.model, folder, c.VAE_ENCODER) if inline else None

    def read(self, request: Any, params: GenerationParams) -> PendingImage | None:
        """The request's init image, strength and mask, checked (shapes, the strength and the steps it
        leaves) before anything runs; None for text-to-image."""
        image, mask = get_array(request, c.IMAGE), get_array(request, c.MASK)
        if self.config.inpainting_unet and (image is None or mask is None):
            missing = c.IMAGE if image is None else c.MASK
            raise InvalidRequest(
                missing.name, f"this is an inpainting model: send {c.IMAGE.name} and {c.MASK.name}"
            )
        if image is None:
            for spec, given in ((c.STRENGTH, params.strength is not None), (c.MASK, mask is not None)):
                if given:
                    raise InvalidRequest(
                        spec.name, f"applies to an init image ({c.IMAGE.name}); none was sent"
                    )
            return None
        if not self.available:
            raise InvalidRequest(
                c.IMAGE.name, f"this export has no {c.VAE_ENCODER.name} (re-export the model)"
            )
        expected = (params.height, params.width, 3)
        if image.shape != expected:
            raise InvalidRequest(
                c.IMAGE.name, f"must be [HEIGHT, WIDTH, 3] = {list(expected)}, got {list(image.shape)}"
            )
        if mask is not None and mask.shape != expected[:2]:
            raise InvalidRequest(
                c.MASK.name, f"must be [HEIGHT, WIDTH] = {list(expected[:2])}, got {list(mask.shape)}"
            )
        strength = c.DEFAULT_STRENGTH if params.strength is None else params.strength
        start_step(params.steps, strength)
        return PendingImage(image, strength, mask)

    def encode(self, read: PendingImage | None) -> Any:
        """What `read` gave through the VAE encoder: an InitImage (sd_triton.runtime.denoise), or None.
        Inpainting with an inpainting UNet encodes the masked image too (in the same call)."""
        if read is None:
            return None
        from sd_triton.runtime.denoise import encode_init_image  # torch: not for the engines' stubs

        def encoder(pixels: np.ndarray) -> np.ndarray:
            return run_engine(c.VAE_ENCODER, self.engine, pixels, self.model)

        return encode_init_image(read.image, read.strength, read.mask, self.config, encoder)


def run_engine(
    spec: ModelSpec, inline: InlineEngine | None, array: np.ndarray, model: str | None = None
) -> np.ndarray:
    """The first output of the engine model `spec` (one input): run by `inline`, on the version live now,
    or without it by a BLS call to Triton's model (`model`: its name in the pipeline; spec's by default).
    An engine's error raises."""
    if inline is None:
        return bls_infer(model or spec.name, {spec.inputs[0].name: array}, spec.outputs[0].name)
    inline.refresh()
    return inline(array)


@dataclass(frozen=True)
class PendingImage:
    """An image request's inputs as read and checked, before the VAE encoder runs."""

    image: np.ndarray  # uint8 [H, W, 3]
    strength: float
    mask: np.ndarray | None = None  # uint8 [H, W]


class EngineLog:
    """The engines one request's UNet calls ran on, in order, without repeats: its ENGINES output."""

    def __init__(self) -> None:
        self.engines: list[dict[str, Any]] = []

    def add(self, provenance: dict[str, Any] | None) -> None:
        if provenance is not None and (not self.engines or self.engines[-1] != provenance):
            self.engines.append(provenance)

    def array(self) -> np.ndarray:
        return np.array([json.dumps(self.engines).encode()], dtype=object)
