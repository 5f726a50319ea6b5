"""A Stable Diffusion 1.x/2.x checkpoint in diffusers format, in a local folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_triton.export.components import ModelDims

SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    dims: ModelDims
    vae_scaling_factor: float
    scheduler_config: dict[str, Any]
    native_size: tuple[int, int]  # (height, width) the UNet was trained at, in pixels

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"--model {path}: not a diffusers checkpoint folder (no model_index.json)"
            )
        missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"--model {path}: missing subfolder(s) {', '.join(missing)}")
        unet = _json(path / "unet" / "config.json")
        vae = _json(path / "vae" / "config.json")
        text = _json(path / "text_encoder" / "config.json")
        scheduler = _json(path / "scheduler" / "scheduler_config.json")
        # diffusers' from_pretrained builds the class model_index.json names (usually the config's own)
        named = _json(path / "model_index.json").get("scheduler")
        if isinstance(named, list) and len(named) == 2 and isinstance(named[1], str):
            scheduler = {**scheduler, "_class_name": named[1]}
        dims = ModelDims(
            text_hidden=int(text["hidden_size"]),
            latent_channels=int(vae.get("latent_channels", unet.get("out_channels", 4))),
            vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
            vocab_size=int(text["vocab_size"]),
            unet_in_channels=int(unet.get("in_channels", 4)),
        )
        sample = unet.get("sample_size", 64)
        latent_h, latent_w = (sample, sample) if isinstance(sample, int) else sample
        native = (latent_h * dims.vae_scale_factor, latent_w * dims.vae_scale_factor)
        return cls(path, dims, float(vae.get("scaling_factor", 0.18215)), scheduler, native)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(folder: Path, salt: str = "") -> str:
    """One hash over every file's relative name and content, plus `salt` (export settings)."""
    digest = hashlib.sha256(salt.encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def artifact_sha256(path: Path) -> str:
    """An engine artifact's hash: a file's sha256, or sha256_tree of a folder (python-torch weights)."""
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def link_file(source: Path, target: Path) -> None:
    """A hard link (no copy of a multi-GB file), or a copy across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def link_tree(source: Path, target: Path) -> None:
    """Every file of `source` linked into `target` (same relative paths)."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        link_file(path, target / path.relative_to(source))
