"""Request and response bodies. Static bounds live here; the served model's own limits (size,
steps, images) are checked against what Triton reports, in `service.py`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sd_triton.contract import (
    DEFAULT_AESTHETIC_SCORE,
    DEFAULT_DENOISING_END,
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    DEFAULT_SCHEDULER,
    DEFAULT_STRENGTH,
    MAX_CONTROL_SCALE,
    MAX_CONTROLNETS,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_SIZE_CONDITIONING,
    SCHEDULERS,
    SchedulerName,
)
from sd_triton.requests import DEFAULTS

OutputFormat = Literal["png", "jpeg", "webp"]
MAX_SEED = 2**63 - 1
MAX_FP32 = 3.4028234663852886e38  # the largest float32: GUIDANCE_SCALE goes to Triton as TYPE_FP32
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=100_000)
MAX_IMAGE_CHARS = 32 * 1024 * 1024  # base64; the body limit (max_body_bytes) is what binds


# SDXL's size conditioning: a pair of pixel counts, (height, width) or, for a crop, (top, left)
SizeValue = Annotated[int, Field(ge=0, le=MAX_SIZE_CONDITIONING)]
Size = tuple[SizeValue, SizeValue]


class LoraRef(BaseModel):
    """One LoRA adapter of the model's library (`sd-triton lora add`) and its scale."""

    model_config = STRICT

    name: str = Field(..., min_length=1, max_length=64, examples=["watercolor"])
    scale: float = Field(
        1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="the adapter's weight; 0: off, 1: as trained"
    )


class ControlNetRef(BaseModel):
    """One ControlNet of the model (exported with it: GET /v1/models lists them), its control image and
    how strongly and when it steers (diffusers' StableDiffusionControlNetPipeline arguments)."""

    model_config = STRICT

    name: str = Field(..., min_length=1, max_length=64, examples=["canny"])
    image: str = Field(
        ...,
        max_length=MAX_IMAGE_CHARS,
        description="the control image, base64 or a data URI (PNG, JPEG or WebP), of the output's size",
    )
    scale: float = Field(
        1.0, ge=0.0, le=MAX_CONTROL_SCALE, description="controlnet_conditioning_scale: 0 off, 1 as trained"
    )
    start: float = Field(0.0, ge=0.0, le=1.0, description="control_guidance_start: steps before it (share)")
    end: float = Field(1.0, ge=0.0, le=1.0, description="control_guidance_end: it stops after this share")
    preprocess: Literal["none", "canny"] = Field(
        "none", description="none: the image is the control map; canny: OpenCV's Canny edges of the image"
    )
    low_threshold: int = Field(100, ge=0, le=1000, description="canny: the hysteresis' low threshold")
    high_threshold: int = Field(200, ge=0, le=1000, description="canny: the hysteresis' high threshold")

    @model_validator(mode="after")
    def _window(self) -> ControlNetRef:
        if not self.start < self.end:
            raise ValueError(f"start ({self.start:g}) must be below end ({self.end:g})")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) must not exceed high_threshold")
        return self


