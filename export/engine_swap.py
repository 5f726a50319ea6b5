"""`sd-triton engine set` and `sd-triton engine rollback`: switch one component to another engine as a
new version folder, behind the parity gate, through Triton's model control API (explicit mode).

`engine set COMPONENT KIND`:

1. checks the change (the repository settings the export recorded, with this component changed);
2. makes the candidate in a new version folder `<component>/<N>/`: links an artifact an earlier
   version already made from the same exported ONNX, or builds it (INT8: ONNX Runtime quantization;
   TensorRT: a plan, on a GPU), or copies the operator's own file (`--artifact`);
3. runs the parity gate: the golden prompts and seeds rendered with the live engine and with the
   candidate (ONNX Runtime, in this process), max abs and PSNR on the 0-255 scale, figures printed;
4. refused: the folder is removed and nothing else changes (`--force` switches anyway). Passed: the
   version's engine.json, config.pbtxt (version_policy specific: N) and the manifest's history are
   written, and Triton loads version N (`POST /v2/repository/models/<component>/load`); Triton
   keeps serving the old version until N is ready, then unloads it. If Triton cannot load N, the
   previous config is restored and reloaded.

`engine rollback COMPONENT` makes the version that was live before the current one live again.
"""

from __future__ import annotations

import logging
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sd_triton import contract as c
from sd_triton import paths
from sd_triton.engine_record import EngineRecord, versions_on_disk
from sd_triton.export.artifacts import ArtifactSource, ArtifactUnavailable, link, make_artifact
from sd_triton.export.checkpoint import Checkpoint, artifact_sha256, sha256_file
from sd_triton.export.components import components
from sd_triton.export.manifest import Manifest, ManifestError
from sd_triton.export.parity import ParityGate, ParityReport, render_parity
from sd_triton.export.pipeline import engine_profile
from sd_triton.export.quantize import INT8_COMPONENTS
from sd_triton.export.repository import (
    CONFIG_FILE,
    RepositorySettings,
    engine_config,
    parse,
    write_config,
    write_model_py,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


class EngineSwapError(RuntimeError):
    """The swap cannot go on; nothing live changed."""


@dataclass(frozen=True)
class GateSettings:
    """The golden images' generation settings (size: the model's native one unless given)."""

    steps: int = 8
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    gate: ParityGate = field(default_factory=ParityGate)


@dataclass(frozen=True)
class SwapOptions:
    component: str
    kind: str
    precision: str | None = None  # None: fp32, or the export's precision for tensorrt
    artifact: Path | None = None  # the operator's own ONNX or plan instead of a built one
    force: bool = False  # switch even when the gate fails
    gate: GateSettings = field(default_factory=GateSettings)
    triton_http: str | None = None  # HOST:PORT of the Triton to load it into; None: only the files
    work_dir: Path = field(default_factory=paths.work_dir)  # TensorRT's timing cache
    pipeline: str = ""  # a named pipeline of the repository (`sd-triton export --name`); "": the unnamed one


@dataclass
class SwapResult:
    switched: bool
    record: EngineRecord | None  # the candidate (live when switched)
    report: ParityReport | None
    failures: list[str]  # the gate's, one line each; empty when it passed
    previous: EngineRecord | None = None
    load_window: tuple[float, float] | None = None  # time.monotonic() around Triton's load call


class Repository:
    """An exported repository as engine swaps see it: its manifest (the export's settings and each
    engine model's history of live versions) and the version folders' engine.json. `pipeline`: which of
    the repository's pipelines (its models are PIPELINE_<component>; "": the plain names)."""

    def __init__(self, path: Path, pipeline: str = "") -> None:
        self.path = path
        self.pipeline = pipeline
        try:
            self.manifest = Manifest.load(path, pipeline)
        except ManifestError as exc:
            raise EngineSwapError(str(exc)) from exc

    def model_name(self, component: str) -> str:
        """The component's model in the repository and in Triton."""
        return c.model_name(self.pipeline, component)

    def folder(self, component: str) -> Path:
        return self.path / self.model_name(component)

    @property
    def settings(self) -> RepositorySettings:
        return self.manifest.settings

    def history(self, component: str) -> list[int]:
        return list(self.manifest.live.get(component, []))

    def record(self, component: str, version: int) -> EngineRecord:
        record = EngineRecord.load(self.folder(component) / str(version))
        if record is None:
            raise EngineSwapError(f"{self.model_name(component)}/{version}: no engine.json")
        return record

    def live_record(self, component: str) -> EngineRecord:
        return self.record(component, self.manifest.live_version(component))

    def settings_for(self, record: EngineRecord) -> RepositorySettings:
        """The export's settings with `record`'s component switched to its kind and precision."""
        name = record.component
        others = {key: tuple(m for m in getattr(self.settings, key) if m != name) for key in ("int8", "fp16")}
        if record.precision in others and record.precision != self.settings.precision:
            others[record.precision] += (name,)
        return _settings(self.settings, engines={**self.settings.engines, name: record.kind}, **others)

    def write_live(self, record: EngineRecord, history: list[int]) -> None:
        """config.pbtxt serving `record`, and the manifest's settings and history to match."""
        settings = self.settings_for(record)
        spec = c.models(settings.architecture)[record.component]
        config = engine_config(spec, settings, record)
        config.name = self.model_name(record.component)
        write_config(self.path, config)
        self.manifest.settings = settings
        self.manifest.live[record.component] = history
        self.manifest.save(self.path)

    def artifact_source(self, component: str, work_dir: Path, kind: str) -> ArtifactSource:
        """What the component's artifacts are made from: the export's ONNX and checkpoint (and the
        export's profile, for a TensorRT plan)."""
        checkpoint = self.manifest.checkpoint
        profile = None
        chosen = components(self.settings.architecture)[component]
        if kind == "tensorrt":
            opened = Checkpoint.open(checkpoint)
            profile = engine_profile(chosen, opened, self.settings, self.manifest.limits)
        onnx = self.folder(component) / "1" / "model.onnx"
        first, *more = (checkpoint / folder for folder in chosen.subfolders)
        return ArtifactSource(
            component=component,
            onnx=onnx,
            onnx_sha256=sha256_file(onnx),
            weights=first,
            extra_weights=tuple(more),
            profile=profile,
            work_dir=work_dir,
            refit=self.settings.refit(component),
        )


def _settings(base: RepositorySettings, **changes: Any) -> RepositorySettings:
    """`base` with changes, checked (ValueError names the field)."""
    return RepositorySettings(**{**asdict(base), **changes})


# -- 2. the candidate's artifact ----------------------------------------------------------------------


def _make_artifact(repo: Repository, candidate: EngineRecord, options: SwapOptions) -> EngineRecord:
    """Writes the candidate's artifact into its version folder (the operator's file, or the builder of
    its engine kind: export/artifacts.py); the record with its hash and origin."""
    name = candidate.component
    if options.artifact is not None:
        if not options.artifact.is_file():
            raise EngineSwapError(f"--artifact: {options.artifact} is not a file")
        log.info("  %s: the operator's artifact %s", name, options.artifact)
        target = repo.folder(name) / str(candidate.version) / candidate.artifact
        link(options.artifact, target)
        return replace(candidate, sha256=artifact_sha256(target))
    source = repo.artifact_source(name, options.work_dir, candidate.kind)
    try:
        made = make_artifact(
            repo.folder(name),
            candidate.version,
            candidate.kind,
            candidate.precision,
            candidate.artifact,
            source,
        )
    except ArtifactUnavailable as exc:
        raise EngineSwapError(str(exc)) from exc
    return replace(
        candidate,
        sha256=made.sha256,
        source_sha256=source.onnx_sha256,
        build=made.build,
        artifact_key=made.key,
    )


# -- 3. the parity gate -------------------------------------------------------------------------------


def _native_size(repo: Path, pipeline: str = "") -> tuple[int, int]:
    config = parse((repo / c.model_name(pipeline, c.TXT2IMG.name) / CONFIG_FILE).read_text())
    return int(config.parameters["native_height"].string_value), int(
        config.parameters["native_width"].string_value
    )


def run_gate(
    repo: Path, live: Path, candidate: Path, component: str, settings: GateSettings, pipeline: str = ""
) -> tuple[ParityReport | None, list[str]]:
    """Renders the golden images with both engines (ONNX Runtime, this process; `pipeline`'s models). A
    candidate that does not load or run fails the gate with its error."""
    from sd_triton.runtime.local import LocalPipeline  # torch: only when a gate runs

    if ".plan" in (live.suffix, candidate.suffix):
        return None, [
            "the parity gate runs ONNX graphs and PyTorch weights, not TensorRT plans (use --force)"
        ]
    height, width = _native_size(repo, pipeline)
    params = {
        "height": settings.height or height,
        "width": settings.width or width,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "guidance_scale": settings.guidance_scale,
    }
    log.info("parity gate: %s live %s vs candidate %s, %s", component, live, candidate, params)
    current = LocalPipeline(repo, model_files={component: str(live)}, pipeline=pipeline)
    try:
        report = render_parity(
            current, LocalPipeline(repo, model_files={component: str(candidate)}, pipeline=pipeline), **params
        )
    except Exception as exc:  # noqa: BLE001 - whatever a broken candidate raises refuses it
        return None, [f"the candidate does not run: {type(exc).__name__}: {exc}"]
    return report, settings.gate.check(report)


def gate_table(report: ParityReport | None, failures: list[str]) -> str:
    lines = ["| prompt | seed | max abs | PSNR dB |", "|---|---|---|---|"]
    for image in report.images if report else []:
        lines.append(f"| {image['prompt']} | {image['seed']} | {image['max_abs']} | {image['psnr_db']} |")
    lines.append(
        "gate: PASSED" if not failures else "gate: FAILED\n" + "\n".join(f"  - {f}" for f in failures)
    )
    return "\n".join(lines)


# -- 4. Triton ----------------------------------------------------------------------------------------


def triton_load(triton_http: str, model: str, timeout_s: float = 600.0) -> None:
    """Triton's repository load API: returns once the model's new config and versions are ready."""
    request = urllib.request.Request(
        f"http://{triton_http}/v2/repository/models/{model}/load", data=b"{}", method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise EngineSwapError(f"Triton could not load {model}: {detail}") from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise EngineSwapError(f"Triton at {triton_http} did not answer the load of {model}: {exc}") from exc


def _go_live(
    repo: Repository, record: EngineRecord, history: list[int], triton_http: str | None
) -> tuple[float, float] | None:
    """Makes `record` live; the monotonic times around Triton's load (None: no Triton named).
    `triton_http`: one HOST:PORT, or several comma-separated (every Triton serving the repository,
    loaded one after the other; a failure restores the previous version on all of them)."""
    name = record.component
    model = repo.model_name(name)
    previous = repo.live_record(name)
    previous_history = repo.history(name)
    repo.write_live(record, history)
    if triton_http is None:
        log.info(
            "%s: version %d written; Triton serves it from its next load or start", model, record.version
        )
        return None
    servers = [address.strip() for address in triton_http.split(",") if address.strip()]
    started = time.monotonic()
    try:
        for server in servers:
            triton_load(server, model)
    except EngineSwapError:
        log.error("%s: restoring version %d", model, previous.version)
        repo.write_live(previous, previous_history)
        for server in servers:
            triton_load(server, model)
        raise
    done = time.monotonic()
    log.info("%s: Triton serves version %d (%s, %s), loaded in %.1f s", model, record.version, record.kind,
             record.precision, done - started)  # fmt: skip
    return started, done


# -- the commands -------------------------------------------------------------------------------------


def set_engine(repo_path: Path, options: SwapOptions) -> SwapResult:
    # 1. The change, checked against the export's settings.
    repo = Repository(repo_path, options.pipeline)
    name = options.component
    if name not in c.ENGINE_MODELS:
        raise EngineSwapError(f"component: {name!r} is not an engine model ({', '.join(c.ENGINE_MODELS)})")
    # unless given: FP32, or for TensorRT the export's precision
    precision = options.precision or (repo.settings.precision if options.kind == "tensorrt" else "fp32")
    if precision not in PRECISIONS:
        raise EngineSwapError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and name not in INT8_COMPONENTS:
        raise EngineSwapError(f"precision: {name} cannot be int8; only {', '.join(INT8_COMPONENTS)}")
    previous = repo.live_record(name)
    version = max(versions_on_disk(repo.folder(name))) + 1
    candidate = EngineRecord(
        component=name,
        version=version,
        kind=options.kind,
        precision=precision,
        artifact="",
        sha256="",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        settings = repo.settings_for(candidate)
    except ValueError as exc:
        raise EngineSwapError(str(exc)) from exc
    candidate = replace(candidate, artifact=settings.artifact_of(name))

    # 2. The artifact, in the new version folder.
    folder = repo.folder(name) / str(version)
    folder.mkdir()
    try:
        candidate = _make_artifact(repo, candidate, options)
        if options.kind in c.PYTHON_KINDS:
            write_model_py(folder, name)

        # 3. The parity gate against the live engine.
        live_artifact = repo.folder(name) / str(previous.version) / previous.artifact
        report, failures = run_gate(
            repo.path, live_artifact, folder / candidate.artifact, name, options.gate, options.pipeline
        )
        result = SwapResult(False, candidate, report, failures, previous)
        if failures and not options.force:
            log.error(
                "%s: candidate refused by the parity gate; version %d stays live", name, previous.version
            )
            shutil.rmtree(folder)
            return result
        if failures:
            log.warning("%s: the gate failed; --force switches anyway", name)

        # 4. Live: engine.json, config, manifest, Triton.
        parity = {
            "against_version": previous.version,
            "passed": not failures,
            "forced": bool(failures),
            "max_abs": report.max_abs if report else None,
            "min_psnr_db": report.min_psnr_db if report else None,
            "images": report.images if report else [],
            "gate": asdict(options.gate),
        }
        candidate = replace(candidate, parity=parity)
        candidate.save(folder)
        result.load_window = _go_live(repo, candidate, [*repo.history(name), version], options.triton_http)
    except BaseException:
        # a candidate that did not go live (a failed build, gate or load) leaves no folder behind
        if repo.history(name)[-1] != version:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    result.switched, result.record = True, candidate
    return result


def rollback(
    repo_path: Path, component: str, triton_http: str | None = None, pipeline: str = ""
) -> EngineRecord:
    """The version live before the current one, live again (no gate: it served before)."""
    repo = Repository(repo_path, pipeline)
    history = repo.history(component)
    if len(history) < 2:
        raise EngineSwapError(f"{component}: no earlier version to roll back to (history {history})")
    history.pop()
    record = repo.record(component, history[-1])
    _go_live(repo, record, history, triton_http)
    return record
