"""A generic ONNX Runtime runner: the `python-ort` engine kind (CUDA EP on a GPU, CPU EP otherwise)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


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
    """An engine run in a python model: `run` one batch; `run_batch` merges requests that can share one."""

    @abstractmethod
    def run(self, feeds: Feeds) -> Feeds: ...

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
        self.session = ort.InferenceSession(str(model_path), options, providers=choose_providers(device))
        self.output_names = [o.name for o in self.session.get_outputs()]
        log.info("loaded %s with %s", model_path, self.session.get_providers())

    def run(self, feeds: Feeds) -> Feeds:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
