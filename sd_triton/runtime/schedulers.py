"""diffusers schedulers by request name, built from the checkpoint's scheduler config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_triton.contract import SCHEDULERS

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

# name -> (class, overrides on top of the checkpoint's config)
SCHEDULER_TABLE: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**_DPMPP_2M, "use_karras_sigmas": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
assert tuple(SCHEDULER_TABLE) == SCHEDULERS, "contract.SCHEDULERS and SCHEDULER_TABLE disagree"


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler (they keep per-request state) that keeps the checkpoint's prediction
    type, beta schedule, timestep spacing and offsets."""
    cls, overrides = SCHEDULER_TABLE[name]
    return cls.from_config(config, **overrides)
