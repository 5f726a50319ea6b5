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
from sd_triton.lora import AdapterSet, spellings
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


# a checkpoint component's parameters in the modules of torch_modules.py
_MODULE_PREFIXES = {
    "unet": ("unet.",),
    "text_encoder": ("encoder.",),
    "text_encoder_2": ("encoder_2.", "encoder."),
}


def _param_name(target: str, params: dict[str, torch.Tensor]) -> str | None:
    """The module's parameter an adapter target (`component.name`) changes; None when it runs none."""
    component, _, name = target.partition(".")
    for prefix in _MODULE_PREFIXES.get(component, ()):
        for candidate in spellings(name):
            if prefix + candidate in params:
                return prefix + candidate
    return None


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
        self._adapted: dict[str, dict[str, torch.Tensor]] = {}  # patched weights by adapter set key
        log.info(
            "loaded %s from %s with torch on %s",
            component,
            root / c.CHECKPOINT_SUBFOLDERS[component],
            self.device,
        )

    @torch.inference_mode()
    def run(self, feeds: Feeds, weights: dict[str, torch.Tensor] | None = None) -> Feeds:
        """`weights`: parameters to run with instead of the module's own, for this call only."""
        arrays = [np.ascontiguousarray(feeds[name]) for name in self.input_names]
        inputs = tuple(torch.from_numpy(a).to(self.device) for a in arrays)
        if weights:
            output = torch.func.functional_call(self.module, weights, inputs)
        else:
            output = self.module(*inputs)
        outputs = output if isinstance(output, tuple) else (output,)
        return {name: o.float().cpu().numpy() for name, o in zip(self.output_names, outputs, strict=True)}

    def run_adapted(self, feeds: Feeds, adapters: AdapterSet) -> Feeds:
        """The module's parameters plus the adapters' deltas, through torch.func.functional_call: the
        module itself is never changed."""
        weights = self._adapted.get(adapters.key)
        if weights is None:
            params = dict(self.module.named_parameters())
            names = {t: _param_name(t, params) for t in adapters.all_targets()}
            mine = {t: n for t, n in names.items() if n is not None}
            shapes = {t: tuple(params[n].shape) for t, n in mine.items()}
            with torch.no_grad():
                weights = {
                    mine[t]: params[mine[t]] + torch.from_numpy(d).to(params[mine[t]])
                    for t, d in adapters.deltas(shapes).items()
                }
            self._adapted[adapters.key] = weights
            while len(self._adapted) > self.ADAPTED_SETS:
                del self._adapted[next(iter(self._adapted))]
        return self.run(feeds, weights)
