"""`sd-triton export`: a diffusers checkpoint -> ONNX (+ TensorRT plans) -> a Triton model repository.

Idempotent: each artifact is reused while its source (the checkpoint subfolder and the export
settings) hashes the same as the manifest says and the artifact itself is unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sd_triton import contract as c
from sd_triton import paths
from sd_triton.contract import UNET, Limits
from sd_triton.engine_record import EngineRecord
from sd_triton.export.artifacts import BUILDERS, Artifact, ArtifactSource, ArtifactUnavailable, make_artifact
from sd_triton.export.checkpoint import Checkpoint, sha256_file, sha256_tree
from sd_triton.export.components import Component, Profile, components
from sd_triton.export.controlnet import export_controlnets
from sd_triton.export.manifest import Manifest, ManifestError
from sd_triton.export.onnx_export import OPSET, export_onnx
from sd_triton.export.presets import PRESETS, ensure_preset_checkpoint
from sd_triton.export.preview import fit_preview_weights
from sd_triton.export.repository import (
    PYTHON_MODELS,
    RepositorySettings,
    manifest_file,
    write_configs,
    write_model_py,
)
from sd_triton.pipeline_config import FILENAME as PIPELINE_FILE
from sd_triton.pipeline_config import PipelineConfig
from sd_triton.runtime.schedulers import default_scheduler_class
from sd_triton.served_model import ServedModel

log = logging.getLogger(__name__)

# committed in the source tree (see its README), not in the wheel: 22 MB that only the demo uses
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"
STEPS = 7
# the checkpoint's tokenizer folders -> tokenizer/1/'s, by architecture (a refiner's one is SDXL's second)
TOKENIZER_FOLDERS = {
    "sd": {"tokenizer": "tokenizer"},
    "sdxl": {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2"},
    "sdxl-refiner": {"tokenizer_2": "tokenizer"},
}


@dataclass(frozen=True)
class ExportOptions:
    model: str  # a diffusers folder, a preset (random weights, built: tiny, small, sd15) or "demo" (trained)
    repo: Path
    settings: RepositorySettings = field(default_factory=RepositorySettings)
    limits: Limits = field(default_factory=Limits)
    work_dir: Path = field(default_factory=paths.work_dir)  # presets, TensorRT timing cache
    # ControlNets served with the pipeline: name -> a ControlNetModel folder or random:SEED (controlnet.py)
    controlnets: dict[str, str] = field(default_factory=dict)


def _step(n: int, what: str) -> None:
    log.info("[%d/%d] %s", n, STEPS, what)


def run_export(options: ExportOptions) -> dict[str, Any]:
    started = time.monotonic()
    repo = options.repo.resolve()
    repo.mkdir(parents=True, exist_ok=True)
    old = _load_manifest(repo, options.settings.pipeline)

    _step(1, f"checkpoint {options.model}")
    if options.model in PRESETS:
        path = ensure_preset_checkpoint(options.model, options.work_dir / options.model)
    elif options.model == "demo":
        path = DEMO_MODEL
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"--model demo: no trained model in {path}; the demo model ships with the source tree "
                "(models/demo), not the wheel: pass its folder as --model, or train one "
                "(sd-triton train-demo-model)"
            )
    else:
        path = Path(options.model)
    checkpoint = Checkpoint.open(path)
    scheduler = default_scheduler_class(checkpoint.scheduler_config).__name__  # refused here if unknown
    log.info("requests without a scheduler run the checkpoint's own: %s", scheduler)

    log.info("architecture: %s", checkpoint.architecture)
    entries: dict[str, Any] = {}
    settings = repository_settings(options.settings, checkpoint, options.limits)
    for name, component in components(checkpoint.architecture).items():
        _step(2, f"{name}: ONNX ({settings.engines[name]})")
        entries[name] = _export_component(component, checkpoint, repo, settings, old)

    _step(3, "engine artifacts: INT8 graphs, PyTorch weights, TensorRT plans (export/artifacts.py)")
    artifacts: dict[str, Artifact] = {}
    for name, component in components(checkpoint.architecture).items():
        artifacts[name], entry = _engine_artifact(component, checkpoint, repo, settings, options, entries)
        entries[name].update(entry)

    _step(4, "python steps: tokenizer files, pipeline.json, model.py files")
    entries.update(_write_python_steps(checkpoint, repo, options.limits, settings))

    _step(5, f"ControlNets: {', '.join(sorted(options.controlnets)) or 'none'}")
    controls = export_controlnets(
        options.controlnets, checkpoint, repo, settings, options.limits, options.work_dir
    )

    _step(6, "config.pbtxt for every model, engine.json in every engine's version 1")
    records = _engine_records(repo, settings, entries, artifacts)
    served = served_model(options.model, checkpoint, options.limits, settings.pipeline)
    served = replace(served, controlnets=[record.summary() for record in controls])
    write_configs(repo, settings, served, records)

    _step(7, f"manifest {repo / manifest_file(settings.pipeline)}")
    manifest = Manifest(
        source={"model": options.model, "path": str(checkpoint.path.resolve())},
        limits=options.limits,
        settings=settings,
        live={name: [1] for name in records},  # a re-export serves version 1 again
        components=entries,
        controlnets={record.name: record.source for record in controls},
        export_seconds=round(time.monotonic() - started, 2),
    )
    manifest.save(repo)
    log.info("export done in %.1f s -> %s", manifest.export_seconds, repo)
    return manifest.to_json()


def served_model(model: str, checkpoint: Checkpoint, limits: Limits, pipeline: str = "") -> ServedModel:
    """What txt2img's config tells the gateway about the model (a named pipeline: its name)."""
    return ServedModel(
        model=pipeline or (model if model in (*PRESETS, "demo") else checkpoint.path.resolve().name),
        native_height=checkpoint.native_size[0],
        native_width=checkpoint.native_size[1],
        spatial_multiple=checkpoint.dims.vae_scale_factor,
        limits=limits,
        default_scheduler=default_scheduler_class(checkpoint.scheduler_config).__name__,
        architecture=checkpoint.architecture,
        max_clip_skip=max_clip_skip(checkpoint),
    )


