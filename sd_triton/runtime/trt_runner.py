"""A TensorRT plan run in this process: the `tensorrt` kind when the denoise loop runs its UNet inline.

Buffers are torch CUDA tensors. Each input shape gets its own execution context, static input and
output buffers and, after one plain run, a CUDA graph of the enqueue: a step then costs one copy in,
one graph launch and one copy out, no TensorRT enqueue per call. Shapes beyond `max_shapes` evict the
least recently used. Needs a GPU, the `tensorrt` package and a plan built for that GPU; on a machine
without them the constructor raises with the reason (nothing here runs on a CPU).

LoRA adapters: a plan built refittable (`--tensorrt-refit`) is refit with an adapter set's patched
weights (the ONNX initializers' names, which the parser gave its weights; runtime/lora_weights.py)
before a call for that set, and with the base's own values of those weights before the next base call:
one set's weights at a time, the calls of one set one after another (the loop groups rows by set).
Captured CUDA graphs are captured again after a refit.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton import contract as c
from sd_triton.lora import AdapterSet
from sd_triton.requests import InvalidRequest
from sd_triton.runtime.lora_weights import BASE, Refits, Weights
from sd_triton.runtime.ort_runner import BatchRunner, Feeds

log = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (None: it can)."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError as exc:
        return f"the tensorrt package is not installed ({exc.name})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return None


@dataclass
class _Bound:
    """One input shape: its context, buffers and (once captured) CUDA graph."""

    context: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    graph: Any = None


class TrtRunner(BatchRunner):
    def __init__(self, component: str, plan: Path, max_shapes: int = 8, cuda_graphs: bool = True) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{component}: cannot run the TensorRT plan {plan} in this process: {reason}")
        import tensorrt as trt
        import torch

        self.torch, self.trt, self.component = torch, trt, component
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"{component}: TensorRT could not deserialize {plan} (built for another GPU or version?)"
            )
        # the plan's own tensors (the contract's names, as exported: SD's or SDXL's engines)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {
            name: torch.float16 if self.engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
            for name in [*self.input_names, *self.output_names]
        }
        self.stream = torch.cuda.Stream()
        self.max_shapes = max_shapes
        self.cuda_graphs = cuda_graphs
        self.bound: OrderedDict[tuple, _Bound] = OrderedDict()
        self.refits = Refits()
        log.info(
            "loaded %s from %s with TensorRT (CUDA graphs %s)",
            component,
            plan,
            "on" if cuda_graphs else "off",
        )

    def _bind(self, feeds: Feeds) -> _Bound:
        key = tuple(feeds[name].shape for name in self.input_names)
        if key in self.bound:
            self.bound.move_to_end(key)
            return self.bound[key]
        torch = self.torch
        context = self.engine.create_execution_context()
        inputs = {}
        for name in self.input_names:
            inputs[name] = torch.empty(feeds[name].shape, dtype=self.dtypes[name], device="cuda")
            context.set_input_shape(name, tuple(feeds[name].shape))
            context.set_tensor_address(name, inputs[name].data_ptr())
        outputs = {}
        for name in self.output_names:
            outputs[name] = torch.empty(
                tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda"
            )
            context.set_tensor_address(name, outputs[name].data_ptr())
        bound = _Bound(context, inputs, outputs)
        self.bound[key] = bound
        while len(self.bound) > self.max_shapes:
            self.bound.popitem(last=False)
        return bound

    def run(self, feeds: Feeds) -> Feeds:
        if self.refits.key != BASE:
            self._refit(BASE, {})
        return self._execute(feeds)

    def run_adapted(self, feeds: Feeds, adapters: AdapterSet) -> Feeds:
        """The plan refit to the set's patched weights (unless it holds them), then run."""
        weights = self._weights()
        if not self.engine.refittable:
            raise InvalidRequest(
                c.LORAS.name,
                f"the {self.component}'s TensorRT plan was built without refit: build it with "
                "--tensorrt-refit (sd-triton export) to serve adapters on it",
            )
        patched = weights.patched(adapters)
        if patched is None:
            return self.run(feeds)
        self._refit(adapters.key, patched)
        return self._execute(feeds)

    def _refit(self, key: str, patched: Weights) -> None:
        """Refits the plan to hold `key` (Refits.plan: the set's weights, the base's values of the ones
        the set held now changed and the next does not, and any weight TensorRT fused with those)."""
        assert self.lora is not None
        weights = self.refits.plan(key, patched, self.lora.initializer)
        if weights is None:
            return
        trt = self.trt
        refitter = trt.Refitter(self.engine, self.logger)
        kept = []  # the arrays stay alive until the refit is done
        try:
            for name, array in weights.items():
                kept.append(array := np.ascontiguousarray(array))
                if not refitter.set_named_weights(name, trt.Weights(array)):
                    raise RuntimeError(f"{self.component}: TensorRT refused the refit weights {name}")
            for name in refitter.get_missing_weights():  # fused with a changed weight: its own value
                kept.append(array := np.ascontiguousarray(patched.get(name, self.lora.initializer(name))))
                refitter.set_named_weights(name, trt.Weights(array))
            self.stream.synchronize()  # no call in flight while the weights change
            if not refitter.refit_cuda_engine():
                raise RuntimeError(f"{self.component}: TensorRT could not refit the plan (see its log)")
        except Exception:
            self.refits.failed(weights)
            raise
        self.refits.held(key, patched)
        for bound in self.bound.values():
            bound.graph = None
        log.info("%s: refit %d weights for %s", self.component, len(weights), key or "the base")

    def _execute(self, feeds: Feeds) -> Feeds:
        torch = self.torch
        bound = self._bind(feeds)
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                bound.inputs[name].copy_(
                    torch.from_numpy(np.ascontiguousarray(feeds[name])), non_blocking=True
                )
            if bound.graph is not None:
                bound.graph.replay()
            else:
                if not bound.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT: execute_async_v3 failed")
                if self.cuda_graphs:  # the first run set the shapes up; capture the next ones
                    self.stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        bound.context.execute_async_v3(self.stream.cuda_stream)
                    bound.graph = graph
            results = {name: bound.outputs[name].float().cpu().numpy() for name in self.output_names}
        return results
