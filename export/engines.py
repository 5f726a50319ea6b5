"""`sd-triton engine list`: what each engine component of a repository runs — the live version (the one
its config.pbtxt serves), engine kind, precision, artifact and sha256 (that version's engine.json), the
shape profile of a TensorRT plan, the versions a running Triton has loaded, and the parity figure of
the gate that let the version in. Also the TensorRT check `sd-triton triton` runs before it starts."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from sd_triton import contract as c
from sd_triton.engine_record import EngineRecord
from sd_triton.export import tensorrt
from sd_triton.export.manifest import Manifest


def live_records(
    repo: Path, manifest: Manifest | None = None, pipeline: str = ""
) -> dict[str, EngineRecord | None]:
    """The live version's engine.json of each engine model of a pipeline (the manifest says which is
    live; read here unless given); none for a repository never exported."""
    manifest = manifest or Manifest.find(repo, pipeline)
    if manifest is None:
        return {}
    folder = manifest.settings.name_of
    return {
        name: EngineRecord.load(repo / folder(name) / str(manifest.live_version(name)))
        for name in c.ENGINE_MODELS
    }


def loaded_versions(triton_http: str) -> dict[str, list[str]]:
    """Triton's repository index: the READY versions of each model."""
    request = urllib.request.Request(f"http://{triton_http}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        index = json.load(response)
    versions: dict[str, list[str]] = {}
    for model in index:
        if model.get("state") == "READY":
            versions.setdefault(model["name"], []).append(str(model.get("version", "")))
    return versions


def engine_rows(
    repo: Path, triton_http: str | None = None, pipeline: str | None = None
) -> list[dict[str, Any]]:
    """A row per engine model of `pipeline` ("": the unnamed one), or of every pipeline when None."""
    pipelines = Manifest.pipelines(repo) if pipeline is None else [pipeline]
    if not pipelines:
        Manifest.load(repo)  # raises: no manifest, export first
    loaded = loaded_versions(triton_http) if triton_http else None
    return [row for p in pipelines for row in _pipeline_rows(repo, p, loaded)]


def _pipeline_rows(repo: Path, pipeline: str, loaded: dict[str, list[str]] | None) -> list[dict[str, Any]]:
    manifest = Manifest.load(repo, pipeline)
    rows = []
    for name, record in live_records(repo, manifest).items():
        model = c.model_name(pipeline, name)
        if record is None:
            raise FileNotFoundError(
                f"{repo / model}: the live version has no engine.json; re-export the repository"
            )
        plan = (manifest.components.get(name) or {}).get("plan") or {}
        parity = record.parity or {}
        rows.append(
            {
                "pipeline": pipeline,
                "component": name,
                "version": record.version,
                "engine": record.kind,
                "precision": record.precision,
                "artifact": f"{model}/{record.version}/{record.artifact}",
                "sha256": record.sha256 or None,
                "missing": plan.get("missing") if record.kind == "tensorrt" and not record.sha256 else None,
                "profile": (record.build or {}).get("profile") or plan.get("profile"),
                "build": record.build,
                "loaded_versions": None if loaded is None else loaded.get(model, []),
                "parity": {
                    k: parity[k]
                    for k in ("against_version", "passed", "forced", "max_abs", "min_psnr_db")
                    if k in parity
                }
                or None,  # fmt: skip
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| pipeline | component | version | engine | precision | artifact | sha256 | loaded | parity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sha = (row["sha256"] or "not built")[:12]
        if row["missing"]:
            sha = f"not built: {row['missing']}"
        loaded = "-" if row["loaded_versions"] is None else ",".join(row["loaded_versions"]) or "not loaded"
        gate, parity = row["parity"], "-"
        if gate:
            verdict = "passed" if gate["passed"] else "FAILED, forced"
            figures = f"PSNR {gate['min_psnr_db']} dB, max abs {gate['max_abs']}"
            parity = f"vs v{gate['against_version']}: {verdict}, {figures}"
        cells = [row[k] for k in ("component", "version", "engine", "precision", "artifact")]
        cells.insert(0, row["pipeline"] or "(unnamed)")
        lines.append("| " + " | ".join(str(x) for x in [*cells, sha, loaded, parity]) + " |")
    return "\n".join(lines)


def tensorrt_problems(repo: Path, target: dict[str, str] | None = None) -> list[str]:
    """Why Triton cannot serve the repository's live TensorRT plans on this machine: a plan not built,
    or built for another GPU or TensorRT version. `target`: this machine's (default: asked)."""
    problems = []
    records = {
        c.model_name(pipeline, name): r
        for pipeline in Manifest.pipelines(repo)  # every pipeline the repository serves
        for name, r in live_records(repo, pipeline=pipeline).items()
        if r is not None and r.kind == "tensorrt"
    }
    if records and target is None:
        target = tensorrt.build_target()
    for name, record in records.items():
        where = f"{name}/{record.version}/{record.artifact}"
        if not record.sha256:
            problems.append(f"{where}: the TensorRT plan was never built (export on the GPU host)")
            continue
        reason = tensorrt.mismatch(record.build, target)
        if reason:
            problems.append(f"{where}: {reason}")
    return problems
