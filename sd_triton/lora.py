"""LoRA adapters as a pipeline serves them: the library's folder layout, an adapter's record, and the weight
deltas an adapter set adds to the base's weights. Torch-free (numpy and safetensors' numpy loader): the
denoising loops read adapters through it.

An adapter in the library (`sd-triton lora add`, sd_triton/export/lora.py) is a folder
`<repository>/<pipeline's denoise model>/loras/<name>/` holding

- `adapter.safetensors`: per target weight `T` (the base's parameter name, prefixed by its checkpoint
  subfolder: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`), the low-rank
  factors `T:down` [rank, in, ...] and `T:up` [out, rank, ...], and
- `lora.json`: its name, the source file's sha256, the format it came in, its rank, the targets' scales
  (alpha / rank) and counts per component, and the pipeline it was checked against.

The delta of target T at adapter scale s is s x scale(T) x up @ down (reshaped to T's shape: a linear
layer's [out, in], a convolution's [out, in, kh, kw]); an adapter set's delta is the sum of its adapters'.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sd_triton import contract as c

if TYPE_CHECKING:
    from sd_triton.engine_record import EngineRecord

LIBRARY = "loras"  # the folder, in the pipeline's denoise model folder (Triton ignores non-numeric ones)
RECORD = "lora.json"
WEIGHTS = "adapter.safetensors"
INDEX = "index.json"  # per ONNX graph (its sha256): each target's initializer and whether it is transposed
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
# the checkpoint components each engine model runs (SDXL's text encoder: both of its encoders)
LORA_COMPONENTS = {"unet": ("unet",), "text_encoder": ("text_encoder", "text_encoder_2")}
MAX_SCALE = c.MAX_LORA_SCALE


def library_dir(repo: Path, pipeline: str = "") -> Path:
    """A pipeline's adapter library in an exported repository."""
    return repo / c.model_name(pipeline, c.DENOISE.name) / LIBRARY


def spellings(name: str) -> tuple[str, ...]:
    """A weight's name as checkpoints and modules spell it: text encoders saved by older transformers
    releases have a `text_model.` level that newer ones do not."""
    return (name, f"text_model.{name}", name.removeprefix("text_model."))


def indexed_graph(model_dir: Path, record: EngineRecord) -> tuple[str, Path] | None:
    """Where the index finds an engine version's adapter targets: the sha256 it files them under and the
    ONNX graph holding the base weights. The version's own graph (python-ort, onnxruntime), or the
    exported graph a TensorRT plan was built from (version 1's); None for an engine that applies adapters
    to its checkpoint's weights (python-torch) or a plan of unknown origin (an operator's)."""
    if record.kind in ("python-ort", "onnxruntime"):
        return record.sha256, model_dir / str(record.version) / record.artifact
    if record.kind == "tensorrt" and record.source_sha256:
        return record.source_sha256, model_dir / "1" / "model.onnx"
    return None


def records(folder: Path) -> list[AdapterRecord]:
    """The adapters of a library folder, by name (not one being added: `.NAME.adding`)."""
    folders = sorted(p for p in folder.glob("*") if (p / RECORD).is_file() and not p.name.startswith("."))
    return [AdapterRecord.load(p) for p in folders]


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"name {name!r}: 1-64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class AdapterRecord:
    """`lora.json`: what the library knows of an adapter without reading its weights."""

    name: str
    sha256: str  # of the file that was added
    source: str  # its file name
    format: str  # "diffusers" (PEFT keys) or "kohya", as the file came
    rank: int  # the largest of its targets'
    scales: dict[str, float]  # per target weight: alpha / rank (1 without an alpha)
    components: dict[str, int]  # targets per checkpoint subfolder (unet, text_encoder, text_encoder_2)
    pipeline: str = ""
    architecture: str = "sd"
    created: str = ""

    @classmethod
    def load(cls, folder: Path) -> AdapterRecord:
        return cls(**json.loads((folder / RECORD).read_text()))

    def save(self, folder: Path) -> None:
        text = json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"
        (folder / RECORD).write_text(text)

    def summary(self) -> dict[str, Any]:
        """What /v1/loras and `lora list` show (no per-target scales)."""
        keep = (
            "name",
            "sha256",
            "source",
            "format",
            "rank",
            "components",
            "pipeline",
            "architecture",
            "created",
        )
        return {key: getattr(self, key) for key in keep}


