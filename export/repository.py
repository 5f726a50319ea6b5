"""config.pbtxt for every model of the repository, generated from the tensor contract.

Configs are built as Triton's own ModelConfig protobuf (from tritonclient) and written as text,
so a field name or an enum value Triton does not know fails here, not at server start.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sd_triton import contract as c
from sd_triton.engine_record import EngineRecord
from sd_triton.export.quantize import INT8_COMPONENTS, INT8_FILE
from sd_triton.lora import LORA_COMPONENTS
from sd_triton.model_params import BatchingParams, DenoiseParams, EngineParams, TokenizerParams
from sd_triton.served_model import ServedModel

Precision = Literal["fp32", "fp16"]
# How requests share UNet calls (docs/batching.md):
#   none       - every UNet call carries one request (no dynamic batching on the engines);
#   dynamic    - Triton's dynamic batcher merges the UNet calls of the loops in flight (denoise_instances);
#   continuous - one denoise instance batches every active request per step; requests join at any step.
Batching = Literal["none", "dynamic", "continuous"]
BATCHING_MODES: tuple[Batching, ...] = ("none", "dynamic", "continuous")
UnetPath = Literal["auto", "inline", "bls"]
UNET_PATH_CHOICES: tuple[UnetPath, ...] = ("auto", "inline", "bls")
CONFIG_FILE = "config.pbtxt"
# an engine config's parameter: its artifact's sha256 (provenance, and the gateway's cache key); never in
# a committed config, as the same export gives other bytes on another CPU (tests/export/test_contract.py)
ARTIFACT_SHA256 = "artifact_sha256"
MANIFEST = "manifest.json"  # what the export made, and the live engine versions (export/pipeline.py)


def manifest_file(pipeline: str = "") -> str:
    """The manifest of a pipeline: manifest.json (the unnamed one), manifest.NAME.json."""
    return f"manifest.{pipeline}.json" if pipeline else MANIFEST


# The ensemble's data flow, step by step: (model, {model input: ensemble tensor}, {model output: ensemble
# tensor}). On the inline UNet path the denoising loop runs the text encoder and the VAE decoder in its
# own process too (IMAGES from the tokenizer's ids); on the bls path each is a step of its own. SDXL adds
# the second tokenizer's ids and the pooled embeddings between the steps.
Step = tuple[str, dict[str, str], dict[str, str]]
# the request's inputs the denoising loop reads (SD's loop refuses SDXL's, naming them)
_PARAMS = {
    t.name: t.name
    for t in (
        *c.DENOISE_GENERATION_INPUTS,
        *c.DENOISE_IMAGE_INPUTS,
        *c.DENOISE_HANDOFF_INPUTS,
        *c.DENOISE_LORA_INPUTS,
        *c.DENOISE_CONTROL_INPUTS,
        c.SIZE_CONDITIONING,
        c.NEGATIVE_SIZE_CONDITIONING,
        c.AESTHETIC_SCORE,
        c.NEGATIVE_AESTHETIC_SCORE,
        c.NEGATIVE_PROMPT,
    )
    if t is not c.PROMPT_EMBEDS
}


def ensemble_steps(unet_path: str, architecture: str = "sd") -> tuple[Step, ...]:
    """txt2img's steps for a denoising loop on that UNet path, for a model of that architecture."""
    second = architecture == "sdxl"  # a second tokenizer (a refiner has SDXL's second alone, as its first)
    ids = {c.INPUT_IDS.name: "input_ids", **({c.INPUT_IDS_2.name: "input_ids_2"} if second else {})}
    # the learned token vectors, a table per text encoder (as the ids)
    vectors = {
        c.TOKEN_EMBEDDINGS.name: "token_embeddings",
        **({c.TOKEN_EMBEDDINGS_2.name: "token_embeddings_2"} if second else {}),
    }
    tokenizer = (
        c.TOKENIZER.name,
        {t.name: t.name for t in c.TOKENIZER.inputs},
        {
            **ids,
            **vectors,
            c.TOKEN_WEIGHTS.name: "token_weights",
            c.CLIP_SKIPS.name: "clip_skips",
            c.PROMPT_TRUNCATED_TOKENS.name: c.PROMPT_TRUNCATED_TOKENS.name,
            c.NEGATIVE_PROMPT_TRUNCATED_TOKENS.name: c.NEGATIVE_PROMPT_TRUNCATED_TOKENS.name,
        },
    )
    weights = {c.TOKEN_WEIGHTS.name: "token_weights"}  # applied to the embeddings by the loop
    skips = {c.CLIP_SKIPS.name: "clip_skips"}  # the inline text encoder's
    if unet_path == "inline":
        outputs = {
            c.IMAGES.name: c.IMAGES.name,
            c.ENGINES.name: c.ENGINES.name,
            c.LATENTS.name: c.LATENTS.name,
        }
        return tokenizer, (c.DENOISE.name, {**ids, **vectors, **weights, **skips, **_PARAMS}, outputs)
    encoder = c.models(architecture)[c.TEXT_ENCODER.name]
    tensors = [*ids.values()]  # the engine's id inputs by position: input_ids[, input_ids_2]
    tables = [*vectors.values()]
    encoder_inputs = {
        "input_ids": tensors[0],
        "clip_skip": "clip_skips",
        "token_embeddings": tables[0],
        "input_ids_2": tensors[-1],
        "token_embeddings_2": tables[-1],
    }
    pooled = {c.POOLED_EMBEDS.name: "pooled_embeds"} if c.added_conditioning(architecture) else {}
    embeds = {c.PROMPT_EMBEDS.name: "prompt_embeds", **pooled}
    return (
        tokenizer,
        (
            encoder.name,
            {t.name: encoder_inputs[t.name] for t in encoder.inputs},
            {t.name: value for t, value in zip(encoder.outputs, embeds.values(), strict=True)},
        ),
        (
            c.DENOISE.name,
            {**embeds, **weights, **_PARAMS},
            {c.LATENTS.name: c.LATENTS.name, c.ENGINES.name: c.ENGINES.name},
        ),
        (c.VAE_DECODER.name, {"latent_sample": c.LATENTS.name}, {"sample": "decoded"}),
        (c.POSTPROCESS.name, {c.DECODED.name: "decoded"}, {c.IMAGES.name: c.IMAGES.name}),
    )


