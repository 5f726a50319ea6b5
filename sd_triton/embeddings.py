"""Textual-inversion embeddings as a pipeline serves them: the library's layout, an embedding's record, the
embedding files users bring, and the tokenizer's view of the library. Torch-free (numpy and safetensors'
numpy loader): the tokenizer model reads embeddings through it.

An embedding in the library (`sd-triton embeddings add FILE --token T`, sd_triton/export/embeddings.py) is
a folder `<repository>/<pipeline's tokenizer model>/embeddings/<sha256(token)[:16]>/` holding

- `vectors.safetensors`: per text encoder of the pipeline, by its checkpoint subfolder (`text_encoder`,
  SDXL's `text_encoder_2` too), the learned vectors [n, width], and
- `embedding.json`: its token, the source file's sha256, the format it came in and its vector count.

As diffusers' `load_textual_inversion` has it, the token in a prompt stands for the n vectors in order (n
tokens, counted against the prompt's length); it is matched as the tokenizer matches added tokens
(anywhere in the text, in any case).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton import contract as c

log = logging.getLogger(__name__)

LIBRARY = "embeddings"  # the folder, in the pipeline's tokenizer model folder (Triton ignores it)
RECORD = "embedding.json"
VECTORS = "vectors.safetensors"
MAX_TOKEN_CHARS = 64
MAX_VECTORS = 75  # one chunk's worth of text: an embedding past it could not fit in a prompt


class EmbeddingError(ValueError):
    """An embedding file or token the library cannot take (the message names the problem)."""


def library_dir(repo: Path, pipeline: str = "") -> Path:
    """A pipeline's embedding library in an exported repository."""
    return repo / c.model_name(pipeline, c.TOKENIZER.name) / LIBRARY


def folder_name(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def check_token(token: str) -> str:
    """A token users can write in a prompt: 1-64 characters, no whitespace, not a prompt-syntax character."""
    if not 0 < len(token) <= MAX_TOKEN_CHARS or any(ch.isspace() or ch in "()[]:\\" for ch in token):
        raise EmbeddingError(
            f"token {token!r}: 1-{MAX_TOKEN_CHARS} characters without whitespace or any of ()[]:\\ "
            "(e.g. <my-style>)"
        )
    return token


def encoder_folders(architecture: str) -> tuple[str, ...]:
    """The checkpoint subfolders of the pipeline's text encoders, in its engine's order."""
    return c.checkpoint_subfolders(c.TEXT_ENCODER.name, architecture)


def vectors_of(state: Mapping[str, Any], widths: Mapping[str, int]) -> tuple[str, dict[str, np.ndarray], str]:
    """(format, vectors per text encoder [n, width], the token the file names or "") from an embedding
    file's contents, read as diffusers' load_textual_inversion reads them: AUTOMATIC1111's `.pt`
    (`string_to_param`, one entry) or `.safetensors` (`emb_params`), diffusers' (one entry: the token ->
    its vectors), SDXL's (`clip_l` and `clip_g`: the first and second text encoder's). `widths`: the
    pipeline's encoders by checkpoint subfolder and their widths. EmbeddingError names what does not fit."""
    token = ""
    if "clip_l" in state or "clip_g" in state:
        fmt, found = "sdxl", {"text_encoder": state.get("clip_l"), "text_encoder_2": state.get("clip_g")}
    else:
        if "string_to_param" in state:
            fmt, params = "a1111", dict(state["string_to_param"])
            token = str(state.get("name", ""))
        elif "emb_params" in state:
            fmt, params = "a1111", {"*": state["emb_params"]}
        else:
            fmt, params = "diffusers", dict(state)
            token = next(iter(params), "")
        if len(params) != 1:
            raise EmbeddingError(f"expected one embedding in the file, found {len(params)}: {sorted(params)}")
        single = next(iter(params.values()))
        if len(widths) > 1:
            raise EmbeddingError(
                f"this pipeline has {len(widths)} text encoders ({', '.join(widths)}): an embedding for it "
                "holds clip_l and clip_g (SDXL's format)"
            )
        found = dict.fromkeys(widths, single)
    vectors: dict[str, np.ndarray] = {}
    for encoder, width in widths.items():
        value = found.get(encoder)
        if value is None:
            raise EmbeddingError(
                f"{fmt} file without vectors for {encoder} (the pipeline's encoders: {list(widths)})"
            )
        array = np.asarray(value, np.float32)
        array = array.reshape(1, -1) if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] != width or not 0 < array.shape[0] <= MAX_VECTORS:
            raise EmbeddingError(
                f"{encoder}: vectors of shape {list(np.shape(value))}; this pipeline takes [n, {width}], "
                f"1 <= n <= {MAX_VECTORS}"
            )
        if not np.isfinite(array).all():
            raise EmbeddingError(f"{encoder}: the vectors hold NaN or infinity")
        vectors[encoder] = array
    if len({a.shape[0] for a in vectors.values()}) > 1:
        raise EmbeddingError(f"the encoders' vector counts differ: {[a.shape[0] for a in vectors.values()]}")
    return fmt, vectors, token


