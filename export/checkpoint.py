"""A Stable Diffusion checkpoint (1.x/2.x, or SDXL) in diffusers format, in a local folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_triton.contract import Architecture, added_conditioning
from sd_triton.export.components import ModelDims
from sd_triton.runtime.torch_modules import architecture_of

SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
XL_SUBFOLDERS = ("tokenizer_2", "text_encoder_2")  # SDXL's second tokenizer and text encoder
REFINER_SUBFOLDERS = ("tokenizer_2", "text_encoder_2", "unet", "vae", "scheduler")  # an SDXL refiner's


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    dims: ModelDims
    vae_scaling_factor: float
    scheduler_config: dict[str, Any]
    native_size: tuple[int, int]  # (height, width) the UNet was trained at, in pixels
    architecture: Architecture = "sd"
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero unconditional embeddings
    vae_force_upcast: bool = False  # SDXL: the VAE overflows in FP16 (diffusers upcasts it to FP32)

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"--model {path}: not a diffusers checkpoint folder (no model_index.json)"
            )
        architecture = architecture_of(path)
        needed = REFINER_SUBFOLDERS if architecture == "sdxl-refiner" else SUBFOLDERS
        missing = [s for s in needed if not (path / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"--model {path}: missing subfolder(s) {', '.join(missing)}")
        unet = _json(path / "unet" / "config.json")
        vae = _json(path / "vae" / "config.json")
        text = _json(
            path / ("text_encoder_2" if architecture == "sdxl-refiner" else "text_encoder") / "config.json"
        )
        scheduler = _json(path / "scheduler" / "scheduler_config.json")
        # diffusers' from_pretrained builds the class model_index.json names (usually the config's own)
        named = _json(path / "model_index.json").get("scheduler")
        if isinstance(named, list) and len(named) == 2 and isinstance(named[1], str):
            scheduler = {**scheduler, "_class_name": named[1]}
        text_hidden, vocab_size = int(text["hidden_size"]), int(text["vocab_size"])
        text_widths = (text_hidden,)
        pooled_dim = time_ids = 0
        if architecture == "sdxl-refiner":  # the second encoder alone: its states and its projection
            pooled_dim = int(text.get("projection_dim", text["hidden_size"]))
            time_ids = _time_ids(unet, pooled_dim, path)
        if architecture == "sdxl":
            missing = [s for s in XL_SUBFOLDERS if not (path / s).is_dir()]
            if missing:
                raise FileNotFoundError(f"--model {path}: an SDXL checkpoint without {', '.join(missing)}")
            text_2 = _json(path / "text_encoder_2" / "config.json")
            text_widths = (text_hidden, int(text_2["hidden_size"]))
            text_hidden += int(text_2["hidden_size"])
            vocab_size = min(vocab_size, int(text_2["vocab_size"]))
            pooled_dim = int(text_2.get("projection_dim", text_2["hidden_size"]))
            time_ids = _time_ids(unet, pooled_dim, path)
        dims = ModelDims(
            text_hidden=text_hidden,
            text_widths=text_widths,
            latent_channels=int(vae.get("latent_channels", unet.get("out_channels", 4))),
            vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
            vocab_size=vocab_size,
            unet_in_channels=int(unet.get("in_channels", 4)),
            pooled_dim=pooled_dim,
            time_ids=time_ids,
        )
        sample = unet.get("sample_size", 64)
        latent_h, latent_w = (sample, sample) if isinstance(sample, int) else sample
        native = (latent_h * dims.vae_scale_factor, latent_w * dims.vae_scale_factor)
        index = _json(path / "model_index.json")
        return cls(
            path,
            dims,
            float(vae.get("scaling_factor", 0.18215)),
            scheduler,
            native,
            architecture=architecture,
            # StableDiffusionXLPipeline's default: no negative prompt -> zero unconditional embeddings
            force_zeros_for_empty_prompt=added_conditioning(architecture)
            and bool(index.get("force_zeros_for_empty_prompt", True)),
            # diffusers' SDXL pipelines upcast such a VAE (config default: true); SD's never do
            vae_force_upcast=added_conditioning(architecture) and bool(vae.get("force_upcast", True)),
        )


def _time_ids(unet: dict[str, Any], pooled_dim: int, path: Path) -> int:
    """How many time ids an SDXL UNet's added embedding takes: 6 (sizes) or 5 (the refiner's, with the
    aesthetic score)."""
    per_id = int(unet.get("addition_time_embed_dim") or 0)
    total = int(unet.get("projection_class_embeddings_input_dim") or 0)
    if unet.get("addition_embed_type") != "text_time" or per_id < 1 or (total - pooled_dim) % per_id:
        raise ValueError(
            f"--model {path}: unet/config.json is not an SDXL UNet for this text encoder (needs"
            " addition_embed_type 'text_time' and projection_class_embeddings_input_dim ="
            f" {pooled_dim} + n x addition_time_embed_dim)"
        )
    return (total - pooled_dim) // per_id


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