def max_clip_skip(checkpoint: Checkpoint) -> int:
    """How many layers before the usual output clip_skip may reach: SD's text encoder ends at its last
    layer (down to its embeddings: its layer count), SDXL's encoders at their penultimate."""
    encoders = [
        f for f in ("text_encoder", "text_encoder_2") if (checkpoint.path / f / "config.json").is_file()
    ]
    layers = [
        json.loads((checkpoint.path / f / "config.json").read_text())["num_hidden_layers"] for f in encoders
    ]
    return min(layers) - (1 if c.added_conditioning(checkpoint.architecture) else 0)


def engine_profile(
    component: Component, checkpoint: Checkpoint, settings: RepositorySettings, limits: Limits
) -> Profile:
    """The component's profile; with continuous batching the UNet's max batch covers max_batch_rows."""
    profile = component.profile(checkpoint.dims, limits)
    if settings.batching == "continuous" and component.spec is UNET:
        profile = profile.with_max_batch(settings.max_batch_rows)
    return profile


def repository_settings(
    settings: RepositorySettings, checkpoint: Checkpoint, limits: Limits
) -> RepositorySettings:
    """Each engine's Triton max_batch_size is its profile's max batch; the checkpoint's architecture; a
    VAE that says it overflows in FP16 (`force_upcast`) kept FP32 in an FP16 repository."""
    max_batch = {
        name: max(
            shapes[2][0] for shapes in engine_profile(component, checkpoint, settings, limits).shapes.values()
        )
        for name, component in components(checkpoint.architecture).items()
    }
    fp32 = settings.fp32
    if checkpoint.vae_force_upcast and settings.precision == "fp16":
        fp32 = tuple(sorted({*fp32, c.VAE_DECODER.name, c.VAE_ENCODER.name}))
        log.info("the VAE stays FP32: its config says force_upcast (FP16 overflows in it)")
    changes = {"max_batch": max_batch, "architecture": checkpoint.architecture, "fp32": fp32}
    return RepositorySettings(**{**asdict(settings), **changes})


