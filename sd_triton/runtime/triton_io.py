"""Glue shared by the thin `model.py` files of the Triton python models.

Only importable inside Triton's python backend (it needs `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from sd_triton import contract as c
from sd_triton.contract import ModelSpec, TensorSpec
from sd_triton.pipeline_config import PipelineConfig
from sd_triton.requests import GenerationParams, InvalidRequest, decode_text, validate_params

log = logging.getLogger("sd_triton.triton")

Outputs = dict[str, np.ndarray]


def version_dir(args: dict[str, Any]) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def parameters(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


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
    return validate_params(
        height=get_scalar(request, c.HEIGHT),
        width=get_scalar(request, c.WIDTH),
        steps=get_scalar(request, c.STEPS),
        guidance_scale=get_scalar(request, c.GUIDANCE_SCALE),
        seed=get_scalar(request, c.SEED),
        scheduler=get_text(request, c.SCHEDULER),
        num_images=get_scalar(request, c.NUM_IMAGES),
        limits=config.limits,
        spatial_multiple=config.vae_scale_factor,
    )


def error_response(message: str, code: Any = None) -> Any:
    """A response carrying an error (INVALID_ARG unless `code` says otherwise)."""
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def respond(requests: Sequence[Any], spec: ModelSpec, handle: Callable[[Any], Outputs]) -> list[Any]:
    """One response per request; a request's bad input answers INVALID_ARG to it alone."""
    responses = []
    for request in requests:
        try:
            outputs = handle(request)
        except InvalidRequest as exc:
            responses.append(error_response(str(exc)))
            continue
        tensors = [pb_utils.Tensor(t.name, outputs[t.name]) for t in spec.outputs]
        responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
    return responses


def bls_infer(model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """One synchronous BLS call; an error from the called model raises."""
    return bls_infer_all(model, inputs, [output])[output]


def bls_infer_all(model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> Outputs:
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        requested_output_names=list(outputs),
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}
