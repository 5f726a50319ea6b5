"""The repository manifest (`manifest.json`): what the export made from which checkpoint, the settings
its configs were written from, and the live version of each engine model. The export writes it;
`sd-triton engine set/rollback/list` and `sd-triton triton` read it. The one place that says which
version of a component is live (config.pbtxt's version_policy is written from it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd_triton import __version__
from sd_triton import contract as c
from sd_triton.contract import Limits
from sd_triton.export.repository import RepositorySettings, manifest_file


class ManifestError(RuntimeError):
    """No manifest, or one this version cannot read; the message says what to do."""


@dataclass
class Manifest:
    source: dict[str, str]  # model: what was asked for (a preset, demo or a folder); path: the checkpoint
    limits: Limits
    settings: RepositorySettings  # what `sd-triton engine set` regenerates configs from
    live: dict[str, list[int]]  # per engine model, the versions served in turn, the live one last
    components: dict[str, Any] = field(default_factory=dict)  # per component, its artifacts and hashes
    controlnets: dict[str, str] = field(default_factory=dict)  # name -> what it was exported from
    sd_triton_version: str = __version__
    export_seconds: float = 0.0

    @property
    def checkpoint(self) -> Path:
        return Path(self.source["path"])

    def live_version(self, component: str) -> int:
        history = self.live.get(component)
        if not history:
            raise ManifestError(f"live: no version of {component!r} is recorded; re-export the repository")
        return int(history[-1])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, repo: Path) -> Path:
        path = repo / manifest_file(self.settings.pipeline)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path

    @staticmethod
    def pipelines(repo: Path) -> list[str]:
        """The repository's exported pipelines, by their manifests ("": the unnamed one)."""
        names = [
            p.name.removeprefix("manifest").removesuffix(".json").lstrip(".")
            for p in repo.glob("manifest*.json")
        ]
        return sorted(n for n in names if n == "" or c.PIPELINE_NAME.match(n))

    @classmethod
    def find(cls, repo: Path, pipeline: str = "") -> Manifest | None:
        """A pipeline's manifest ("": the unnamed one); None for one never exported (committed configs)."""
        return cls.load(repo, pipeline) if (repo / manifest_file(pipeline)).is_file() else None

    @classmethod
    def load(cls, repo: Path, pipeline: str = "") -> Manifest:
        path = repo / manifest_file(pipeline)
        if not path.is_file():
            known = ", ".join(repr(p) for p in cls.pipelines(repo)) if repo.is_dir() else ""
            if pipeline and known:
                raise ManifestError(f"{repo}: no pipeline {pipeline!r} ({path.name}); its pipelines: {known}")
            raise ManifestError(f"{repo}: no {path.name}; export a repository first (sd-triton export)")
        stored = json.loads(path.read_text())
        missing = [key for key in ("source", "limits", "settings", "live") if key not in stored]
        if missing:
            raise ManifestError(f"{path}: made by an older export (no {', '.join(missing)}); re-export it")
        settings = stored["settings"]
        tuples = {key: tuple(settings.get(key, ())) for key in ("int8", "fp16", "fp32")}
        return cls(
            source=stored["source"],
            limits=Limits(**stored["limits"]),
            settings=RepositorySettings(**{**settings, **tuples}),
            live={name: [int(v) for v in history] for name, history in stored["live"].items()},
            components=stored.get("components", {}),
            controlnets=stored.get("controlnets", {}),
            sd_triton_version=stored.get("sd_triton_version", ""),
            export_seconds=stored.get("export_seconds", 0.0),
        )
