"""ControlNets in the denoising loop, as diffusers' StableDiffusionControlNetPipeline (and its img2img
twin) runs them: every step, each of a request's ControlNets runs on the step's UNet inputs (the same
latents and text embeddings, both guidance halves) with its control image, its residuals are scaled by
its `scale` inside its window of steps and summed over the request's ControlNets, and the UNet adds them
to its own (the controlled UNet, sd_triton/control.py). Triton-free: the loop and the tests use it.

- `JobControl`: a request's ControlNets and control images, and which run at a step (`at`).
- `ControlNetLibrary`: a pipeline's ControlNet graphs and its controlled UNet, loaded on first use.
- `ControlledUNet`: the loop's UNet callable with `controls`: per request of the call, its rows and the
  ControlNets active this step. Rows of several requests share the ControlNet calls (per ControlNet) and
  one controlled UNet call; a step where no ControlNet is active runs the plain UNet (the residuals would
  all be zero).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton import contract as c
from sd_triton import control
from sd_triton.model_params import EngineParams
from sd_triton.requests import GenerationParams, InvalidRequest
from sd_triton.runtime.ort_runner import BatchRunner, OrtRunner

log = logging.getLogger(__name__)

Active = list[tuple[str, float, np.ndarray]]  # (ControlNet, scale this step, its image [1, 3, H, W])
StepControls = tuple[int, Active]  # a request's UNet rows in the call, and its active ControlNets


@dataclass(frozen=True)
class JobControl:
    """A request's ControlNets (`refs`) and their control images ([1, 3, H, W], 0..1, as diffusers'
    control image processor makes them from the uint8 images)."""

    refs: tuple[control.ControlRef, ...]
    images: tuple[np.ndarray, ...]

    def at(self, step: int, steps: int) -> Active:
        """The ControlNets that run at step `step` of `steps`, with their scale there (diffusers'
        conditioning scale x controlnet_keep); those at 0 do not run."""
        active = []
        for ref, image in zip(self.refs, self.images, strict=True):
            scale = ref.scale * ref.keep(step, steps)
            if scale != 0.0:
                active.append((ref.name, scale, image))
        return active


def job_control(
    refs: list[control.ControlRef], images: np.ndarray | None, params: GenerationParams, known: list[str]
) -> JobControl | None:
    """A request's ControlNets checked against the pipeline's (`known`) and its control images (uint8
    [K, H, W, 3], one per ControlNet, the output's size); None without ControlNets."""
    if not refs:
        if images is not None:
            raise InvalidRequest(c.CONTROL_IMAGES.name, f"given without {c.CONTROLNETS.name}")
        return None
    for ref in refs:
        if ref.name not in known:
            raise InvalidRequest(
                c.CONTROLNETS.name,
                f"no ControlNet {ref.name!r} in this pipeline (ControlNets: {', '.join(known) or 'none'})",
            )
    if len({ref.name for ref in refs}) != len(refs):
        raise InvalidRequest(c.CONTROLNETS.name, f"a ControlNet is named twice: {[r.name for r in refs]}")
    expected = [len(refs), params.height, params.width, 3]
    if images is None:
        raise InvalidRequest(c.CONTROL_IMAGES.name, f"is required with {c.CONTROLNETS.name}: {expected}")
    if images.dtype != np.uint8 or list(images.shape) != expected:
        raise InvalidRequest(
            c.CONTROL_IMAGES.name,
            f"must be uint8 [CONTROLNETS, HEIGHT, WIDTH, 3] = {expected} (a control image of the output's "
            f"size per ControlNet), got {images.dtype} {list(images.shape)}",
        )
    pixels = tuple(
        np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0 for image in images
    )
    return JobControl(tuple(refs), pixels)


class ControlNetLibrary:
    """A pipeline's ControlNets (`<denoise>/controlnets/<name>/model.onnx`) and its controlled UNet, each
    loaded on first use and run in this process: its TensorRT plan (`model.plan` beside the graph, built
    where the UNet runs on TensorRT) where TensorRT runs here, else its graph in ONNX Runtime with the UNet
    engine's runtime settings."""

    def __init__(self, denoise_dir: Path, params: EngineParams | None = None) -> None:
        self.folder = denoise_dir / control.LIBRARY
        self.variant = denoise_dir / control.CONTROLLED_UNET / "model.onnx"
        self.params = params or EngineParams()
        self.names = [r.name for r in control.records(self.folder)] if self.variant.is_file() else []
        self._runners: dict[str, BatchRunner] = {}
        self._lock = threading.Lock()

    def runner(self, name: str) -> BatchRunner:
        """A ControlNet's runner (`name` "": the controlled UNet's)."""
        with self._lock:
            if name not in self._runners:
                path = self.variant if not name else self.folder / name / "model.onnx"
                self._runners[name] = self._load(name or "controlled unet", path)
            return self._runners[name]

    def _load(self, label: str, graph: Path) -> BatchRunner:
        from sd_triton.runtime import trt_runner  # tensorrt and CUDA: only for a plan

        plan = graph.with_name("model.plan")
        if plan.is_file() and trt_runner.unavailable_reason() is None:
            return trt_runner.TrtRunner(label, plan)
        return OrtRunner(
            graph,
            device=self.params.device,
            threads=self.params.intra_op_threads,
            spinning=self.params.allow_spinning,
        )


class ControlledUNet:
    """The loop's UNet (`unet`, any UNet callable) and, for calls with `controls`, the ControlNets and the
    controlled UNet of `library`. Everything else (refresh, idle, last) is the UNet's."""

    def __init__(self, unet: Any, library: ControlNetLibrary) -> None:
        self.unet = unet
        self.library = library

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(
        self, *arrays: np.ndarray, controls: Sequence[StepControls] | None = None, **kwargs: Any
    ) -> np.ndarray:
        # 1. Each ControlNet's rows this step, over the requests of the call.
        parts: dict[str, list[tuple[int, int, float, np.ndarray]]] = defaultdict(list)
        offset = 0
        for rows, active in controls or ():
            for name, scale, image in active:
                parts[name].append((offset, rows, scale, image))
            offset += rows
        if not parts:  # none active: the residuals would all be zero
            return self.unet(*arrays, **kwargs)  # type: ignore[no-any-return]
        if kwargs.get("adapters") is not None or len(arrays) != 3:
            raise InvalidRequest(c.CONTROLNETS.name, "ControlNets run on SD UNets without LoRA adapters")
        sample, timestep, hidden = arrays
        # 2. Each ControlNet on its rows; its residuals, scaled per row, summed into the call's.
        residuals: dict[str, np.ndarray] = {}
        for name, chosen in parts.items():
            rows = np.concatenate([np.arange(start, start + count) for start, count, _, _ in chosen])
            images = np.concatenate([np.broadcast_to(i, (n, *i.shape[1:])) for _, n, _, i in chosen])
            outputs = self.library.runner(name).run(
                {
                    "sample": sample[rows],
                    "timestep": timestep[rows],
                    "encoder_hidden_states": hidden[rows],
                    control.CONDITION: np.ascontiguousarray(images),
                }
            )
            scales = np.concatenate([np.full(n, s, np.float32) for _, n, s, _ in chosen])[:, None, None, None]
            for key, value in outputs.items():
                if key not in residuals:
                    residuals[key] = np.zeros((len(sample), *value.shape[1:]), np.float32)
                residuals[key][rows] += value * scales
        # 3. The controlled UNet on every row of the call (zeros for the rows of no active ControlNet).
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden, **residuals}
        return self.library.runner("").run(feeds)[c.UNET.outputs[0].name]
