"""An exported ONNX graph's weights as LoRA adapter sets change them, for the engines that run that graph
(python-ort, onnxruntime) or a plan built from it (tensorrt):

- `GraphWeights`: which initializer holds each adapter target's base weight (the library's index, written
  by `sd-triton lora add`, under the graph's sha256), the base values of those initializers, and per
  adapter set the patched values (base + the set's delta, cached for the last few sets). python-ort feeds
  them to a session that takes those initializers as inputs; a TensorRT plan is refit with them.
- `Refits`: what a refittable engine holds (an adapter set's patched weights, or the base's) and which
  weights to set to go from that to the next set or back to the base, every weight a set changed
  restored from the graph's own values (no blend of one set left in the next: TensorRT issue #3628).

Torch-free (numpy and onnx).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton import contract as c
from sd_triton.lora import AdapterSet
from sd_triton.requests import InvalidRequest

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


class GraphWeights:
    ADAPTED_SETS = 4  # the patched weights of this many adapter sets stay cached

    def __init__(self, graph: Path, index: Path, sha256: str, components: tuple[str, ...]) -> None:
        """`graph`: the ONNX file; `index`: the library's index.json, read under `sha256` (the graph's);
        `components`: the checkpoint components the graph runs (unet; text_encoder, text_encoder_2)."""
        self.graph, self.index_path, self.sha256, self.components = graph, index, sha256, components
        # target: (initializer, stored transposed); None: the graph does not run its layer (no change)
        self.index: dict[str, tuple[str, bool] | None] = {}
        self._base: Weights = {}  # the indexed initializers' values
        self._all: dict[str, Any] | None = None  # every initializer (TensorProto), read when first asked
        self._patched: dict[str, Weights] = {}  # by adapter set key, oldest first

    def _read_index(self) -> None:
        if self.index_path.is_file():
            entry = json.loads(self.index_path.read_text()).get(self.sha256, {})
            self.index = {
                target: (place[0], bool(place[1])) if place else None for target, place in entry.items()
            }

    def indexed(self) -> set[str]:
        """The initializers some adapter of the library changes."""
        return {place[0] for place in self.index.values() if place}

    def patched(self, adapters: AdapterSet) -> Weights | None:
        """The set's patched initializers (only those it changes), by initializer name; None when it
        changes none of this graph's weights. InvalidRequest (LORAS) for a target the index lacks."""
        mine = {t for t in adapters.all_targets() if t.split(".", 1)[0] in self.components}
        if not mine:
            return None
        if not mine <= set(self.index):
            self._read_index()  # an adapter added since: its targets are in the index now
        missing = sorted(mine - set(self.index))
        if missing:
            raise InvalidRequest(
                c.LORAS.name, f"this engine's graph has no index of {missing[0]} (add the adapter again)"
            )
        cached = self._patched.get(adapters.key)
        if cached is not None:
            return cached
        places = {t: p for t in mine if (p := self.index[t])}
        if not places:
            return None  # only layers the graph does not run
        base = self.base()
        shapes = {
            t: base[name].T.shape if transposed else base[name].shape
            for t, (name, transposed) in places.items()
        }
        patched = {}
        for target, delta in adapters.deltas(shapes).items():
            name, transposed = places[target]
            patched[name] = (base[name] + (delta.T if transposed else delta)).astype(base[name].dtype)
        self._patched[adapters.key] = patched
        while len(self._patched) > self.ADAPTED_SETS:
            del self._patched[next(iter(self._patched))]
        return patched

    def base(self) -> Weights:
        """The base values of the indexed initializers (read again when the index grew)."""
        names = self.indexed()
        if not names <= set(self._base):
            self._base = {name: self.initializer(name) for name in names}
            self._patched.clear()
            log.info("%s: %d adapter-targeted weights read", self.graph, len(self._base))
        return self._base

    def initializer(self, name: str) -> np.ndarray:
        """Any initializer's value, as the graph holds it (TensorRT asks for the ones fused with a
        changed weight)."""
        if name in self._base:
            return self._base[name]
        if self._all is None:
            import onnx

            model = onnx.load(str(self.graph))
            self._all = {initializer.name: initializer for initializer in model.graph.initializer}
        from onnx import numpy_helper

        if name not in self._all:
            raise KeyError(f"{self.graph}: no initializer {name!r}")
        return numpy_helper.to_array(self._all[name])


BASE = ""  # Refits.key of the base's weights


@dataclass
class Refits:
    """A refittable engine's weights: `key` the adapter set it holds (BASE: the base's; UNKNOWN after a
    refit that failed), `changed` the weights that differ from the base's."""

    UNKNOWN = "?"

    key: str = BASE
    changed: set[str] = field(default_factory=set)

    def plan(self, key: str, patched: Weights, base: Callable[[str], np.ndarray]) -> Weights | None:
        """The weights to set for the engine to hold `key` (its patched weights; BASE and {} for the
        base's): `patched`, and the base value (`base(name)`) of every weight changed now that it does not
        change. None when the engine holds it already."""
        if key == self.key:
            return None
        weights = {name: base(name) for name in sorted(self.changed - set(patched))}
        weights.update(patched)
        return weights

    def held(self, key: str, patched: Weights) -> None:
        """The refit to `key` succeeded."""
        self.key, self.changed = key, set(patched)

    def failed(self, weights: Weights) -> None:
        """A refit failed part way: any weight it set may hold either value; the next plan restores
        them all."""
        self.key = self.UNKNOWN
        self.changed |= set(weights)