class GenerationOptions(BaseModel):
    """Parameters shared by single and batch generation: sd_triton.requests.GenerationParams (its defaults;
    size and seed left to the served model and the gateway) and the response's form."""

    model_config = STRICT

    model: str | None = Field(
        None,
        max_length=200,
        description="which served model answers (an id of GET /v1/models); default: the default model",
    )
    negative_prompt: str | None = Field(None, description="what to steer away from; empty = unconditional")
    clip_skip: int | None = Field(
        None,
        ge=0,
        le=64,
        description="diffusers' clip_skip: the text encoder's output this many layers before its usual one "
        "(GET /v1/models: max_clip_skip); default 0",
    )
    prompt_syntax: Literal["plain", "a1111"] | None = Field(
        None,
        description="how prompt and negative_prompt are read: plain, the text as it is, or a1111, "
        "AUTOMATIC1111's emphasis ((word), [word], (word:1.3), \\( for a bracket) and BREAK; default the "
        "gateway's default_prompt_syntax. Either way a prompt past 75 tokens continues in 77-token chunks "
        "(up to the model's max_prompt_chunks)",
    )
    width: int | None = Field(None, ge=1, description="pixels; default: the model's native width")
    height: int | None = Field(None, ge=1, description="pixels; default: the model's native height")
    steps: int = Field(DEFAULTS.steps, ge=1, description="denoising steps")
    guidance_scale: float = Field(
        DEFAULTS.guidance_scale,
        ge=0.0,
        le=MAX_FP32,
        description="classifier-free guidance; <= 1 turns it off",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i; drawn when absent")
    scheduler: SchedulerName = Field(
        DEFAULTS.scheduler,  # type: ignore[arg-type]
        description=f"one of {', '.join(SCHEDULERS)}. `{DEFAULT_SCHEDULER}`: the checkpoint's own scheduler, "
        "class and config (GET /v1/models and /v1/info name its class)",
    )
    num_images: int = Field(DEFAULTS.num_images, ge=1, description="images per prompt")
    image: str | None = Field(
        None,
        max_length=MAX_IMAGE_CHARS,
        description="image-to-image: the init image, base64 or a data URI (PNG, JPEG or WebP; alpha is "
        "dropped). width and height default to its size (rounded down to the model's multiple of 8); "
        "another size resizes it (Lanczos, as diffusers' image processor does)",
    )
    mask: str | None = Field(
        None,
        max_length=MAX_IMAGE_CHARS,
        description="inpainting, with `image`: a mask of the image's size, base64 or a data URI; white "
        "(grey >= 128) is repainted, black kept, as diffusers binarizes it",
    )
    strength: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=f"image-to-image: the share of the steps run over the image (1 repaints it, small "
        f"values keep it); default {DEFAULT_STRENGTH} with an image. Runs int(steps x strength) steps",
    )
    original_size: Size | None = Field(
        None,
        description="SDXL models only: the size conditioning's original (height, width); default the "
        "request's size (diffusers' original_size)",
    )
    crops_coords_top_left: Size | None = Field(
        None, description="SDXL models only: the crop conditioning (top, left); default (0, 0)"
    )
    target_size: Size | None = Field(
        None, description="SDXL models only: the target (height, width); default the request's size"
    )
    negative_original_size: Size | None = Field(
        None,
        description="SDXL models only: the unconditional rows' original size; with negative_target_size "
        "(diffusers uses neither without the other); default: the same conditioning as the prompt's",
    )
    negative_crops_coords_top_left: Size | None = Field(
        None, description="SDXL models only: the unconditional rows' crop; default (0, 0)"
    )
    negative_target_size: Size | None = Field(
        None, description="SDXL models only: the unconditional rows' target size, with negative_original_size"
    )
    aesthetic_score: float | None = Field(
        None, ge=-100, le=100, description=f"SDXL refiner models only: default {DEFAULT_AESTHETIC_SCORE}"
    )
    negative_aesthetic_score: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="SDXL refiner models only: the unconditional rows' score; default "
        f"{DEFAULT_NEGATIVE_AESTHETIC_SCORE}",
    )
    loras: list[LoraRef] | None = Field(
        None,
        max_length=MAX_LORAS,
        description=f"LoRA adapters of the model's library, each with its scale (at most {MAX_LORAS}); "
        "applied per request, no reload (GET /v1/loras lists them)",
    )
    controlnets: list[ControlNetRef] | None = Field(
        None,
        max_length=MAX_CONTROLNETS,
        description=f"ControlNets of the model, each with its control image (at most {MAX_CONTROLNETS}); "
        "several are summed as diffusers' MultiControlNet does",
    )
    refiner: str | None = Field(
        None,
        max_length=200,
        description="SDXL base + refiner: a served refiner's id (GET /v1/models, architecture sdxl-refiner); "
        "the model runs until denoising_end, the refiner finishes from its latents, as diffusers' "
        "denoising_end / denoising_start do (same prompt, seed, steps, scheduler and guidance)",
    )
    denoising_end: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description=f"with `refiner`: the share of the schedule the model runs before the refiner takes "
        f"over (diffusers' high_noise_frac); default {DEFAULT_DENOISING_END}",
    )
    output_format: OutputFormat = "png"
    response_format: Literal["base64", "url"] = Field(
        "base64", description="url: images are stored and each carries a signed, expiring `url` instead"
    )


class GenerateRequest(GenerationOptions):
    prompt: str = Field(..., min_length=1, description="what to draw")

    model_config = ConfigDict(
        **STRICT,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a watercolor painting of a lighthouse at dawn",
                    "negative_prompt": "blurry",
                    "width": 512,
                    "height": 512,
                    "steps": 30,
                    "guidance_scale": 7.5,
                    "seed": 42,
                    "scheduler": "dpmpp_2m_karras",
                    "num_images": 1,
                    "output_format": "png",
                }
            ]
        },
    )


