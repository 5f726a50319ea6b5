"""ControlNets as a pipeline serves them: the folder layout, each ControlNet's record, a request's list of
ControlNets and diffusers' per-step window. Torch-free: the denoising loops and the export read it.

`sd-triton export ... --controlnet NAME=PATH` (sd_triton/export/controlnet.py) writes, beside the
pipeline's denoise model (folders Triton ignores):

- `<repository>/<denoise>/controlnets/<name>/model.onnx` and `controlnet.json`: the ControlNet's graph,
  (sample, timestep, encoder_hidden_states, controlnet_cond) -> its down-block residuals `down_0..` and its
  mid-block residual `mid`, unscaled, and its record;
- `<repository>/<denoise>/controlled_unet/model.onnx`: the pipeline's UNet once more, taking those
  residuals as inputs besides its own (diffusers' down_block_additional_residuals and
  mid_block_additional_residual): the UNet variant the requests with ControlNets run on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sd_triton import contract as c

LIBRARY = "controlnets"
CONTROLLED_UNET = "controlled_unet"
RECORD = "controlnet.json"
CONDITION = "controlnet_cond"  # the control image input: [B, 3, H, W], 0..1 (diffusers' control image)
MID = "mid"


def down_names(count: int) -> list[str]:
    """The down-block residuals' tensor names, in the UNet's order."""
    return [f"down_{i}" for i in range(count)]


def library_dir(repo: Path, pipeline: str = "") -> Path:
    return repo / c.model_name(pipeline, c.DENOISE.name) / LIBRARY


def controlled_unet_dir(repo: Path, pipeline: str = "") -> Path:
    return repo / c.model_name(pipeline, c.DENOISE.name) / CONTROLLED_UNET


@dataclass(frozen=True)
class ControlNetRecord:
    """`controlnet.json`: what the export wrote and checked."""

    name: str
    source: str  # the folder it came from (or `random:SEED`, built from the pipeline's UNet)
    sha256: str  # of its weights
    residuals: int  # down-block residuals (the mid one besides)
    conditioning_channels: int
    max_abs_diff: float  # its ONNX graph against PyTorch
    pipeline: str = ""

    @classmethod
    def load(cls, folder: Path) -> ControlNetRecord:
        return cls(**json.loads((folder / RECORD).read_text()))

    def save(self, folder: Path) -> None:
        (folder / RECORD).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    def summary(self) -> dict[str, Any]:
        """What /v1/models lists."""
        return {"name": self.name, "sha256": self.sha256, "conditioning_channels": self.conditioning_channels}


def records(folder: Path) -> list[ControlNetRecord]:
    return [ControlNetRecord.load(p) for p in sorted(folder.glob("*")) if (p / RECORD).is_file()]


@dataclass(frozen=True)
class ControlRef:
    """One ControlNet of a request: its name, `scale` (diffusers' controlnet_conditioning_scale) and the
    window of the steps it runs in, fractions `start` < `end` (control_guidance_start / _end)."""

    name: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def keep(self, step: int, steps: int) -> float:
        """1 in the steps of its window, 0 outside: diffusers' controlnet_keep for step `step` of
        `steps` (the UNet calls the request makes)."""
        return 1.0 - float(step / steps < self.start or (step + 1) / steps > self.end)


def parse_refs(text: str, field_name: str = c.CONTROLNETS.name) -> list[ControlRef]:
    """A request's JSON list of {name, scale, start, end} (defaults 1, 0, 1). InvalidRequest naming
    `field_name` for a bad list, too many, a duplicate name, a scale or window out of range."""
    from sd_triton.requests import InvalidRequest

    try:
        items = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        message = f"must be a JSON list of {{name, scale, start, end}}: {exc}"
        raise InvalidRequest(field_name, message) from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        raise InvalidRequest(field_name, 'must be a JSON list of {"name": ..., "scale": ...}')
    if len(items) > c.MAX_CONTROLNETS:
        raise InvalidRequest(field_name, f"at most {c.MAX_CONTROLNETS} ControlNets, got {len(items)}")
    refs = []
    for item in items:
        values = {}
        for key, default, low, high in (("scale", 1.0, 0.0, c.MAX_CONTROL_SCALE), ("start", 0.0, 0.0, 1.0),
                                        ("end", 1.0, 0.0, 1.0)):  # fmt: skip
            value = item.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidRequest(
                    field_name, f"{item['name']}: {key} must be from {low:g} to {high:g}, got {value!r}"
                )
            values[key] = float(value)
        if not values["start"] < values["end"]:
            start, end = values["start"], values["end"]
            raise InvalidRequest(field_name, f"{item['name']}: start ({start:g}) must be below end ({end:g})")
        refs.append(ControlRef(str(item["name"]), **values))
    return refs
