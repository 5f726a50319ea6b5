"""`sd-triton embeddings add|list|remove`: a pipeline's textual-inversion library (sd_triton/embeddings.py).

`add` reads an embedding file as diffusers' load_textual_inversion does (AUTOMATIC1111 `.pt`/`.safetensors`,
diffusers' `learned_embeds`, SDXL's clip_l/clip_g), checks its vectors against the pipeline's text encoders
and its token against their tokenizers, and writes it to the library; the tokenizer model reads it on its
next request (no reload).
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton import contract as c
from sd_triton.embeddings import (
    RECORD,
    VECTORS,
    EmbeddingError,
    EmbeddingRecord,
    check_token,
    encoder_folders,
    folder_name,
    library_dir,
    records,
    vectors_of,
)
from sd_triton.export.checkpoint import sha256_file
from sd_triton.pipeline_config import FILENAME as PIPELINE_FILE
from sd_triton.pipeline_config import PipelineConfig

log = logging.getLogger(__name__)


def read_file(file: Path) -> dict[str, Any]:
    """An embedding file's contents, tensors as numpy arrays (`.pt`/`.bin`: torch's pickle, weights only)."""
    if not file.is_file():
        raise EmbeddingError(f"{file}: no such file")
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(file)))
    import torch

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise EmbeddingError(f"{file}: not an embedding file torch can read safely ({exc})") from None
    if not isinstance(state, dict):
        raise EmbeddingError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")

    def numpy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().float().numpy()
        if isinstance(value, dict):
            return {k: numpy(v) for k, v in value.items()}
        return value

    return {str(k): numpy(v) for k, v in state.items()}


def _tokenizer_version(repo: Path, pipeline: str) -> Path:
    """The pipeline's tokenizer model's version folder: its tokenizers and pipeline.json."""
    return repo / c.model_name(pipeline, c.TOKENIZER.name) / "1"


def _pipeline(repo: Path, pipeline: str) -> PipelineConfig:
    path = _tokenizer_version(repo, pipeline) / PIPELINE_FILE
    if not path.is_file():
        raise EmbeddingError(f"{path}: not found; export the pipeline (again) with this version first")
    config = PipelineConfig.load(path)
    if not config.text_widths:
        raise EmbeddingError(f"{path}: an export before textual inversion; export the pipeline again")
    return config


def _check_vocabulary(repo: Path, pipeline: str, token: str) -> None:
    """diffusers refuses a token its tokenizer already has; so does the library."""
    from transformers import CLIPTokenizer

    version = _tokenizer_version(repo, pipeline)
    for folder in ("tokenizer", "tokenizer_2"):
        if (version / folder).is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(str(version / folder), local_files_only=True)
            vocab = tokenizer.get_vocab()
            if token in vocab or f"{token}</w>" in vocab:
                raise EmbeddingError(f"token {token!r} is a word of the tokenizer already: pick another")


def add(
    repo: Path, file: Path, token: str | None = None, pipeline: str = "", replace: bool = False
) -> EmbeddingRecord:
    """Adds `file` to the pipeline's library under `token` (default: the token the file names)."""
    from safetensors.numpy import save_file

    # 1. The vectors, as diffusers reads the file, against the pipeline's text encoders.
    config = _pipeline(repo, pipeline)
    widths = dict(zip(encoder_folders(config.architecture), config.text_widths or [], strict=True))
    fmt, vectors, named = vectors_of(read_file(file), widths)
    token = check_token(token or named)
    folder = library_dir(repo, pipeline) / folder_name(token)
    if (folder / RECORD).is_file() and not replace:
        raise EmbeddingError(f"token {token!r}: already in the library; remove it first or pass --replace")
    _check_vocabulary(repo, pipeline, token)
    # 2. The vectors and the record, written beside, then moved in whole.
    staging = folder.with_name(f".{folder.name}.adding")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in vectors.items()}, str(staging / VECTORS))
    record = EmbeddingRecord(
        token=token,
        sha256=sha256_file(file),
        source=file.name,
        format=fmt,
        vectors=next(iter(vectors.values())).shape[0],
        pipeline=pipeline,
        architecture=config.architecture,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    record.save(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    log.info("%s: added to %s (%s, %d vectors)", token, folder.parent, fmt, record.vectors)
    return record


def listed(repo: Path, pipeline: str = "") -> list[EmbeddingRecord]:
    return records(library_dir(repo, pipeline))


def remove(repo: Path, token: str, pipeline: str = "") -> None:
    folder = library_dir(repo, pipeline) / folder_name(token)
    if not (folder / RECORD).is_file():
        known = ", ".join(r.token for r in listed(repo, pipeline)) or "none"
        raise EmbeddingError(f"token {token!r}: not in the library (tokens: {known})")
    shutil.rmtree(folder)
    log.info("%s: removed from %s", token, folder.parent)
