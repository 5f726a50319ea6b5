"""Build and send a `txt2img` request over Triton gRPC, from the contract's tensor names.

Torch-free: the gateway, the tests and the demo share it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from sd_triton import contract as c
from sd_triton.requests import GenerationParams


@dataclass(frozen=True)
class Txt2ImgResult:
    images: np.ndarray[Any, np.dtype[np.uint8]]  # [N, H, W, 3]
    prompt_truncated_tokens: int
    negative_prompt_truncated_tokens: int
    # the UNet engines that ran it (contract.ENGINES): [{component, version, engine, precision, sha256}]
    engines: list[dict[str, Any]] = field(default_factory=list)
    # the final latents [N, C, h, w] (contract.LATENTS), when asked for: a hand-off's base
    latents: np.ndarray[Any, np.dtype[np.float32]] | None = None


def _array(spec: c.TensorSpec, value: Any) -> np.ndarray[Any, Any]:
    """`value` as the one element of `spec`'s tensor. A number the wire type cannot hold is refused:
    numpy would wrap an int (2**32 + 5 steps sent as 5) or truncate a fraction, and round a finite
    float past FP32's range to inf."""
    if spec.dtype == "TYPE_STRING":
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        return np.array([raw], dtype=object)
    dtype = np.dtype(spec.numpy_dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max or value != int(value):
            raise ValueError(f"{spec.name}: must be an integer from {info.min} to {info.max}, got {value!r}")
    elif dtype.kind == "f" and math.isfinite(value) and abs(value) > np.finfo(dtype).max:
        limit = float(np.finfo(dtype).max)
        raise ValueError(f"{spec.name}: must be within +/-{limit} ({spec.wire_dtype}), got {value!r}")
    return np.array([value], dtype=dtype)


def infer_input(spec: c.TensorSpec, array: np.ndarray[Any, Any]) -> grpcclient.InferInput:
    """One input tensor of the contract, named and typed as the contract says."""
    tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.wire_dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def txt2img_inputs(
    prompt: str | bytes,
    *,
    negative_prompt: str | bytes | None = None,
    image: np.ndarray[Any, np.dtype[np.uint8]] | None = None,
    mask: np.ndarray[Any, np.dtype[np.uint8]] | None = None,
    size_conditioning: Sequence[int] | None = None,
    negative_size_conditioning: Sequence[int] | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    denoising_end: float | None = None,
    denoising_start: float | None = None,
    start_latents: np.ndarray[Any, Any] | None = None,
    loras: Sequence[dict[str, Any]] | None = None,
    controlnets: Sequence[dict[str, Any]] | None = None,
    control_images: np.ndarray[Any, np.dtype[np.uint8]] | None = None,
    prompt_syntax: str | None = None,
    clip_skip: int | None = None,
    **params: Any,
) -> list[grpcclient.InferInput]:
    """The ensemble's inputs. `params`: sd_triton.requests.GenerationParams' fields (its defaults for the
    rest; scheduler None: left out, the checkpoint's own). `image`: image-to-image from this uint8
    [height, width, 3] image (`strength` in `params`). Values are not checked against the model's
    limits (Triton does that), only against what the wire type can hold. `mask`: inpainting, uint8
    [height, width], grey levels >= 128 repainted. `size_conditioning`, `negative_size_conditioning`:
    an SDXL model's (6 integers: original height, width, crop top, left, target height, width);
    `aesthetic_score`, `negative_aesthetic_score`: an SDXL refiner's. A base + refiner hand-off:
    `denoising_end` on the base (ask it for LATENTS: `output_names(..., latents=True)`), `denoising_start`
    and the base's `start_latents` on the refiner. `loras`: [{"name": ..., "scale": ...}], adapters of the
    pipeline's library. `controlnets`: [{"name", "scale", "start", "end"}], ControlNets of the pipeline,
    with `control_images` uint8 [K, height, width, 3], the k-th one's control image. `prompt_syntax`:
    plain (the default) or a1111 (AUTOMATIC1111's emphasis and BREAK); `clip_skip`: diffusers'."""
    if params.get("scheduler") is None:
        params.pop("scheduler", None)
    values = {c.PROMPT: prompt, c.NEGATIVE_PROMPT: negative_prompt, **GenerationParams(**params).inputs()}
    inputs = [
        infer_input(spec, _array(spec, value))
        for spec, value in values.items()
        if not (value is None and spec.optional)
    ]
    for spec, array in ((c.IMAGE, image), (c.MASK, mask)):
        if array is not None:
            inputs.append(infer_input(spec, np.ascontiguousarray(array, dtype=np.uint8)))
    for spec, sizes in (
        (c.SIZE_CONDITIONING, size_conditioning),
        (c.NEGATIVE_SIZE_CONDITIONING, negative_size_conditioning),
    ):
        if sizes is not None:
            inputs.append(infer_input(spec, np.asarray(sizes, dtype=np.int32).reshape(-1)))
    for spec, score in (
        (c.AESTHETIC_SCORE, aesthetic_score),
        (c.NEGATIVE_AESTHETIC_SCORE, negative_aesthetic_score),
        (c.DENOISING_END, denoising_end),
        (c.DENOISING_START, denoising_start),
    ):
        if score is not None:
            inputs.append(infer_input(spec, np.array([score], dtype=np.float32)))
    if loras:
        inputs.append(infer_input(c.LORAS, _array(c.LORAS, json.dumps(list(loras)))))
    if clip_skip is not None:
        inputs.append(infer_input(c.CLIP_SKIP, _array(c.CLIP_SKIP, clip_skip)))
    if prompt_syntax is not None:
        inputs.append(infer_input(c.PROMPT_SYNTAX, _array(c.PROMPT_SYNTAX, prompt_syntax)))
    if controlnets:
        inputs.append(infer_input(c.CONTROLNETS, _array(c.CONTROLNETS, json.dumps(list(controlnets)))))
    if control_images is not None:
        inputs.append(infer_input(c.CONTROL_IMAGES, np.ascontiguousarray(control_images, dtype=np.uint8)))
    if start_latents is not None:
        inputs.append(infer_input(c.START_LATENTS, np.ascontiguousarray(start_latents, dtype=np.float32)))
    return inputs


def output_names(spec: c.ModelSpec, latents: bool = False) -> list[str]:
    """The outputs to ask `txt2img` or `txt2img_stream` for: all but LATENTS, unless `latents`."""
    return [t.name for t in spec.outputs if latents or t.name != c.LATENTS.name]


def parse_result(result: grpcclient.InferResult) -> Txt2ImgResult:
    engines = result.as_numpy(c.ENGINES.name)
    return Txt2ImgResult(
        images=result.as_numpy(c.IMAGES.name),
        prompt_truncated_tokens=int(result.as_numpy(c.PROMPT_TRUNCATED_TOKENS.name)[0]),
        negative_prompt_truncated_tokens=int(result.as_numpy(c.NEGATIVE_PROMPT_TRUNCATED_TOKENS.name)[0]),
        engines=[] if engines is None else json.loads(engines.reshape(-1)[0]),
        latents=result.as_numpy(c.LATENTS.name),
    )


@dataclass(frozen=True)
class Progress:
    """One step response of txt2img_stream."""

    step: int  # steps done, 1 ... steps
    steps: int
    previews: np.ndarray[Any, np.dtype[np.uint8]] | None  # [N, h, w, 3] when asked for


def parse_stream_response(result: grpcclient.InferResult) -> Progress | Txt2ImgResult:
    """A txt2img_stream response: a step's progress, or the final result (it carries IMAGES)."""
    if result.as_numpy(c.IMAGES.name) is not None:
        return parse_result(result)
    step, steps = result.as_numpy(c.STEP.name), result.as_numpy(c.STEPS_TOTAL.name)
    if step is None or steps is None:
        raise ValueError(f"{c.TXT2IMG_STREAM.name}: a response with neither IMAGES nor STEP")
    return Progress(int(step[0]), int(steps[0]), result.as_numpy(c.PREVIEW_IMAGES.name))


def txt2img(
    client: grpcclient.InferenceServerClient,
    prompt: str | bytes,
    pipeline: str = "",
    latents: bool = False,
    **params: Any,
) -> Txt2ImgResult:
    """One synchronous request (to a named pipeline's txt2img with `pipeline`; `latents`: the result
    carries them too); Triton's errors raise InferenceServerException."""
    outputs = [grpcclient.InferRequestedOutput(name) for name in output_names(c.TXT2IMG, latents)]
    result = client.infer(
        c.model_name(pipeline, c.TXT2IMG.name), txt2img_inputs(prompt, **params), outputs=outputs
    )
    return parse_result(result)
