"""Engine artifacts: one builder per engine kind, used by the export (version 1) and by `sd-triton engine
set` (version N) alike.

A builder says what an artifact is made from (`key`: the inputs' hashes and settings, and for a TensorRT
plan the GPU and TensorRT it is tied to) and how to make it (`build`). One reuse rule serves both
callers (`reuse`): a version folder of the same component whose engine.json carries the same key, and
whose artifact still hashes as that engine.json says, is linked instead of building again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sd_triton.engine_record import EngineRecord, versions_on_disk
from sd_triton.export import tensorrt
from sd_triton.export.checkpoint import artifact_sha256, link_file, link_tree, sha256_tree
from sd_triton.export.components import Profile
from sd_triton.export.quantize import quantize_int8

log = logging.getLogger(__name__)


class ArtifactUnavailable(RuntimeError):
    """The artifact cannot be built on this machine (a TensorRT plan without a GPU); says why."""


@dataclass(frozen=True)
class ArtifactSource:
    """What a component's artifacts are made from."""

    component: str
    onnx: Path  # the exported graph (version 1's model.onnx)
    onnx_sha256: str  # its hash, as the caller already has it (the manifest, or hashed once)
    weights: Path  # the checkpoint's folder of the component's weights
    extra_weights: tuple[Path, ...] = ()  # and more folders (SDXL's second text encoder)
    profile: Profile | None = None  # the engine's shape profile (TensorRT plans)
    work_dir: Path | None = None  # TensorRT's timing cache
    refit: bool = False  # a TensorRT plan built refittable (LoRA adapters)


@dataclass(frozen=True)
class Artifact:
    """An artifact in its version folder."""

    key: str
    sha256: str
    build: dict[str, Any] | None = None  # TensorRT: what the plan was built with and for
    reused_from: int | None = None  # the version whose artifact was linked; None: built (or in place)


class Builder(Protocol):
    label: str  # the manifest entry of a component's derived artifact

    def key(self, source: ArtifactSource, precision: str) -> dict[str, Any]: ...

    def build(self, source: ArtifactSource, precision: str, target: Path) -> dict[str, Any] | None: ...


def link(source: Path, target: Path) -> None:
    """An artifact linked into a version folder: a file with its external data, or a folder."""
    if source.is_dir():
        link_tree(source, target)
        return
    data = (source.with_name(source.name + ".data"), target.with_name(target.name + ".data"))
    for src, dst in ((source, target), data):
        if src.is_file() and src.resolve() != dst.resolve():
            link_file(src, dst)


class OnnxGraph:
    """python-ort and onnxruntime: the exported graph itself (FP32), or its INT8 quantization."""

    label = "int8"

    def key(self, source: ArtifactSource, precision: str) -> dict[str, Any]:
        return {"onnx": source.onnx_sha256, "precision": precision}

    def build(self, source: ArtifactSource, precision: str, target: Path) -> dict[str, Any] | None:
        if precision == "int8":
            quantize_int8(source.onnx, target)
        else:
            link(source.onnx, target)
        return None


class TorchWeights:
    """python-torch: the checkpoint's own weights folder, linked."""

    label = "torch"

    def key(self, source: ArtifactSource, precision: str) -> dict[str, Any]:
        key = {"weights": sha256_tree(source.weights), "precision": precision}
        return {**key, **{f"weights:{w.name}": sha256_tree(w) for w in source.extra_weights}}

    def build(self, source: ArtifactSource, precision: str, target: Path) -> dict[str, Any] | None:
        shutil.rmtree(target, ignore_errors=True)  # no stale file of other weights left beside them
        if not source.extra_weights:
            link_tree(source.weights, target)
            return None
        for folder in (source.weights, *source.extra_weights):  # several: each in a subfolder of its name
            link_tree(folder, target / folder.name)
        return None


class TensorrtPlan:
    """tensorrt: a plan built from the exported graph with the component's profile, on this GPU."""

    label = "plan"

    def key(self, source: ArtifactSource, precision: str) -> dict[str, Any]:
        assert source.profile is not None, "a TensorRT plan needs the engine's profile"
        key = {
            "onnx": source.onnx_sha256,
            "profile": source.profile.shapes,
            "precision": precision,
            "target": tensorrt.build_target(),  # a plan runs only on the GPU and TensorRT that built it
        }
        return {**key, "refit": True} if source.refit else key

    def build(self, source: ArtifactSource, precision: str, target: Path) -> dict[str, Any] | None:
        reason = tensorrt.unavailable_reason()
        gpu = tensorrt.build_target()
        if reason or gpu is None:
            raise ArtifactUnavailable(f"{source.component}: cannot build a TensorRT plan here: {reason}")
        assert source.profile is not None and source.work_dir is not None
        return tensorrt.build_engine(
            source.onnx,
            target,
            source.profile,
            fp16=precision == "fp16",
            timing_cache=tensorrt.timing_cache_path(source.work_dir, gpu),
            refit=source.refit,
        )


BUILDERS: dict[str, Builder] = {
    "python-ort": OnnxGraph(),
    "onnxruntime": OnnxGraph(),
    "python-torch": TorchWeights(),
    "tensorrt": TensorrtPlan(),
}


def reuse(model_dir: Path, key: str, artifact: str) -> EngineRecord | None:
    """A version of the model whose engine.json has this key and artifact, the artifact intact."""
    for version in versions_on_disk(model_dir):
        record = EngineRecord.load(model_dir / str(version))
        if record is None or (record.artifact_key, record.artifact) != (key, artifact) or not record.sha256:
            continue
        path = model_dir / str(version) / artifact
        if path.exists() and artifact_sha256(path) == record.sha256:
            return record
    return None


def make_artifact(
    model_dir: Path, version: int, kind: str, precision: str, artifact: str, source: ArtifactSource
) -> Artifact:
    """The artifact of `model_dir/<version>/<artifact>`: reused when any version already has it, else
    built. Raises ArtifactUnavailable when it cannot be built here."""
    builder = BUILDERS[kind]
    key = json.dumps(builder.key(source, precision), sort_keys=True)
    target = model_dir / str(version) / artifact
    found = reuse(model_dir, key, artifact)
    if found is not None:
        if found.version != version:
            link(model_dir / str(found.version) / artifact, target)
            log.info("  %s: reusing the %s of version %d", source.component, artifact, found.version)
            return Artifact(key, found.sha256, found.build, reused_from=found.version)
        log.info("  %s: %s unchanged, reused", source.component, artifact)
        return Artifact(key, found.sha256, found.build)
    started = time.monotonic()
    build = builder.build(source, precision, target)
    log.info("  %s: %s made in %.1f s", source.component, artifact, time.monotonic() - started)
    return Artifact(key, artifact_sha256(target), build)