@dataclass(frozen=True)
class RepositorySettings:
    """Everything config.pbtxt depends on besides the contract."""

    engines: dict[str, c.EngineKind] = field(
        default_factory=lambda: dict.fromkeys(c.ENGINE_MODELS, "python-ort")
    )
    max_batch: dict[str, int] = field(default_factory=dict)  # per engine model; from its profile
    precision: Precision = "fp32"
    ort_tensorrt: bool = False  # onnxruntime kind: run through ORT's TensorRT execution accelerator
    batching: Batching = "continuous"
    max_batch_rows: int = 16  # continuous: UNet rows (latents) per call; the UNet's max batch at least this
    max_wait_us: int = 0  # continuous: wait this long for arrivals before a step below max_batch_rows
    denoise_instances: int = 2  # none / dynamic: request loops in flight at once
    engine_instances: int = 1
    max_queue_delay_us: int = 2000  # Triton's dynamic batching window (none: unused; continuous: 0)
    int8: tuple[str, ...] = ()  # components served INT8-quantized (ONNX Runtime engines; export/quantize.py)
    fp16: tuple[str, ...] = ()  # components served FP16 (TensorRT) in an otherwise FP32 repository
    fp32: tuple[str, ...] = ()  # components kept FP32 in an FP16 repository (a VAE that overflows in FP16)
    architecture: c.Architecture = "sd"  # the checkpoint's (contract.models): which engine contracts
    pipeline: str = ""  # the pipeline's name: its models are NAME_<model> ("": the plain names)
    # How the denoising loops reach the UNet engine (docs/engines.md, "The UNet path"): inline (the
    # loop's process runs the live version itself), bls (a BLS call to the unet model per step), or
    # auto: inline where the loop batches continuously, bls where Triton's dynamic batcher merges loops
    unet_path: UnetPath = "auto"
    # TensorRT plans of the components LoRA adapters change (unet, text_encoder) built refittable: the
    # inline path refits them per adapter set (README, LoRA adapters); off, adapter requests are refused
    tensorrt_refit: bool = False

    def refit(self, component: str) -> bool:
        """Whether the component's TensorRT plan is built refittable."""
        return self.tensorrt_refit and component in LORA_COMPONENTS

    def __post_init__(self) -> None:
        for model, kind in self.engines.items():
            if model not in c.ENGINE_MODELS:
                raise ValueError(f"engines: {model!r} is not an engine model ({', '.join(c.ENGINE_MODELS)})")
            if kind not in c.ENGINE_KINDS:
                raise ValueError(
                    f"engines[{model}]: unknown engine kind {kind!r} ({', '.join(c.ENGINE_KINDS)})"
                )
        missing = set(c.ENGINE_MODELS) - set(self.engines)
        if missing:
            raise ValueError(f"engines: no engine kind for {', '.join(sorted(missing))}")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {self.precision!r}")
        c.check_pipeline_name(self.pipeline)
        if self.architecture not in c.ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(c.ARCHITECTURES)}, got {self.architecture!r}"
            )
        fp16 = [m for m in self.engines if m not in self.fp32] if self.precision == "fp16" else self.fp16
        for model in fp16:
            kind = self.engines.get(model)
            if not (kind == "tensorrt" or (kind == "onnxruntime" and self.ort_tensorrt)):
                what = "precision=fp16" if self.precision == "fp16" else "fp16"
                raise ValueError(
                    f"{what} needs TensorRT: engines[{model}] is {kind!r} "
                    "(use tensorrt, or onnxruntime with the TensorRT accelerator)"
                )
            if model in self.int8:
                raise ValueError(f"fp16: {model} is also in int8; a component has one precision")
        for model in self.int8:
            if model not in INT8_COMPONENTS:
                raise ValueError(f"int8: {model!r} cannot be INT8; only {', '.join(INT8_COMPONENTS)}")
            if self.engines[model] not in ("python-ort", "onnxruntime") or self.ort_tensorrt:
                raise ValueError(
                    f"int8: {model} runs on {self.engines[model]!r}; INT8 graphs need an ONNX Runtime engine "
                    "(python-ort, or onnxruntime without the TensorRT accelerator)"
                )
        if self.unet_path not in UNET_PATH_CHOICES:
            choices = ", ".join(UNET_PATH_CHOICES)
            raise ValueError(f"unet_path must be one of {choices}, got {self.unet_path!r}")
        if self.unet_path == "inline" and self.batching == "dynamic":
            raise ValueError(
                "unet_path=inline cannot go with batching=dynamic: dynamic batching merges the loops' UNet "
                "calls in the unet model, which only the bls path calls (use continuous or none)"
            )
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")
        for name in ("denoise_instances", "engine_instances", "max_batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_us", "max_queue_delay_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def name_of(self, model: str) -> str:
        """A model's name in the repository (its pipeline's prefix)."""
        return c.model_name(self.pipeline, model)

    def unet_path_of(self, model: str) -> str:
        """The UNet path a denoising loop (`denoise`, `txt2img_stream`) is configured with."""
        if self.unet_path != "auto":
            return self.unet_path
        continuous = self.batching == "continuous" or model == c.TXT2IMG_STREAM.name
        return "inline" if continuous else "bls"

    def precision_of(self, model: str) -> str:
        if model in self.int8:
            return "int8"
        if model in self.fp32:
            return "fp32"
        return "fp16" if model in self.fp16 else self.precision

    def artifact_of(self, model: str) -> str:
        """The file (python-torch: the diffusers folder) the model's engine loads from its version folder."""
        if self.engines[model] == "tensorrt":
            return "model.plan"
        if self.engines[model] == "python-torch":  # several folders (SDXL's text encoders): in weights/
            folders = c.checkpoint_subfolders(model, self.architecture)
            return folders[0] if len(folders) == 1 else "weights"
        return INT8_FILE if model in self.int8 else "model.onnx"

    def queue_delay_us(self, model: str) -> int | None:
        """The dynamic batching window of an engine model; None: no dynamic batching."""
        if self.batching == "none":
            return None
        if self.batching == "continuous":
            # denoise's batcher sends the UNet whole batches: no second batcher in the way. The text
            # encoder and the VAE batch what is queued when they are free (requests that joined or
            # finished in the same iteration arrive together) and never wait for more: a window here cost
            # every request 2 x the window at low load (issue 20)
            return None if model == c.UNET.name else 0
        return self.max_queue_delay_us


# Every python model's `model.py` is one import of the runtime module that implements it (thin model.py
# files over tested package code). The export writes them from this table, so an installed wheel writes
# the same files as this checkout; the committed model_repository/*/1/model.py are what it writes.
_ENGINE_MODEL_PY = (
    "sd_triton.runtime.triton_engine",
    'Runs this version\'s engine when config.pbtxt says `backend: "python"`: the ONNX graph with ONNX\n'
    "Runtime (kind python-ort) or the PyTorch module from the diffusers weights (parameter\n"
    "`engine: python-torch`); ignored by the onnxruntime and tensorrt kinds.",
)
PYTHON_MODELS: dict[str, tuple[str, str]] = {
    c.TOKENIZER.name: (
        "sd_triton.runtime.triton_tokenizer",
        "Step 1 of txt2img: CLIP tokenization of prompt and negative prompt.",
    ),
    c.DENOISE.name: (
        "sd_triton.runtime.triton_denoise",
        "Step 3 of txt2img: the scheduler loop (continuous batching or one request at a time), running\n"
        "the live `unet` engine each step: in this process (unet_path inline, with the text encoder\n"
        "and the VAE decoder) or through BLS (bls).",
    ),
    c.POSTPROCESS.name: (
        "sd_triton.runtime.triton_postprocess",
        "Step 5 of txt2img: VAE output to UINT8 NHWC images.",
    ),
    c.TXT2IMG_STREAM.name: (
        "sd_triton.runtime.triton_stream",
        "txt2img with one streamed response per denoising step (decoupled).",
    ),
    **dict.fromkeys(c.ENGINE_MODELS, _ENGINE_MODEL_PY),
}
MODEL_PY = "model.py"


def model_py_text(model: str) -> str:
    """The `model.py` of a python model (for engine models: read only by the python kinds)."""
    module, doc = PYTHON_MODELS[model]
    return (
        f'"""{doc}\nThe code lives in {module} (written by `sd-triton export`)."""\n\n'
        f"from {module} import TritonPythonModel  # noqa: F401\n"
    )


def write_model_py(version_dir: Path, model: str) -> Path:
    """Write a python model's model.py into one of its version folders (unless unchanged)."""
    path = version_dir / MODEL_PY
    path.parent.mkdir(parents=True, exist_ok=True)
    text = model_py_text(model)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def _tensor(message: type, spec: c.TensorSpec) -> object:
    tensor = message(name=spec.name, data_type=mc.DataType.Value(spec.dtype), dims=list(spec.dims))
    if spec.optional:
        tensor.optional = True
    return tensor


def _base(spec: c.ModelSpec, max_batch: int = 0) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, max_batch_size=max_batch)
    config.input.extend(_tensor(mc.ModelInput, t) for t in spec.inputs)
    config.output.extend(_tensor(mc.ModelOutput, t) for t in spec.outputs)
    return config


