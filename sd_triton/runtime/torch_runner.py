"""The `python-torch` engine kind: a component's PyTorch module (the very module the export traces,
torch_modules.py) loaded from its diffusers weights and run like OrtRunner — contract names in,
contract names out. For components that do not export cleanly and GPUs without TensorRT.

On a GPU, `compile=True` wraps the module in torch.compile with mode "reduce-overhead" (CUDA graphs
for the shapes it sees); on a CPU the module runs eagerly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sd_triton import contract as c
from sd_triton.runtime.ort_runner import BatchRunner, Feeds
from sd_triton.runtime.torch_modules import load_module, module_spec

log = logging.getLogger(__name__)


def choose_device(device: str) -> str:
    """`device`: auto (CUDA when torch sees a GPU), cuda, or cpu."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA GPU")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


class TorchRunner(BatchRunner):
    def __init__(
        self, component: str, root: Path, device: str = "auto", threads: int = 0, compile: bool = False
    ) -> None:
        """`root`: a folder holding the component's diffusers subfolders (`unet/`, `text_encoder/` and for
        SDXL `text_encoder_2/`, `vae/`)."""
        spec = module_spec(component, root)
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.device = choose_device(device)
        if threads > 0:
            torch.set_num_threads(threads)
        module = load_module(component, root).to(self.device)
        if compile and self.device == "cuda":
            module = torch.compile(module, mode="reduce-overhead")
        self.module = module
        log.info(
            "loaded %s from %s with torch on %s",
            component,
            root / c.CHECKPOINT_SUBFOLDERS[component],
            self.device,
        )

    @torch.inference_mode()
    def run(self, feeds: Feeds) -> Feeds:
        arrays = [np.ascontiguousarray(feeds[name]) for name in self.input_names]
        output = self.module(*(torch.from_numpy(a).to(self.device) for a in arrays))
        outputs = output if isinstance(output, tuple) else (output,)
        return {name: o.float().cpu().numpy() for name, o in zip(self.output_names, outputs, strict=True)}
