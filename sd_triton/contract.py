"""The tensor contract: every Triton model's inputs and outputs, and the request limits.

Torch-free on purpose: `export/` generates `config.pbtxt` from it, the Triton python models read
their tensor names from it, the gateway builds requests from it, and a test checks every
`config.pbtxt` and ONNX graph against it.

Dims follow Triton's convention: for a model with batching (`max_batch_size > 0`) the batch
dimension is left out; -1 is a dimension that varies.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

TOKEN_LENGTH = 77  # CLIP's context length, the same for SD 1.x and 2.x

# Scheduler names a request may give. "default" (also: no SCHEDULER input) runs the checkpoint's own
# scheduler, class and config as its folder ships them (diffusers' behaviour); every other name is that
# diffusers class built from the checkpoint's config plus the options the name implies (its prediction
# type, beta schedule, timestep spacing and offsets carry over). Names follow diffusers' docs and
# AUTOMATIC1111 (dpmpp_2m_karras = "DPM++ 2M Karras").
SchedulerName = Literal[
    "default",
    "ddim",
    "euler",
    "euler_karras",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "dpmpp_sde",
    "dpmpp_sde_karras",
    "deis",
    "lms",
    "lms_karras",
    "pndm",
    "unipc",
    "lcm",
]
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__  # type: ignore[attr-defined]
DEFAULT_SCHEDULER: SchedulerName = "default"
# the diffusers class behind each name but "default" (the gateway's provenance; torch-free, so a test
# checks it against sd_triton.runtime.schedulers, which builds them)
SCHEDULER_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_karras": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler",
    "dpmpp_sde_karras": "DPMSolverSDEScheduler",
    "deis": "DEISMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "lms_karras": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}

EngineKind = Literal["python-ort", "onnxruntime", "tensorrt", "python-torch"]
ENGINE_KINDS: tuple[str, ...] = EngineKind.__args__  # type: ignore[attr-defined]
PYTHON_KINDS = ("python-ort", "python-torch")  # engines run by a model.py in Triton's python backend

# numpy dtype name and Triton wire datatype for each config.pbtxt data type.
NUMPY_DTYPES = {
    "TYPE_FP32": "float32",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_UINT8": "uint8",
    "TYPE_STRING": "object",
    "TYPE_BOOL": "bool",
}
WIRE_DTYPES = {
    "TYPE_FP32": "FP32",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_UINT8": "UINT8",
    "TYPE_STRING": "BYTES",
    "TYPE_BOOL": "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of NUMPY_DTYPES
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def numpy_dtype(self) -> str:
        return NUMPY_DTYPES[self.dtype]

    @property
    def wire_dtype(self) -> str:
        return WIRE_DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: bool  # True: max_batch_size > 0 and dims leave out the batch dimension
    engine: bool  # True: an exported network whose engine kind ops teams choose

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


def _t(name: str, dtype: str, *dims: int, optional: bool = False) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims), optional)


# --- request inputs, shared by the ensemble and the python steps that read them ---
PROMPT = _t("PROMPT", "TYPE_STRING", 1)
NEGATIVE_PROMPT = _t("NEGATIVE_PROMPT", "TYPE_STRING", 1, optional=True)
HEIGHT = _t("HEIGHT", "TYPE_INT32", 1)
WIDTH = _t("WIDTH", "TYPE_INT32", 1)
STEPS = _t("STEPS", "TYPE_INT32", 1)
GUIDANCE_SCALE = _t("GUIDANCE_SCALE", "TYPE_FP32", 1)
SEED = _t("SEED", "TYPE_INT64", 1)
SCHEDULER = _t("SCHEDULER", "TYPE_STRING", 1, optional=True)  # absent or "default": the checkpoint's
NUM_IMAGES = _t("NUM_IMAGES", "TYPE_INT32", 1)
# image-to-image: the init image at the request's height and width (the gateway resizes it), RGB, and
# the share of the schedule run over it (0 < s <= 1; absent: DEFAULT_STRENGTH). No IMAGE: text-to-image
IMAGE = _t("IMAGE", "TYPE_UINT8", -1, -1, 3, optional=True)  # [H, W, 3]
STRENGTH = _t("STRENGTH", "TYPE_FP32", 1, optional=True)
# inpainting: with IMAGE, a mask at the same size, grey levels >= 128 repainted (diffusers binarizes at 0.5)
MASK = _t("MASK", "TYPE_UINT8", -1, -1, optional=True)  # [H, W]
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
# SDXL's size conditioning (the UNet's time ids), diffusers' parameters in pixels: original size (h, w),
# crop top-left (top, left), target size (h, w); absent: (HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH). The
# negative one conditions the unconditional rows (absent: the same as SIZE_CONDITIONING). SDXL models only
SIZE_CONDITIONING = _t("SIZE_CONDITIONING", "TYPE_INT32", 6, optional=True)
NEGATIVE_SIZE_CONDITIONING = _t("NEGATIVE_SIZE_CONDITIONING", "TYPE_INT32", 6, optional=True)
MAX_SIZE_CONDITIONING = 1 << 16  # pixels: a size or crop past this is a client's mistake
# an SDXL refiner's aesthetic-score conditioning (its time ids: original size, crop, score), diffusers'
# defaults; the refiner takes SIZE_CONDITIONING's original size and crop, not its target size
AESTHETIC_SCORE = _t("AESTHETIC_SCORE", "TYPE_FP32", 1, optional=True)
NEGATIVE_AESTHETIC_SCORE = _t("NEGATIVE_AESTHETIC_SCORE", "TYPE_FP32", 1, optional=True)
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5
# base + refiner hand-off (diffusers' denoising_end / denoising_start, 0 < f < 1): a base request with
# DENOISING_END stops once the timesteps fall below (1 - f) of training's and answers its LATENTS too; the
# refiner's request takes them as START_LATENTS [NUM_IMAGES, C, HEIGHT/8, WIDTH/8] with DENOISING_START f
DENOISING_END = _t("DENOISING_END", "TYPE_FP32", 1, optional=True)
DENOISING_START = _t("DENOISING_START", "TYPE_FP32", 1, optional=True)
START_LATENTS = _t("START_LATENTS", "TYPE_FP32", -1, -1, -1, -1, optional=True)
DEFAULT_DENOISING_END = 0.8  # diffusers' documented high_noise_frac for SDXL base + refiner
# LoRA adapters from the pipeline's library (`sd-triton lora add`): JSON [{"name": ..., "scale": ...}]
# (scale default 1, |scale| <= 4, at most 4 adapters); absent or []: the base. The inline UNet path only
LORAS = _t("LORAS", "TYPE_STRING", 1, optional=True)
# a control request to `denoise` carrying only LORA_LIBRARY (true): its ENGINES output is the pipeline's
# adapter library, a JSON list of {name, sha256, rank, components, format, source, created} (the gateway
# reads it with the model configs)
LORA_LIBRARY = _t("LORA_LIBRARY", "TYPE_BOOL", 1, optional=True)
MAX_LORAS = 4  # adapters per request
MAX_LORA_SCALE = 4.0  # |scale| at most: past it an adapter's delta dwarfs the base (a client's mistake)
# ControlNets exported with the pipeline (`sd-triton export --controlnet NAME=PATH`): JSON
# [{"name", "scale", "start", "end"}] (defaults 1, 0, 1; 0 <= scale <= 2, 0 <= start < end <= 1, at most 3)
# and CONTROL_IMAGES [K, HEIGHT, WIDTH, 3], the k-th ControlNet's control image (already preprocessed:
# the map itself). The inline UNet path only
CONTROLNETS = _t("CONTROLNETS", "TYPE_STRING", 1, optional=True)
CONTROL_IMAGES = _t("CONTROL_IMAGES", "TYPE_UINT8", -1, -1, -1, 3, optional=True)
MAX_CONTROLNETS = 3
# how PROMPT and NEGATIVE_PROMPT are read (sd_triton/prompts.py): plain (default: the text as it is) or
# a1111 (AUTOMATIC1111's emphasis syntax and BREAK)
PROMPT_SYNTAX = _t("PROMPT_SYNTAX", "TYPE_STRING", 1, optional=True)
# diffusers' clip_skip: the text encoder's output taken this many layers before its last (SD: then its final
# layer norm; SDXL: before its penultimate); 0 (the default) is the pipeline's usual layer. The tokenizer
# checks it against the export's text encoder and answers it per row (CLIP_SKIPS [rows, 1])
CLIP_SKIP = _t("CLIP_SKIP", "TYPE_INT32", 1, optional=True)
MAX_CONTROL_SCALE = 2.0

# --- pipeline outputs ---
IMAGES = _t("IMAGES", "TYPE_UINT8", -1, -1, -1, 3)  # [N, H, W, 3]
PROMPT_TRUNCATED_TOKENS = _t("PROMPT_TRUNCATED_TOKENS", "TYPE_INT32", 1)
NEGATIVE_PROMPT_TRUNCATED_TOKENS = _t("NEGATIVE_PROMPT_TRUNCATED_TOKENS", "TYPE_INT32", 1)
# provenance: JSON list of the UNet engines that ran the request's steps, in order, each
# {component, version, engine, precision, sha256} (two when an engine swap landed mid-request)
ENGINES = _t("ENGINES", "TYPE_STRING", 1)

# --- progress, streamed by txt2img_stream before its final response ---
PREVIEW = _t("PREVIEW", "TYPE_BOOL", 1, optional=True)  # input: step responses carry PREVIEW_IMAGES
STEP = _t("STEP", "TYPE_INT32", 1)  # denoising steps done (a step response)
STEPS_TOTAL = _t("STEPS_TOTAL", "TYPE_INT32", 1)
PREVIEW_IMAGES = _t("PREVIEW_IMAGES", "TYPE_UINT8", -1, -1, -1, 3)  # [N, H/8, W/8, 3], cheap decode

# a custom metric of Triton's /metrics: txt2img_stream requests in flight (a drain waits for zero)
STREAM_IN_FLIGHT_METRIC = "sd_triton_stream_requests_in_flight"
# The inline UNet path's own timer (Triton's statistics do not see those calls), per denoising loop model:
INLINE_UNET_CALLS_METRIC = "sd_triton_inline_unet_calls"  # UNet calls run in the loop's process
INLINE_UNET_US_METRIC = "sd_triton_inline_unet_compute_us"  # the microseconds they took
INLINE_UNET_ROWS_METRIC = "sd_triton_inline_unet_rows"  # the batch rows they carried

# --- tensors between steps ---
# rows: [uncond,] cond; 77 tokens per chunk (a long prompt: k chunks of 77, sd_triton/prompts.py)
INPUT_IDS = _t("INPUT_IDS", "TYPE_INT32", -1, -1)
# each token's weight (the a1111 prompt syntax's emphasis; 1 for plain prompts), as INPUT_IDS
TOKEN_WEIGHTS = _t("TOKEN_WEIGHTS", "TYPE_FP32", -1, -1, optional=True)
CLIP_SKIPS = _t("CLIP_SKIPS", "TYPE_INT32", -1, 1, optional=True)  # CLIP_SKIP, a row each
# textual inversion (`sd-triton embeddings add`, sd_triton/embeddings.py): the request's learned token vectors
# [rows, E, D], the same table for each row of INPUT_IDS; an id V + e there (V: the text encoder's
# vocabulary size) is row e. A request without embeddings has one zero row. SDXL: TOKEN_EMBEDDINGS_2 for the
# second encoder (its width), the same ids
TOKEN_EMBEDDINGS = _t("TOKEN_EMBEDDINGS", "TYPE_FP32", -1, -1, -1, optional=True)
TOKEN_EMBEDDINGS_2 = _t("TOKEN_EMBEDDINGS_2", "TYPE_FP32", -1, -1, -1, optional=True)
MAX_TOKEN_EMBEDDINGS = 128  # learned vectors one request may use (its text encoder profile's max)
# a control request to `denoise` carrying only EMBEDDING_LIBRARY (true): its ENGINES output is the
# pipeline's textual-inversion library (the tokenizer model's), a JSON list of {token, sha256, vectors,
# format, source, pipeline, architecture, created}
EMBEDDING_LIBRARY = _t("EMBEDDING_LIBRARY", "TYPE_BOOL", 1, optional=True)
PROMPT_EMBEDS = _t("PROMPT_EMBEDS", "TYPE_FP32", -1, -1, -1)
# SDXL: the second tokenizer's ids (same rows), and the second text encoder's pooled embeddings
INPUT_IDS_2 = _t("INPUT_IDS_2", "TYPE_INT32", -1, -1, optional=True)
POOLED_EMBEDS = _t("POOLED_EMBEDS", "TYPE_FP32", -1, -1, optional=True)
LATENTS = _t("LATENTS", "TYPE_FP32", -1, 4, -1, -1)  # already divided by the VAE scaling factor
DECODED = _t("DECODED", "TYPE_FP32", -1, 3, -1, -1)  # VAE output, about [-1, 1]

TXT2IMG = ModelSpec(
    "txt2img",
    inputs=(
        PROMPT,
        NEGATIVE_PROMPT,
        HEIGHT,
        WIDTH,
        STEPS,
        GUIDANCE_SCALE,
        SEED,
        SCHEDULER,
        NUM_IMAGES,
        STRENGTH,
        IMAGE,
        MASK,
        SIZE_CONDITIONING,
        NEGATIVE_SIZE_CONDITIONING,
        AESTHETIC_SCORE,
        NEGATIVE_AESTHETIC_SCORE,
        DENOISING_END,
        DENOISING_START,
        START_LATENTS,
        LORAS,
        CONTROLNETS,
        CONTROL_IMAGES,
        PROMPT_SYNTAX,
        CLIP_SKIP,
    ),
    # LATENTS: the final latents (a hand-off's base passes them to the refiner); ask for them only then
    outputs=(IMAGES, PROMPT_TRUNCATED_TOKENS, NEGATIVE_PROMPT_TRUNCATED_TOKENS, ENGINES, LATENTS),
    batching=False,
    engine=False,
)
# Decoupled: one response per denoising step (STEP, STEPS_TOTAL, PREVIEW_IMAGES when asked), then
# the final one (IMAGES and the truncation counts). Called directly, a client's cancellation stops it.
TXT2IMG_STREAM = ModelSpec(
    "txt2img_stream",
    inputs=(*TXT2IMG.inputs, PREVIEW),
    outputs=(*TXT2IMG.outputs, STEP, STEPS_TOTAL, PREVIEW_IMAGES),
    batching=False,
    engine=False,
)
TOKENIZER = ModelSpec(
    "tokenizer",
    inputs=(PROMPT, NEGATIVE_PROMPT, GUIDANCE_SCALE, PROMPT_SYNTAX, CLIP_SKIP),
    # INPUT_IDS_2 where the model has a second tokenizer (SDXL)
    outputs=(
        INPUT_IDS,
        PROMPT_TRUNCATED_TOKENS,
        NEGATIVE_PROMPT_TRUNCATED_TOKENS,
        dataclasses.replace(INPUT_IDS_2, optional=False),  # (outputs have no optional flag)
        dataclasses.replace(TOKEN_WEIGHTS, optional=False),
        dataclasses.replace(CLIP_SKIPS, optional=False),
        dataclasses.replace(TOKEN_EMBEDDINGS, optional=False),
        dataclasses.replace(TOKEN_EMBEDDINGS_2, optional=False),  # SDXL
    ),
    batching=False,
    engine=False,
)
TEXT_ENCODER = ModelSpec(
    "text_encoder",
    # clip_skip: each row's layers back from the usual output (CLIP_SKIP); token_embeddings: the row's
    # textual-inversion vectors [E, D] (TOKEN_EMBEDDINGS), read for the ids past the vocabulary
    inputs=(
        _t("input_ids", "TYPE_INT32", TOKEN_LENGTH),
        _t("clip_skip", "TYPE_INT32", 1),
        _t("token_embeddings", "TYPE_FP32", -1, -1),
    ),
    outputs=(_t("last_hidden_state", "TYPE_FP32", TOKEN_LENGTH, -1),),
    batching=True,
    engine=True,
)
# A control request to `denoise` carries only CANCEL: the Triton request ids of generations to drop
# (an ensemble's request id reaches its steps, but its cancellation does not reach a running step).
CANCEL = _t("CANCEL", "TYPE_STRING", -1, optional=True)
DENOISE_GENERATION_INPUTS = (PROMPT_EMBEDS, HEIGHT, WIDTH, STEPS, GUIDANCE_SCALE, SEED, SCHEDULER, NUM_IMAGES)
DENOISE_IMAGE_INPUTS = (STRENGTH, IMAGE, MASK)  # optional in every request: image-to-image, inpainting
DENOISE_HANDOFF_INPUTS = (DENOISING_END, DENOISING_START, START_LATENTS)  # optional: base + refiner
DENOISE_LORA_INPUTS = (LORAS,)  # optional: the request's adapters
DENOISE_CONTROL_INPUTS = (CONTROLNETS, CONTROL_IMAGES)  # optional: the request's ControlNets
# optional: the tokens' weights (emphasis), applied to the embeddings; the rows' clip skip and learned token
# vectors (the inline text encoder's inputs)
DENOISE_PROMPT_INPUTS = (TOKEN_WEIGHTS, CLIP_SKIPS, TOKEN_EMBEDDINGS, TOKEN_EMBEDDINGS_2)
# SDXL's: the second text encoder's pooled embeddings (or, inline, the second tokenizer's ids) and the size
# conditioning; NEGATIVE_PROMPT's absence zeroes the unconditional rows where the checkpoint says so
DENOISE_XL_INPUTS = (
    POOLED_EMBEDS,
    INPUT_IDS_2,
    SIZE_CONDITIONING,
    NEGATIVE_SIZE_CONDITIONING,
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    NEGATIVE_PROMPT,
)
DENOISE = ModelSpec(
    "denoise",
    # optional in the config so that a control request may come without them; a generation still
    # needs every one (the model reads them with the required specs). The inline UNet path takes the
    # tokenizer's INPUT_IDS instead of PROMPT_EMBEDS: it runs the text encoder itself
    inputs=(
        *(dataclasses.replace(t, optional=True) for t in (*DENOISE_GENERATION_INPUTS, INPUT_IDS)),
        *DENOISE_IMAGE_INPUTS,
        *DENOISE_XL_INPUTS,
        *DENOISE_HANDOFF_INPUTS,
        *DENOISE_LORA_INPUTS,
        *DENOISE_CONTROL_INPUTS,
        *DENOISE_PROMPT_INPUTS,
        CANCEL,
        LORA_LIBRARY,
        EMBEDDING_LIBRARY,
    ),
    # LATENTS on the bls UNet path (the ensemble decodes them in vae_decoder and postprocess); IMAGES on
    # the inline path, where the loop decodes in its own process
    outputs=(LATENTS, IMAGES, ENGINES),
    batching=False,
    engine=False,
)
UNET = ModelSpec(
    "unet",
    inputs=(
        _t("sample", "TYPE_FP32", -1, -1, -1),  # latents (4), or + mask and masked image (9: inpainting)
        _t("timestep", "TYPE_FP32", 1),
        _t("encoder_hidden_states", "TYPE_FP32", -1, -1),  # 77 tokens per prompt chunk
    ),
    outputs=(_t("noise_pred", "TYPE_FP32", 4, -1, -1),),
    batching=True,
    engine=True,
)
VAE_DECODER = ModelSpec(
    "vae_decoder",
    inputs=(_t("latent_sample", "TYPE_FP32", 4, -1, -1),),
    outputs=(_t("sample", "TYPE_FP32", 3, -1, -1),),
    batching=True,
    engine=True,
)
# image-to-image: images in [-1, 1] -> the parameters of the VAE's latent distribution (mean and
# log-variance stacked on the channel axis, as diffusers' DiagonalGaussianDistribution takes them); the
# denoising loop samples them with each request's generators
VAE_ENCODER = ModelSpec(
    "vae_encoder",
    inputs=(_t("sample", "TYPE_FP32", 3, -1, -1),),
    outputs=(_t("latent_parameters", "TYPE_FP32", -1, -1, -1),),
    batching=True,
    engine=True,
)
# SDXL's engines under the same model names (one model, one name, whatever the architecture): its text
# encoder runs both CLIP encoders on their tokenizers' ids (the penultimate layers' states concatenated,
# and the second encoder's pooled projection), its UNet takes the added conditioning too (the pooled
# embeddings and the size time ids)
TEXT_EMBEDS = _t("text_embeds", "TYPE_FP32", -1)
TEXT_ENCODER_XL = ModelSpec(
    "text_encoder",
    inputs=(
        *TEXT_ENCODER.inputs,
        _t("input_ids_2", "TYPE_INT32", TOKEN_LENGTH),
        _t("token_embeddings_2", "TYPE_FP32", -1, -1),
    ),
    outputs=(*TEXT_ENCODER.outputs, TEXT_EMBEDS),
    batching=True,
    engine=True,
)
# an SDXL refiner has the second encoder only: its tokenizer's ids (as INPUT_IDS) in, the same outputs
TEXT_ENCODER_REFINER = ModelSpec(
    "text_encoder",
    inputs=TEXT_ENCODER.inputs,
    outputs=(*TEXT_ENCODER.outputs, TEXT_EMBEDS),
    batching=True,
    engine=True,
)
UNET_XL = ModelSpec(
    "unet",
    inputs=(*UNET.inputs, TEXT_EMBEDS, _t("time_ids", "TYPE_FP32", -1)),
    outputs=UNET.outputs,
    batching=True,
    engine=True,
)
POSTPROCESS = ModelSpec(
    "postprocess",
    inputs=(DECODED,),
    outputs=(IMAGES,),
    batching=False,
    engine=False,
)

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        TXT2IMG,
        TXT2IMG_STREAM,
        TOKENIZER,
        TEXT_ENCODER,
        DENOISE,
        UNET,
        VAE_DECODER,
        VAE_ENCODER,
        POSTPROCESS,
    )
}
ENGINE_MODELS: tuple[str, ...] = tuple(m.name for m in MODELS.values() if m.engine)

# The model families the export reads: "sd" (SD 1.x/2.x: one tokenizer and text encoder), "sdxl" (two of
# each, the UNet's added conditioning) and "sdxl-refiner" (SDXL's second tokenizer and encoder only, the
# aesthetic-score time ids). A repository serves one; its pipeline.json says which.
Architecture = Literal["sd", "sdxl", "sdxl-refiner"]
ARCHITECTURES: tuple[str, ...] = Architecture.__args__  # type: ignore[attr-defined]
_ENGINES: dict[str, dict[str, ModelSpec]] = {
    "sd": {},
    "sdxl": {m.name: m for m in (TEXT_ENCODER_XL, UNET_XL)},
    "sdxl-refiner": {m.name: m for m in (TEXT_ENCODER_REFINER, UNET_XL)},
}


# Several pipelines in one repository (`sd-triton export --name NAME`): a named pipeline's models are
# NAME_<model> (xl_txt2img, xl_unet, ...); the unnamed one keeps the plain names.
PIPELINE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def model_name(pipeline: str, model: str) -> str:
    """A model's name in the repository: `model` prefixed with the pipeline's name ("": the plain name)."""
    return f"{pipeline}_{model}" if pipeline else model


def pipelines(model_names: Collection[str]) -> list[str]:
    """The pipelines whose txt2img is among `model_names` (a repository's or Triton's): "" (the plain
    names) first, then the named ones by name."""
    suffix = f"_{TXT2IMG.name}"
    named = {n.removesuffix(suffix) for n in model_names if n.endswith(suffix)}
    found = sorted(p for p in named if PIPELINE_NAME.match(p))
    return ([""] if TXT2IMG.name in model_names else []) + found


def check_pipeline_name(pipeline: str) -> str:
    if pipeline and not PIPELINE_NAME.match(pipeline):
        raise ValueError(
            f"pipeline name {pipeline!r}: 1-32 of a-z, 0-9 and '-', starting with a letter or digit"
        )
    return pipeline


def added_conditioning(architecture: str) -> bool:
    """SDXL's family (a base model or a refiner): pooled text embeddings and time ids into the UNet."""
    return architecture.startswith("sdxl")