def _python_step(spec: c.ModelSpec, count: int = 1) -> mc.ModelConfig:
    config = _base(spec)
    config.backend = "python"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)
    return config


def engine_config(
    spec: c.ModelSpec, settings: RepositorySettings, record: EngineRecord | None = None
) -> mc.ModelConfig:
    """`record`: the version folder Triton serves (version_policy specific) and its artifact's hash."""
    kind = settings.engines[spec.name]
    config = _base(spec, settings.max_batch.get(spec.name, c.Limits().max_unet_batch))
    if record is not None:
        config.version_policy.specific.versions.append(record.version)
        config.parameters[ARTIFACT_SHA256].string_value = record.sha256
    delay = settings.queue_delay_us(spec.name)
    if delay is not None:
        config.dynamic_batching.SetInParent()  # present even with a zero window
        config.dynamic_batching.max_queue_delay_microseconds = delay
    count = settings.engine_instances
    precision = settings.precision_of(spec.name)
    if kind in c.PYTHON_KINDS:
        config.backend = "python"
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)
        params = EngineParams(precision=precision, engine=kind, model_file=settings.artifact_of(spec.name))
        _set_parameters(config, params.to_parameters())
        return config
    config.parameters["precision"].string_value = precision
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=count)
    config.default_model_filename = settings.artifact_of(spec.name)
    if kind == "tensorrt":
        config.platform = "tensorrt_plan"
        return config
    config.platform = "onnxruntime_onnx"
    if settings.ort_tensorrt:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accelerator.parameters["precision_mode"] = settings.precision_of(spec.name).upper()
        accelerator.parameters["max_workspace_size_bytes"] = str(4 << 30)
    return config