@dataclass
class Adapter:
    """An adapter's record and factors, read from its library folder."""

    record: AdapterRecord
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # target: (down, up)

    @classmethod
    def load(cls, folder: Path) -> Adapter:
        from safetensors.numpy import load_file

        record = AdapterRecord.load(folder)
        tensors = load_file(str(folder / WEIGHTS))
        factors = {target: (tensors[f"{target}:down"], tensors[f"{target}:up"]) for target in record.scales}
        return cls(record, factors)

    def only(self, targets: Collection[str]) -> Adapter:
        """This adapter restricted to `targets` (an engine runs some of its components only)."""
        scales = {t: s for t, s in self.record.scales.items() if t in targets}
        record = dataclasses.replace(self.record, scales=scales)
        return Adapter(record, {t: f for t, f in self.factors.items() if t in scales})

    def delta(self, target: str, shape: tuple[int, ...]) -> np.ndarray:
        """Target's weight delta at adapter scale 1, shaped as the base weight (`shape`)."""
        down, up = self.factors[target]
        product = up.reshape(up.shape[0], -1).astype(np.float32) @ down.reshape(down.shape[0], -1).astype(
            np.float32
        )
        return (self.record.scales[target] * product).reshape(shape)


def set_deltas(
    adapters: list[tuple[Adapter, float]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """An adapter set's weight deltas: per target weight, the sum over the set of scale x its delta.
    `shapes`: the base's weight shapes by target name."""
    deltas: dict[str, np.ndarray] = {}
    for adapter, scale in adapters:
        for target in adapter.record.scales:
            part = scale * adapter.delta(target, shapes[target])
            deltas[target] = part if target not in deltas else deltas[target] + part
    return deltas


@dataclass(frozen=True)
class AdapterSet:
    """A request's adapters and their scales, as the loop applies them: `key` tells sets apart (rows of
    one set share UNet calls; patched weights are cached by it)."""

    adapters: tuple[tuple[Adapter, float], ...]

    @property
    def key(self) -> str:
        return ";".join(f"{a.record.name}@{a.record.sha256[:16]}*{s:g}" for a, s in self.adapters)

    def all_targets(self) -> set[str]:
        """The weights it changes (`component.name`)."""
        return {t for a, _ in self.adapters for t in a.record.scales}

    def deltas(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The weight deltas of the targets in `shapes` (by target name)."""
        chosen = [(a.only(shapes), s) for a, s in self.adapters]
        return set_deltas(chosen, shapes)

    def provenance(self) -> list[dict[str, Any]]:
        return [{"name": a.record.name, "sha256": a.record.sha256, "scale": s} for a, s in self.adapters]


class LoraLibrary:
    """A loop's view of its pipeline's library: adapters read on first use and kept while their file's
    sha256 stays (a re-added name is read again)."""

    MAX_ADAPTERS = c.MAX_LORAS

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[str, Adapter] = {}

    def resolve(self, text: str, field_name: str = "LORAS") -> AdapterSet | None:
        """A request's JSON list of {name, scale} (scale default 1) as an AdapterSet; None for none.
        InvalidRequest naming `field_name` for a bad list, an unknown name or a scale out of range."""
        from sd_triton.requests import InvalidRequest

        try:
            items = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise InvalidRequest(field_name, f"must be a JSON list of {{name, scale}}: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
            raise InvalidRequest(field_name, 'must be a JSON list of {"name": ..., "scale": ...}')
        if len(items) > self.MAX_ADAPTERS:
            raise InvalidRequest(field_name, f"at most {self.MAX_ADAPTERS} adapters, got {len(items)}")
        names = [str(i["name"]) for i in items]
        if len(set(names)) != len(names):
            raise InvalidRequest(field_name, f"an adapter is named twice: {names}")
        chosen = []
        for item in sorted(items, key=lambda i: str(i["name"])):
            scale = item.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) <= MAX_SCALE:
                raise InvalidRequest(
                    field_name,
                    f"{item['name']}: scale must be from -{MAX_SCALE:g} to {MAX_SCALE:g}, got {scale!r}",
                )
            chosen.append((self._adapter(str(item["name"]), field_name), float(scale)))
        chosen = [(a, s) for a, s in chosen if s != 0.0]  # a zero scale is the base
        return AdapterSet(tuple(chosen)) if chosen else None

    def listing(self) -> list[dict[str, Any]]:
        """Every adapter's summary (AdapterRecord.summary), by name: what the gateway lists."""
        return [record.summary() for record in records(self.folder)]

    def _adapter(self, name: str, field_name: str) -> Adapter:
        from sd_triton.requests import InvalidRequest

        folder = self.folder / name
        if not NAME.match(name) or not (folder / RECORD).is_file():
            known = sorted(p.name for p in self.folder.glob("*") if (p / RECORD).is_file())
            raise InvalidRequest(
                field_name,
                f"no adapter {name!r} in this pipeline's library (adapters: {', '.join(known) or 'none'})",
            )
        record = AdapterRecord.load(folder)
        cached = self._cache.get(name)
        if cached is None or cached.record.sha256 != record.sha256:
            cached = self._cache[name] = Adapter.load(folder)
        return cached