def checkpoint_subfolders(model: str, architecture: str = "sd") -> tuple[str, ...]:
    """The checkpoint folders an engine model's weights come from (SDXL's text encoder: two)."""
    if architecture == "sdxl" and model == TEXT_ENCODER.name:
        return ("text_encoder", "text_encoder_2")
    if architecture == "sdxl-refiner" and model == TEXT_ENCODER.name:
        return ("text_encoder_2",)
    return (CHECKPOINT_SUBFOLDERS[model],)


def models(architecture: str = "sd") -> dict[str, ModelSpec]:
    """Every model's contract in a repository of that architecture."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    return {**MODELS, **_ENGINES[architecture]}


# where each engine model's weights live in a diffusers checkpoint (the python-torch kind loads them)
CHECKPOINT_SUBFOLDERS = {
    TEXT_ENCODER.name: "text_encoder",
    UNET.name: "unet",
    VAE_DECODER.name: "vae",
    VAE_ENCODER.name: "vae",
}


@dataclass(frozen=True)
class Limits:
    """Request limits. The export writes them into the repository; the gateway reads the same."""

    max_steps: int = 150
    max_side: int = 1024
    max_num_images: int = 4
    max_seed: int = 2**63 - 1
    max_prompt_chunks: int = 4  # a prompt's 77-token chunks (75 tokens of text each); past them: cut

    def __post_init__(self) -> None:
        for field in ("max_steps", "max_side", "max_num_images", "max_prompt_chunks"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{field} must be a positive integer, got {value!r}")

    @property
    def max_unet_batch(self) -> int:
        """cond + uncond for every image of one request, in one UNet batch."""
        return 2 * self.max_num_images