def _load_manifest(repo: Path, pipeline: str) -> dict[str, Any]:
    """The components of the pipeline's last export, if it was one this version reads."""
    try:
        manifest = Manifest.find(repo, pipeline)
    except ManifestError:
        return {}  # an older export's: everything is made again
    return manifest.components if manifest else {}


def _artifacts(repo: Path, files: list[Path]) -> dict[str, str]:
    return {str(f.relative_to(repo)): sha256_file(f) for f in files if f.is_file()}


def _unchanged(entry: dict[str, Any] | None, key: str, value: str, repo: Path) -> bool:
    if not entry or entry.get(key) != value or not entry.get("artifacts"):
        return False
    return all(
        (repo / rel).is_file() and sha256_file(repo / rel) == digest
        for rel, digest in entry["artifacts"].items()
    )


def _export_component(
    component: Component,
    checkpoint: Checkpoint,
    repo: Path,
    settings: RepositorySettings,
    old: dict[str, Any],
) -> dict[str, Any]:
    version = repo / settings.name_of(component.name) / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx_path = version / "model.onnx"
    # what the graph is made from: the weights, the opset and the axes it leaves dynamic
    axes = json.dumps(component.dynamic_axes(), sort_keys=True)
    source = sha256_tree(checkpoint.path / component.subfolder, salt=f"opset={OPSET};axes={axes}")
    for extra in component.extra_subfolders:
        source = sha256_tree(checkpoint.path / extra, salt=source)
    entry = {"engine": settings.engines[component.name], "precision": settings.precision_of(component.name)}
    previous = old.get(component.name) or {}
    onnx_files = [onnx_path, onnx_path.with_name("model.onnx.data")]
    if _unchanged(previous.get("onnx"), "source_sha256", source, repo):
        log.info("  %s: ONNX unchanged, reused", component.name)
        return {**entry, "onnx": previous["onnx"]}
    started = time.monotonic()
    diff = export_onnx(component, checkpoint.path, checkpoint.dims, onnx_path)
    seconds = time.monotonic() - started
    log.info("  %s: exported in %.1f s, max abs diff vs PyTorch %.3g", component.name, seconds, diff)
    onnx_entry = {
        "source_sha256": source,
        "artifacts": _artifacts(repo, onnx_files),
        "max_abs_diff_vs_pytorch": diff,
        "seconds": round(seconds, 2),
    }
    return {**entry, "onnx": onnx_entry}


def _engine_artifact(
    component: Component,
    checkpoint: Checkpoint,
    repo: Path,
    settings: RepositorySettings,
    options: ExportOptions,
    entries: dict[str, Any],
) -> tuple[Artifact, dict[str, Any]]:
    """Version 1's artifact (export/artifacts.py: the builder of the component's engine kind), and what
    the manifest says of it besides the ONNX: the INT8 graph, the PyTorch weights or the TensorRT plan."""
    name, folder = component.name, settings.name_of(component.name)
    kind, precision, file = settings.engines[name], settings.precision_of(name), settings.artifact_of(name)
    profile = engine_profile(component, checkpoint, settings, options.limits) if kind == "tensorrt" else None
    source = ArtifactSource(
        component=name,
        onnx=repo / folder / "1" / "model.onnx",
        onnx_sha256=entries[name]["onnx"]["artifacts"][f"{folder}/1/model.onnx"],
        weights=checkpoint.path / component.subfolder,
        extra_weights=tuple(checkpoint.path / folder for folder in component.extra_subfolders),
        profile=profile,
        work_dir=options.work_dir,
        refit=settings.refit(name),
    )
    label = BUILDERS[kind].label
    try:
        made = make_artifact(repo / folder, 1, kind, precision, file, source)
    except ArtifactUnavailable as exc:
        log.warning("  %s NOT built. Rerun this export on the GPU host to build it.", exc)
        assert profile is not None  # only a TensorRT plan cannot be built here
        return Artifact(key="", sha256=""), {label: {"missing": str(exc), "profile": profile.shapes}}
    if file == "model.onnx":
        return made, {}  # the exported graph itself
    entry: dict[str, Any] = {"key": made.key, "artifacts": {f"{folder}/1/{file}": made.sha256}}
    if profile is not None:
        entry.update(profile=profile.shapes, build=made.build)
    return made, {label: entry}


