"""`sd-triton engine list`: what each engine component of a repository runs — engine kind, precision,
the artifact file and its sha256 (from the export's manifest), the shape profile of a TensorRT plan,
and the versions a running Triton has loaded."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from export.repository import CONFIG_FILE, parse
from sd_triton import contract as c
from sd_triton.served_model import engine_info

MANIFEST = "manifest.json"


def artifact_file(config: dict[str, Any], kind: str) -> str:
    """The file the engine loads, relative to its version folder."""
    if kind == "python-ort":
        return config.get("parameters", {}).get("model_file", {}).get("string_value", "model.onnx")
    return config.get("default_model_filename") or ("model.plan" if kind == "tensorrt" else "model.onnx")


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


def engine_rows(repo: Path, triton_http: str | None = None) -> list[dict[str, Any]]:
    manifest = json.loads((repo / MANIFEST).read_text()).get("components", {})
    loaded = loaded_versions(triton_http) if triton_http else None
    rows = []
    for name in c.ENGINE_MODELS:
        config = MessageToDict(
            parse((repo / name / CONFIG_FILE).read_text()), preserving_proto_field_name=True
        )
        info = engine_info(config)
        path = f"{name}/1/{artifact_file(config, info.kind)}"
        entry = manifest.get(name, {})
        hashes = {
            rel: digest
            for part in ("onnx", "int8", "plan")
            for rel, digest in (entry.get(part) or {}).get("artifacts", {}).items()
        }
        plan = entry.get("plan") or {}
        rows.append(
            {
                "component": name,
                "engine": info.kind,
                "precision": info.precision,
                "artifact": path,
                "sha256": hashes.get(path),
                "missing": plan.get("missing") if info.kind == "tensorrt" else None,
                "profile": plan.get("profile"),
                "loaded_versions": None if loaded is None else loaded.get(name, []),
                "parity": entry.get("parity"),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| component | engine | precision | artifact | sha256 | loaded | parity |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sha = (row["sha256"] or "not in the manifest")[:12]
        if row["missing"]:
            sha = f"not built: {row['missing']}"
        loaded = "-" if row["loaded_versions"] is None else ",".join(row["loaded_versions"]) or "not loaded"
        parity = row["parity"] or "-"
        lines.append(
            f"| {row['component']} | {row['engine']} | {row['precision']} | {row['artifact']} | {sha} | "
            f"{loaded} | {parity} |"
        )
    return "\n".join(lines)