def _set_parameters(config: mc.ModelConfig, params: dict[str, str]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = value


def ensemble_config(unet_path: str, architecture: str = "sd", pipeline: str = "") -> mc.ModelConfig:
    """txt2img for a denoising loop on that UNet path (ensemble_steps), over its pipeline's models."""
    config = _base(c.TXT2IMG)
    config.platform = "ensemble"
    for model, inputs, outputs in ensemble_steps(unet_path, architecture):
        name = c.model_name(pipeline, model)
        step = config.ensemble_scheduling.step.add(model_name=name, model_version=-1)
        step.input_map.update(inputs)
        step.output_map.update(outputs)
    return config


def all_configs(
    settings: RepositorySettings, served: ServedModel, records: dict[str, EngineRecord] | None = None
) -> dict[str, mc.ModelConfig]:
    """`records`: the served version of each engine model (the export's: version 1)."""
    path = settings.unet_path_of(c.DENOISE.name)
    configs = {c.TXT2IMG.name: ensemble_config(path, settings.architecture, settings.pipeline)}
    _set_parameters(configs[c.TXT2IMG.name], served.to_parameters())
    configs[c.TOKENIZER.name] = _python_step(c.TOKENIZER)
    # the bls path's text_encoder step takes one 77-token chunk per prompt: long prompts need the inline one
    chunks = served.limits.max_prompt_chunks if path == "inline" else 1
    tokenizer = TokenizerParams(max_prompt_chunks=chunks, max_clip_skip=served.max_clip_skip)
    _set_parameters(configs[c.TOKENIZER.name], tokenizer.to_parameters())
    continuous = settings.batching == "continuous"
    denoise = _python_step(c.DENOISE, 1 if continuous else settings.denoise_instances)
    batcher = BatchingParams(
        unet_model=settings.name_of(c.UNET.name),
        max_batch=settings.max_batch_rows,
        max_wait_us=settings.max_wait_us,
    )
    denoise_params = DenoiseParams(
        **vars(replace(batcher, unet_path=settings.unet_path_of(c.DENOISE.name))), batching=settings.batching
    )
    _set_parameters(denoise, denoise_params.to_parameters())
    configs[c.DENOISE.name] = denoise
    # the streaming entry point (async jobs): decoupled, its own continuous batcher whatever the mode
    stream = _python_step(c.TXT2IMG_STREAM)
    stream.model_transaction_policy.decoupled = True
    stream_params = replace(batcher, unet_path=settings.unet_path_of(c.TXT2IMG_STREAM.name))
    _set_parameters(stream, stream_params.to_parameters())
    configs[c.TXT2IMG_STREAM.name] = stream
    configs[c.POSTPROCESS.name] = _python_step(c.POSTPROCESS)
    for name in c.ENGINE_MODELS:
        configs[name] = engine_config(
            c.models(settings.architecture)[name], settings, (records or {}).get(name)
        )
    for model, config in configs.items():  # the pipeline's model names
        config.name = settings.name_of(model)
    return configs


def render(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def engine_params(repo: Path, pipeline: str = "") -> dict[str, EngineParams]:
    """The runtime settings of each engine the python backend runs (python-ort, python-torch), read
    from its config.pbtxt: what the stack runs them with. Engines of Triton's own backends are left out."""
    found = {}
    for name in c.ENGINE_MODELS:
        config = parse((repo / c.model_name(pipeline, name) / CONFIG_FILE).read_text())
        if config.backend == "python":
            found[name] = EngineParams.from_parameters(
                {k: v.string_value for k, v in config.parameters.items()}
            )
    return found


def write_config(repo: Path, config: mc.ModelConfig) -> Path:
    """Write a model's config.pbtxt (unless unchanged)."""
    path = repo / config.name / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "1").mkdir(exist_ok=True)
    text = render(config)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def write_configs(
    repo: Path,
    settings: RepositorySettings,
    served: ServedModel,
    records: dict[str, EngineRecord] | None = None,
) -> list[Path]:
    return [write_config(repo, config) for config in all_configs(settings, served, records).values()]
