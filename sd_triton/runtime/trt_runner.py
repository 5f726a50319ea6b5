"""A TensorRT plan run in this process: the `tensorrt` kind when the denoise loop runs its UNet inline.

Buffers are torch CUDA tensors. Each input shape gets its own execution context, static input and
output buffers and, after one plain run, a CUDA graph of the enqueue: a step then costs one copy in,
one graph launch and one copy out, no TensorRT enqueue per call. Shapes beyond `max_shapes` evict the
least recently used. Needs a GPU, the `tensorrt` package and a plan built for that GPU; on a machine
without them the constructor raises with the reason (nothing here runs on a CPU).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
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
