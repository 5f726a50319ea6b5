"""Glue shared by the thin `model.py` files of the Triton python models.

Only importable inside Triton's python backend (it needs `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from sd_triton import contract as c
from sd_triton.contract import ModelSpec, TensorSpec
from sd_triton.engine_record import EngineRecord, versions_on_disk
from sd_triton.model_params import ModelParams
from sd_triton.pipeline_config import PipelineConfig
from sd_triton.requests import (
    DEFAULTS,
    INPUTS,
    GenerationParams,
    InvalidRequest,
    decode_text,
    validate_params,
)

log = logging.getLogger("sd_triton.triton")

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


class PinnedUNet:
    """The UNet called through BLS, every call pinned to a version Triton has READY, so the caller knows
    which engine ran it (that version's engine.json). `sd-triton engine set` loads a new version while
    the old one serves; a call to a version unloaded meanwhile is retried once on the one now ready."""

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

    def provenance(self, version: int) -> dict[str, Any] | None:
        if version < 0:
            return None
        if version not in self._records:
            record = EngineRecord.load(self.model_dir / str(version))
            self._records[version] = (
                record.provenance() if record else {"component": self.model, "version": version}
            )
        return self._records[version]

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        if time.monotonic() - self.resolved_at > self.RESOLVE_EVERY_S:
            self._resolve()
        inputs = dict(zip((t.name for t in c.UNET.inputs), (sample, timestep, hidden), strict=True))
        output = c.UNET.outputs[0].name
        version = self.version
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


class EngineLog:
    """The engines one request's UNet calls ran on, in order, without repeats: its ENGINES output."""

    def __init__(self) -> None:
        self.engines: list[dict[str, Any]] = []

    def add(self, provenance: dict[str, Any] | None) -> None:
        if provenance is not None and (not self.engines or self.engines[-1] != provenance):
            self.engines.append(provenance)

    def array(self) -> np.ndarray:
        return np.array([json.dumps(self.engines).encode()], dtype=object)