def _engine_records(
    repo: Path, settings: RepositorySettings, entries: dict[str, Any], artifacts: dict[str, Artifact]
) -> dict[str, EngineRecord]:
    """Version 1 of every engine model: engine.json (rewritten only when what it says changed)."""
    records = {}
    for name in c.ENGINE_MODELS:
        version_dir = repo / settings.name_of(name) / "1"
        record = EngineRecord(
            component=name,
            version=1,
            kind=settings.engines[name],
            precision=settings.precision_of(name),
            artifact=settings.artifact_of(name),
            sha256=artifacts[name].sha256,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source_sha256=entries[name]["onnx"]["artifacts"].get(
                f"{settings.name_of(name)}/1/model.onnx", ""
            ),
            build=artifacts[name].build,
            artifact_key=artifacts[name].key,
        )
        old = EngineRecord.load(version_dir)
        if old is not None and replace(old, created=record.created) == record:
            record = old
        else:
            record.save(version_dir)
        records[name] = record
    return records


def _write_python_steps(
    checkpoint: Checkpoint, repo: Path, limits: Limits, settings: RepositorySettings
) -> dict[str, Any]:
    named = settings.name_of
    # tokenizer: the checkpoint's own tokenizer files (SDXL: both tokenizers')
    tokenizer_files = []
    for folder in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(repo / named(c.TOKENIZER.name) / "1" / folder, ignore_errors=True)
    for source, folder in TOKENIZER_FOLDERS[checkpoint.architecture].items():
        target = repo / named(c.TOKENIZER.name) / "1" / folder
        shutil.copytree(checkpoint.path / source, target)
        tokenizer_files += sorted(p for p in target.rglob("*") if p.is_file())
    # denoise: scheduler config, latent geometry and the request limits
    pipeline = PipelineConfig(
        latent_channels=checkpoint.dims.latent_channels,
        vae_scale_factor=checkpoint.dims.vae_scale_factor,
        vae_scaling_factor=checkpoint.vae_scaling_factor,
        scheduler_config=checkpoint.scheduler_config,
        limits=limits,
        text_hidden_size=checkpoint.dims.text_hidden,
        unet_in_channels=checkpoint.dims.unet_in_channels,
        architecture=checkpoint.architecture,
        force_zeros_for_empty_prompt=checkpoint.force_zeros_for_empty_prompt,
        pipeline=settings.pipeline,
        pooled_dim=checkpoint.dims.pooled_dim or None,
        time_ids=checkpoint.dims.time_ids or None,
        text_widths=list(checkpoint.dims.text_widths),
        vocab_size=checkpoint.dims.vocab_size,
        preview_weights=fit_preview_weights(
            repo / named(c.VAE_DECODER.name) / "1" / "model.onnx",
            checkpoint.dims.latent_channels,
            checkpoint.dims.vae_scale_factor,
            checkpoint.vae_scaling_factor,
        ),
    )
    pipeline_paths = [
        repo / named(model) / "1" / PIPELINE_FILE
        for model in (c.DENOISE.name, c.TXT2IMG_STREAM.name, c.TOKENIZER.name)
    ]
    for pipeline_path in pipeline_paths:
        pipeline_path.parent.mkdir(parents=True, exist_ok=True)
        pipeline.save(pipeline_path)
    # model.py files: one import of the runtime module each (export/repository.py)
    for model in PYTHON_MODELS:
        write_model_py(repo / named(model) / "1", model)
    return {
        c.TOKENIZER.name: {"artifacts": _artifacts(repo, [*tokenizer_files, pipeline_paths[2]])},
        c.DENOISE.name: {"artifacts": _artifacts(repo, pipeline_paths[:1])},
        c.TXT2IMG_STREAM.name: {"artifacts": _artifacts(repo, pipeline_paths[1:2])},
    }