class BatchRequest(GenerationOptions):
    prompts: list[str] = Field(..., min_length=1, description="images come back in prompt order")

    model_config = ConfigDict(
        **STRICT,
        json_schema_extra={
            "examples": [{"prompts": ["a red fox in snow", "a lighthouse at dawn"], "steps": 20, "seed": 7}]
        },
    )


class Image(BaseModel):
    base64: str | None = Field(..., description="the encoded image, base64 (null with response_format url)")
    url: str | None = Field(
        None, description="with response_format url: a signed link, expires with the image"
    )
    seed: int = Field(..., description="generate again with this seed and num_images=1 to get this image")
    width: int
    height: int
    content_type: str = Field(..., examples=["image/png"])
    prompt_index: int = Field(0, description="which prompt of a batch it belongs to")


class Timings(BaseModel):
    queue_ms: float = Field(..., description="waiting in the gateway before the Triton call")
    inference_ms: float = Field(..., description="the Triton call(s)")
    encode_ms: float = Field(..., description="encoding the images")
    total_ms: float


class ComponentProvenance(BaseModel):
    engine: str = Field(..., examples=["tensorrt"])
    precision: str = Field(..., examples=["fp16"])
    version: int | None = Field(None, description="the component's model version in Triton")
    sha256: str | None = Field(None, description="sha256 of the engine's artifact (ONNX graph or plan)")


class SchedulerProvenance(BaseModel):
    name: str = Field(..., examples=["default"], description="as requested (default: the checkpoint's own)")
    class_name: str = Field(..., examples=["PNDMScheduler"], description="the diffusers class that ran")


class Provenance(BaseModel):
    model: str
    mode: Literal["text-to-image", "image-to-image", "inpainting"] = Field(
        "text-to-image", description="image-to-image: the request sent an init image; inpainting: and a mask"
    )
    scheduler: SchedulerProvenance
    components: dict[str, ComponentProvenance] = Field(
        ..., description="per component; the UNet's as Triton reported it for this response"
    )
    unet_engines: list[ComponentProvenance] = Field(
        default_factory=list,
        description="the UNet engines that ran the denoising steps, in order, as Triton reported them "
        "with the response: two when an engine swap landed while it ran (or a refiner finished it)",
    )
    loras: list[dict[str, Any]] = Field(
        default_factory=list, description="the LoRA adapters it ran with: name, scale, the file's sha256"
    )
    controlnets: list[dict[str, Any]] = Field(
        default_factory=list,
        description="the ControlNets it ran with: name, scale, start, end, preprocess, the ControlNet's "
        "sha256 and its control map's",
    )
    refiner: str | None = Field(
        None, description="the refiner that finished the denoising, with denoising_end"
    )
    denoising_end: float | None = None


class Truncation(BaseModel):
    prompt_tokens_cut: int = Field(..., description="prompt tokens beyond CLIP's 77 that were dropped")
    negative_prompt_tokens_cut: int


class GenerateResponse(BaseModel):
    images: list[Image]
    timings: Timings
    provenance: Provenance
    truncation: list[Truncation] = Field(..., description="one entry per prompt")
    cache: Literal["hit", "miss", "bypass"] = Field(
        "miss",
        description="hit: a stored result of the same seeded request and served model, no inference; "
        "bypass: a seeded request sent with Cache-Control: no-cache (generated, then stored)",
    )


class ErrorDetail(BaseModel):
    type: str = Field(..., examples=["invalid_request"])
    message: str = Field(..., examples=["width: must be a multiple of 8 between 8 and 1024, got 1000"])
    field: str | None = Field(None, examples=["width"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- the OpenAI Images API shape ---

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"prompt": "a red fox in snow", "n": 1, "size": "512x512"}]},
    )

    prompt: str = Field(..., min_length=1)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description='"WIDTHxHEIGHT"; default: the model\'s native size')
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = Field(
        None,
        max_length=200,
        description="a served model's id (GET /v1/models) or an alias; OpenAI's names: the default model",
    )
    quality: str | None = None
    style: str | None = None
    user: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not SIZE.match(value):
            raise ValueError(f'must look like "512x512", got {value!r}')
        return value


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
