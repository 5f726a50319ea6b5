"""A generic ONNX Runtime runner: the `python-ort` engine kind (CUDA EP on a GPU, CPU EP otherwise)."""

from __future__ import annotations

import logging
import tempfile
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sd_triton import contract as c
from sd_triton.lora import AdapterSet
from sd_triton.requests import InvalidRequest
from sd_triton.runtime.lora_weights import GraphWeights

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)  # a serialized ModelProto must stay under 2 GB


def choose_providers(device: str) -> list[str]:
    """`device`: auto (CUDA when this onnxruntime has it), cuda, or cpu."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(f"device=cuda but this onnxruntime offers only {available}")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class BatchRunner(ABC):
    """An engine run in a python model: `run` one batch; `run_batch` merges requests that can share one.
    `run_adapted`: one batch with LoRA adapters' weight deltas added to the base's weights, for this call
    only (a base request after it is the base's alone). `lora`: the graph's adapter weights, for the
    engines that run an exported ONNX graph or a plan built from one (set by the loop that loads it)."""

    ADAPTED_SETS = GraphWeights.ADAPTED_SETS
    lora: GraphWeights | None = None

    @abstractmethod
    def run(self, feeds: Feeds) -> Feeds: ...

    def run_adapted(self, feeds: Feeds, adapters: AdapterSet) -> Feeds:
        raise InvalidRequest(c.LORAS.name, f"the {type(self).__name__} engine cannot apply LoRA adapters")

    def _weights(self) -> GraphWeights:
        if self.lora is None:
            raise InvalidRequest(c.LORAS.name, "this engine was loaded without the library's index")
        return self.lora

    def run_batch(self, requests: Sequence[Feeds]) -> list[Feeds | Exception]:
        """Requests whose inputs agree in all but the batch dimension run as one batch. A group
        that fails (a bad shape sent to this model directly) gets its error; the others their outputs."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, feeds in enumerate(requests):
            groups[tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items()))].append(index)
        results: list[Feeds | Exception] = [RuntimeError("not run")] * len(requests)
        for indices in groups.values():
            names = requests[indices[0]].keys()
            try:
                merged = {k: np.concatenate([requests[i][k] for i in indices]) for k in names}
                outputs = self.run(merged)
            except Exception as exc:  # noqa: BLE001 - reported to each request of the group
                for i in indices:
                    results[i] = exc
                continue
            offset = 0
            for i in indices:
                size = next(iter(requests[i].values())).shape[0]
                results[i] = {k: v[offset : offset + size] for k, v in outputs.items()}
                offset += size
        return results

    def run_each(self, requests: Sequence[Feeds], max_batch: int = 0) -> list[Feeds | Exception]:
        """`run_batch` in order, in chunks of at most `max_batch` rows (0: no limit; a request larger
        than that runs alone): the engine's profile bounds a call however many requests share it."""
        results: list[Feeds | Exception] = []
        chunk: list[Feeds] = []
        chunk_rows = 0
        for feeds in [*requests, None]:  # None: the end, run what is left
            rows = 0 if feeds is None else len(next(iter(feeds.values())))
            if chunk and (feeds is None or 0 < max_batch < chunk_rows + rows):
                results += self.run_batch(chunk)
                chunk, chunk_rows = [], 0
            if feeds is not None:
                chunk.append(feeds)
                chunk_rows += rows
        return results


class OrtRunner(BatchRunner):
    def __init__(
        self, model_path: str | Path, device: str = "auto", threads: int = 0, spinning: bool = True
    ) -> None:
        """`spinning`: idle intra-op threads spin (ONNX Runtime's default, best for one session alone).
        The python-ort Triton engines turn it off: several sessions share the cores there, and the
        spinning threads of one take the cores the others compute on."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.model_path, self.options, self.providers = Path(model_path), options, choose_providers(device)
        self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._adapted_session: tuple[ort.InferenceSession, set[str]] | None = None
        self._adapted_dir: tempfile.TemporaryDirectory[str] | None = None
        log.info("loaded %s with %s", model_path, self.session.get_providers())

    def run(self, feeds: Feeds) -> Feeds:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def run_adapted(self, feeds: Feeds, adapters: AdapterSet) -> Feeds:
        """The patched initializers fed as inputs of a second session (the graph with the indexed ones
        declared as inputs: ONNX Runtime lets a feed override such an initializer); the base session when
        the set changes none of this graph's weights."""
        patched = self._weights().patched(adapters)
        if patched is None:
            return self.run(feeds)
        outputs = self._adapted().run(self.output_names, {**feeds, **patched})
        return dict(zip(self.output_names, outputs, strict=True))

    def _adapted(self) -> ort.InferenceSession:
        """The session whose indexed initializers are inputs (built again when the index grew)."""
        assert self.lora is not None
        names = self.lora.indexed()
        if self._adapted_session is None or not names <= self._adapted_session[1]:
            import onnx

            model = onnx.load(str(self.model_path))
            for initializer in model.graph.initializer:
                if initializer.name in names:
                    model.graph.input.append(
                        onnx.helper.make_tensor_value_info(
                            initializer.name, initializer.data_type, list(initializer.dims)
                        )
                    )
            if model.ByteSize() < PROTOBUF_LIMIT:
                session = ort.InferenceSession(
                    model.SerializeToString(), self.options, providers=self.providers
                )
            else:  # past protobuf's 2 GB (an SD UNet in FP32): the weights in a file beside the graph
                self._adapted_dir = tempfile.TemporaryDirectory(prefix="sd-triton-lora-")
                path = Path(self._adapted_dir.name) / "model.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin")
                session = ort.InferenceSession(str(path), self.options, providers=self.providers)
            self._adapted_session = (session, names)
            log.info("%s: a session with %d adapter-targeted weights as inputs", self.model_path, len(names))
        return self._adapted_session[0]
