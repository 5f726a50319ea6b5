"""diffusers schedulers by request name, built from the checkpoint's scheduler config.

"default" is the checkpoint's own scheduler: the class its folder names (model_index.json, as
diffusers' from_pretrained reads it) with its config untouched. Every other name is a diffusers class
built from the checkpoint's config plus the options the name implies.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_triton.contract import DEFAULT_SCHEDULER, SCHEDULER_CLASSES, SCHEDULERS
from sd_triton.runtime.linear_step import LinearStep, linear_step

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}
_NO_KARRAS = {"use_karras_sigmas": False}

# name -> options on top of the checkpoint's config; the class is contract.SCHEDULER_CLASSES[name]
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "ddim": {},
    "euler": _NO_KARRAS,
    "euler_karras": _KARRAS,
    "euler_a": {},
    "heun": _NO_KARRAS,
    "dpmpp_2m": {**_DPMPP_2M, **_NO_KARRAS},
    "dpmpp_2m_karras": {**_DPMPP_2M, **_KARRAS},
    "dpmpp_2m_sde": {**_DPMPP_2M_SDE, **_NO_KARRAS},
    "dpmpp_2m_sde_karras": {**_DPMPP_2M_SDE, **_KARRAS},
    "dpmpp_sde": _NO_KARRAS,
    "dpmpp_sde_karras": _KARRAS,
    "deis": {},
    "lms": _NO_KARRAS,
    "lms_karras": _KARRAS,
    "pndm": {},
    "unipc": {},
    "lcm": {},
}
assert (DEFAULT_SCHEDULER, *SCHEDULER_OPTIONS) == SCHEDULERS, (
    "contract.SCHEDULERS and SCHEDULER_OPTIONS disagree"
)

# The classes a checkpoint may name as its own: those of the names above, and the other diffusers
# schedulers with the same step interface (scale_model_input, step) that SD 1.x/2.x checkpoints ship.
DEFAULT_CLASSES = frozenset(
    (
        *SCHEDULER_CLASSES.values(),
        "DDPMScheduler",
        "DPMSolverSinglestepScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "TCDScheduler",
    )
)


class UnsupportedScheduler(ValueError):
    """The checkpoint names a scheduler class this denoising loop cannot run."""


def default_scheduler_class(config: dict[str, Any]) -> type[SchedulerMixin]:
    """The checkpoint's own scheduler class, from its config's `_class_name`."""
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if name not in DEFAULT_CLASSES or cls is None:
        raise UnsupportedScheduler(
            f"scheduler_config.json: _class_name {name!r} is not a scheduler sd-triton runs; "
            f"it runs {', '.join(sorted(DEFAULT_CLASSES))}"
        )
    return cls  # type: ignore[no-any-return]


def scheduler_class(name: str, config: dict[str, Any]) -> type[SchedulerMixin]:
    if name == DEFAULT_SCHEDULER:
        return default_scheduler_class(config)
    return getattr(diffusers, SCHEDULER_CLASSES[name])  # type: ignore[no-any-return]


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler (they keep per-request state) that keeps the checkpoint's prediction
    type, beta schedule, timestep spacing and offsets: a copy of a never-used one built once per
    scheduler and config (building from the config costs ~1 ms a request, copying ~0.2)."""
    key = _key(config)
    return _built(name, config) if key is None else copy.deepcopy(_template(name, key))


def prepared_scheduler(
    name: str, config: dict[str, Any], steps: int
) -> tuple[SchedulerMixin, LinearStep | None]:
    """The scheduler `make_scheduler` gives, after `set_timesteps(steps)`, and its closed form (eta 0,
    as the denoising loop steps it; sd_triton.runtime.linear_step). Shared by every request of the same
    name, config and steps: a request with a closed form only reads it (timesteps, initial noise
    scale), any other steps a `copy.deepcopy` of its own. Spares each request the copy (0.2-1 ms),
    `set_timesteps` and the closed form's coefficients."""
    key = _key(config)
    return _prepare(name, config, steps) if key is None else _prepared(name, key, steps)


def _key(config: dict[str, Any]) -> str | None:
    """The config as a cache key; None for a config that is not JSON (built each time)."""
    try:
        return json.dumps(config, sort_keys=True)
    except TypeError:
        return None


@functools.lru_cache(maxsize=64)
def _template(name: str, config_json: str) -> SchedulerMixin:
    return _built(name, json.loads(config_json))


@functools.lru_cache(maxsize=256)
def _prepared(name: str, config_json: str, steps: int) -> tuple[SchedulerMixin, LinearStep | None]:
    return _prepare(name, json.loads(config_json), steps)


def _prepare(name: str, config: dict[str, Any], steps: int) -> tuple[SchedulerMixin, LinearStep | None]:
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    return scheduler, linear_step(scheduler)


def _built(name: str, config: dict[str, Any]) -> SchedulerMixin:
    cls = scheduler_class(name, config)
    if name == DEFAULT_SCHEDULER:
        return cls.from_config(config)
    return cls.from_config(config, **SCHEDULER_OPTIONS[name])
