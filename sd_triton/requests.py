"""Validation of one txt2img request. Torch-free: the Triton steps and the gateway share it.

Every error names the input (as the ensemble calls it) and the limit it broke.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from sd_triton.contract import DEFAULT_SCHEDULER, SCHEDULERS, TXT2IMG, Limits, TensorSpec


class InvalidRequest(ValueError):
    """A request input is out of its limits; Triton answers INVALID_ARG, the gateway 422. `field` is the
    input as the contract names it (PROMPT, HEIGHT, ...), `detail` what is wrong with it; its text,
    "FIELD: detail", is what Triton's error message carries (`parse` reads it back)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail

    @property
    def json_field(self) -> str:
        """The gateway's JSON field for the input: the contract's names are the JSON names upper-cased."""
        return self.field.lower()

    @classmethod
    def parse(cls, message: str, fields: Iterable[str]) -> InvalidRequest | None:
        """The error an INVALID_ARG message from Triton carries ("FIELD: detail" after Triton's own
        prefix, e.g. "in ensemble 'txt2img', "), for one of `fields`; None when it names none of them."""
        for field in fields:
            _, found, detail = message.partition(f"{field}: ")
            if found:
                return cls(field, detail)
        return None


@dataclass(frozen=True)
class GenerationParams:
    """The scalar inputs of one txt2img request, named as the JSON API names them (the contract's input
    names lower-cased), with their defaults. The one list of them: validation (`validate_params`), the
    gateway's schema defaults and mapping, the Triton client's inputs, the python models' input reading and
    the perf tools' request files all go through it. Unchecked until `validate_params`."""

    height: int = 512  # the gateway's default is the served model's native size
    width: int = 512
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER  # the checkpoint's own
    num_images: int = 1
    strength: float | None = None  # image-to-image only (the request's IMAGE); None: DEFAULT_STRENGTH there

    def inputs(self) -> dict[TensorSpec, Any]:
        """The ensemble's input of each parameter, with its value."""
        return {INPUTS[name]: getattr(self, name) for name in PARAM_NAMES}

    @property
    def classifier_free_guidance(self) -> bool:
        return uses_guidance(self.guidance_scale)


PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GenerationParams))
INPUTS: dict[str, TensorSpec] = {name: TXT2IMG.input(name.upper()) for name in PARAM_NAMES}
DEFAULTS = GenerationParams()


def uses_guidance(guidance_scale: float) -> bool:
    """diffusers' rule: classifier-free guidance (an unconditional UNet pass) only above 1.0."""
    return guidance_scale > 1.0


def decode_text(field: str, raw: object) -> str:
    """One prompt from a Triton BYTES element; non-UTF-8 bytes are the caller's error."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        raise InvalidRequest(field, f"expected a UTF-8 string, got {type(raw).__name__}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            field, f"is not valid UTF-8 (byte {exc.start} of {len(raw)} is 0x{raw[exc.start]:02x})"
        ) from None


def check_guidance_scale(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise InvalidRequest("GUIDANCE_SCALE", f"must be a finite number >= 0, got {value}")
    return value


def check_strength(value: float) -> float:
    """An img2img request's strength: the share of the schedule run over its image."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest("STRENGTH", f"must be a number > 0 and <= 1, got {value!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise InvalidRequest("STRENGTH", f"must be a number > 0 and <= 1, got {value}")
    return value


def start_step(steps: int, strength: float) -> int:
    """The first of `steps` an image-to-image request runs, as diffusers' img2img pipeline computes it
    (before the scheduler's order): int(steps x strength) steps run; fewer than one is refused, as
    diffusers refuses it."""
    strength = check_strength(strength)
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InvalidRequest(
            "STRENGTH", f"runs no step: {steps} steps x strength {strength:g} < 1 (raise either)"
        )
    return steps - run


def _check_side(field: str, value: int, limits: Limits, multiple: int) -> int:
    if value < multiple or value > limits.max_side or value % multiple:
        raise InvalidRequest(
            field,
            f"must be a multiple of {multiple} between {multiple} and {limits.max_side}, got {value}",
        )
    return value


def validate_params(*, limits: Limits, spatial_multiple: int, **fields: Any) -> GenerationParams:
    """Check every scalar input of a request (`fields`: GenerationParams' names; its defaults for the
    rest) against the model's limits."""
    raw = GenerationParams(**fields)
    _check_side("HEIGHT", int(raw.height), limits, spatial_multiple)
    _check_side("WIDTH", int(raw.width), limits, spatial_multiple)
    if not 1 <= int(raw.steps) <= limits.max_steps:
        raise InvalidRequest("STEPS", f"must be between 1 and {limits.max_steps}, got {raw.steps}")
    if raw.scheduler not in SCHEDULERS:
        known = ", ".join(SCHEDULERS)
        raise InvalidRequest("SCHEDULER", f"unknown scheduler {raw.scheduler!r}; known: {known}")
    if not 1 <= int(raw.num_images) <= limits.max_num_images:
        raise InvalidRequest(
            "NUM_IMAGES", f"must be between 1 and {limits.max_num_images}, got {raw.num_images}"
        )
    # image i uses seed + i, so the last image's seed must still fit
    max_seed = limits.max_seed - (int(raw.num_images) - 1)
    if not 0 <= int(raw.seed) <= max_seed:
        raise InvalidRequest("SEED", f"must be between 0 and {max_seed}, got {raw.seed}")
    return GenerationParams(
        height=int(raw.height),
        width=int(raw.width),
        steps=int(raw.steps),
        guidance_scale=check_guidance_scale(raw.guidance_scale),
        seed=int(raw.seed),
        scheduler=raw.scheduler,
        num_images=int(raw.num_images),
        strength=None if raw.strength is None else check_strength(raw.strength),
    )
