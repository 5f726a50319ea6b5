"""What one version folder of an engine model holds: `engine.json`, written next to the artifact by
the export (version 1) and by `sd-triton engine set` (later versions), never changed afterwards.

The denoise loop reads it for the version each UNet call ran on (per-response provenance); `engine
list`, `engine set` and `engine rollback` read it for the history. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENGINE_FILE = "engine.json"


@dataclass(frozen=True)
class EngineRecord:
    component: str
    version: int
    kind: str  # an EngineKind
    precision: str  # fp32, fp16, int8
    artifact: str  # the file the engine loads, in the version folder
    sha256: str  # of the artifact; "" when it is not built (a TensorRT plan on a machine without a GPU)
    created: str  # ISO 8601, UTC
    source_sha256: str = ""  # the exported ONNX it was made from ("": brought by an operator)
    parity: dict[str, Any] | None = None  # the gate's figures against the engine it replaced
    build: dict[str, Any] | None = None  # TensorRT: the GPU and TensorRT version it was built for
    artifact_key: str = ""  # what the artifact was made from (export/artifacts.py); "": never reused

    def provenance(self) -> dict[str, Any]:
        """What a response says about the engine that produced it."""
        return {
            "component": self.component,
            "version": self.version,
            "engine": self.kind,
            "precision": self.precision,
            "sha256": self.sha256,
        }

    def save(self, version_dir: Path) -> Path:
        path = version_dir / ENGINE_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, version_dir: Path) -> EngineRecord | None:
        path = version_dir / ENGINE_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def versions_on_disk(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, newest first."""
    if not model_dir.is_dir():
        return []
    return sorted((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
