"""A generic ONNX Runtime runner: the `python-ort` engine kind (CUDA EP on a GPU, CPU EP otherwise)."""

from __future__ import annotations

import json
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
    only (the base's weights are never changed: a base request after it is the base's alone)."""

    ADAPTED_SETS = 4  # the patched weights of this many adapter sets stay cached

    @abstractmethod
    def run(self, feeds: Feeds) -> Feeds: ...

    def run_adapted(self, feeds: Feeds, adapters: AdapterSet) -> Feeds:
        raise InvalidRequest(c.LORAS.name, f"the {type(self).__name__} engine cannot apply LoRA adapters")

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
        self.lora_index: dict[str, tuple[str, bool]] = {}
        self.lora_index_path: Path | None = None
        self.lora_sha256 = ""
        self.lora_components: tuple[str, ...] = ()
        self._adapted_parts: tuple[ort.InferenceSession, dict[str, np.ndarray]] | None = None
        self._adapted: dict[str, Feeds] = {}  # patched weights by adapter set key, oldest first
        self._adapted_dir: tempfile.TemporaryDirectory[str] | None = None
        log.info("loaded %s with %s", model_path, self.session.get_providers())

    def run(self, feeds: Feeds) -> Feeds:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def use_lora_index(self, path: Path, sha256: str, components: tuple[str, ...]) -> None:
        """Where to find which initializer holds each adapter target's base weight (transposed or not):
        the library's index (`path`, written by sd-triton lora add) under this graph's sha256;
        `components`: the checkpoint components the graph runs (unet; text_encoder, text_encoder_2)."""
        self.lora_index_path, self.lora_sha256, self.lora_components = path, sha256, components

    def _read_index(self) -> None:
        if self.lora_index_path is not None and self.lora_index_path.is_file():
            entry = json.loads(self.lora_index_path.read_text()).get(self.lora_sha256, {})
            self.lora_index = {
                target: (name, bool(transposed)) for target, (name, transposed) in entry.items()
            }

    def run_adapted(self, feeds: Feeds, adapters: AdapterSet) -> Feeds:
        """The targets' initializers fed as inputs of a second session (the graph with them declared as
        inputs: ONNX Runtime lets a feed override such an initializer); the base session when the set
        changes none of this graph's weights."""
        mine = {t for t in adapters.all_targets() if t.split(".", 1)[0] in self.lora_components}
        if not mine:
            return self.run(feeds)
        if not mine <= set(self.lora_index):
            self._read_index()  # an adapter added since: its targets are in the index now
        missing = sorted(mine - set(self.lora_index))
        if missing:
            raise InvalidRequest(
                c.LORAS.name, f"this engine's graph has no index of {missing[0]} (add the adapter again)"
            )
        session, base = self._adapted_session()
        overrides = self._adapted.get(adapters.key)
        if overrides is None:
            shapes = {}
            for target in mine:
                name, transposed = self.lora_index[target]
                shapes[target] = base[name].T.shape if transposed else base[name].shape
            overrides = {}
            for target, delta in adapters.deltas(shapes).items():
                name, transposed = self.lora_index[target]
                overrides[name] = (base[name] + (delta.T if transposed else delta)).astype(base[name].dtype)
            self._adapted[adapters.key] = overrides
            while len(self._adapted) > self.ADAPTED_SETS:
                del self._adapted[next(iter(self._adapted))]
        outputs = session.run(self.output_names, {**feeds, **overrides})
        return dict(zip(self.output_names, outputs, strict=True))

    def _adapted_session(self) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
        """The session whose indexed initializers are inputs (built again when the index grew)."""
        names = {name for name, _ in self.lora_index.values()}
        if self._adapted_parts is None or not names <= set(self._adapted_parts[1]):
            import onnx
            from onnx import numpy_helper

            model = onnx.load(str(self.model_path))
            base = {}
            for initializer in model.graph.initializer:
                if initializer.name in names:
                    base[initializer.name] = numpy_helper.to_array(initializer)
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
            self._adapted_parts = (session, base)
            self._adapted.clear()
            log.info("%s: a session with %d adapter-targeted weights as inputs", self.model_path, len(base))
        return self._adapted_parts