@dataclass(frozen=True)
class EmbeddingRecord:
    """`embedding.json`: what the library knows of an embedding without reading its vectors."""

    token: str
    sha256: str  # of the file that was added
    source: str  # its file name
    format: str  # a1111, diffusers or sdxl, as the file came
    vectors: int  # tokens it stands for
    pipeline: str = ""
    architecture: str = "sd"
    created: str = ""

    @classmethod
    def load(cls, folder: Path) -> EmbeddingRecord:
        return cls(**json.loads((folder / RECORD).read_text()))

    def save(self, folder: Path) -> None:
        (folder / RECORD).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    def summary(self) -> dict[str, Any]:
        """What /v1/models and `embeddings list` show."""
        return asdict(self)


def records(folder: Path) -> list[EmbeddingRecord]:
    """The embeddings of a library folder, by token (not one being added: `.NAME.adding`)."""
    found = [
        EmbeddingRecord.load(p)
        for p in folder.glob("*")
        if (p / RECORD).is_file() and not p.name.startswith(".")
    ]
    return sorted(found, key=lambda r: r.token)


@dataclass(frozen=True)
class Embedding:
    record: EmbeddingRecord
    vectors: tuple[np.ndarray, ...]  # per text encoder, in the engine's order: [n, width]


class EmbeddingLibrary:
    """The tokenizer's view of its pipeline's library: every embedding, by token, read again when the
    folder changes (an embedding added, replaced or removed reaches the next request)."""

    def __init__(self, folder: Path, encoders: tuple[str, ...]) -> None:
        self.folder, self.encoders = folder, encoders
        self._stamp: tuple[tuple[str, int], ...] | None = None
        self._embeddings: tuple[Embedding, ...] = ()

    def stamp(self) -> tuple[tuple[str, int], ...]:
        """What changes when the library does: each record file and its modification time."""
        if not self.folder.is_dir():
            return ()
        stamps = []
        for entry in os.scandir(self.folder):
            record = os.path.join(entry.path, RECORD)
            if not entry.name.startswith(".") and os.path.isfile(record):
                stamps.append((entry.name, os.stat(record).st_mtime_ns))
        return tuple(sorted(stamps))

    def current(self) -> tuple[tuple[Embedding, ...], bool]:
        """The embeddings, by token, and whether they changed since the last call."""
        stamp = self.stamp()
        if stamp == self._stamp:
            return self._embeddings, False
        from safetensors.numpy import load_file

        embeddings = []
        try:
            for record in records(self.folder):
                tensors = load_file(str(self.folder / folder_name(record.token) / VECTORS))
                embeddings.append(Embedding(record, tuple(tensors[e] for e in self.encoders)))
        except (OSError, ValueError, KeyError) as exc:  # removed or replaced while read: read again next call
            log.warning("%s: changing while read (%s); keeping the embeddings read before", self.folder, exc)
            return self._embeddings, False
        self._stamp, self._embeddings = stamp, tuple(embeddings)
        return self._embeddings, True
