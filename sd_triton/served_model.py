"""What the repository serves, as the gateway needs to know it: the model's name, native size,
spatial multiple, request limits, and the engine kind and precision of each component.

The export writes it into the `parameters` of the model configs; the gateway reads it back from
Triton (`get_model_config`), so it never needs the repository's files. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sd_triton.contract import DEFAULT_SCHEDULER, ENGINE_MODELS, SCHEDULER_CLASSES, Limits, added_conditioning

_INT_KEYS = ("native_height", "native_width", "spatial_multiple")


@dataclass(frozen=True)
class EngineInfo:
    kind: str
    precision: str
    version: int | None = None  # the version config.pbtxt serves (version_policy specific)
    sha256: str | None = None  # of the artifact, as the export or `engine set` wrote it


@dataclass(frozen=True)
class ServedModel:
    model: str  # the name requests pick it by (`model`); a named pipeline's is the pipeline's name
    native_height: int
    native_width: int
    spatial_multiple: int
    limits: Limits = field(default_factory=Limits)
    # the checkpoint's own scheduler class: what a request without a scheduler (or "default") runs
    default_scheduler: str = ""
    engines: dict[str, EngineInfo] = field(default_factory=dict)
    fingerprint: str = ""  # `config_fingerprint` of what Triton serves; "" when unknown
    architecture: str = "sd"  # contract.ARCHITECTURES: "sdxl" takes size conditioning
    pipeline: str = ""  # `sd-triton export --name`: its models are PIPELINE_<model>; "" for plain names
    # its LoRA adapter library (contract.LORA_LIBRARY): {name, sha256, rank, components, ...} each
    loras: list[dict[str, Any]] = field(default_factory=list)
    # clip_skip at most: the layers before the usual output its text encoder has (0: none, or not known)
    max_clip_skip: int = 0
    # its ControlNets (sd_triton.control.ControlNetRecord.summary: name, sha256, conditioning_channels)
    controlnets: list[dict[str, Any]] = field(default_factory=list)
    # its textual-inversion library (contract.EMBEDDING_LIBRARY): {token, sha256, vectors, format, ...} each
    embeddings: list[dict[str, Any]] = field(default_factory=list)

    def adapter(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.loras if a.get("name") == name), None)

    def learned_tokens(self, texts: list[str]) -> list[dict[str, Any]]:
        """The embeddings whose tokens the texts use (as the tokenizer matches them: anywhere, in any
        case), {token, sha256} each: what a cached image depends on besides the text."""
        lowered = " ".join(texts).lower()
        return [
            {"token": e["token"], "sha256": e.get("sha256", "")}
            for e in self.embeddings
            if str(e.get("token", "")).lower() in lowered
        ]

    @property
    def xl(self) -> bool:
        """SDXL's size conditioning (a base model or a refiner)."""
        return added_conditioning(self.architecture)

    def to_parameters(self) -> dict[str, str]:
        """txt2img's config parameters (string values, as Triton keeps them)."""
        params = {"model": self.model, **{k: str(getattr(self, k)) for k in _INT_KEYS}}
        params["default_scheduler"] = self.default_scheduler
        params["architecture"] = self.architecture
        params["max_clip_skip"] = str(self.max_clip_skip)
        if self.controlnets:
            params["controlnets"] = json.dumps(self.controlnets, sort_keys=True)
        params.update({k: str(v) for k, v in asdict(self.limits).items()})
        return params

    def scheduler_class(self, name: str) -> str:
        """The diffusers class a request's scheduler name runs ("" when the export did not say)."""
        return self.default_scheduler if name == DEFAULT_SCHEDULER else SCHEDULER_CLASSES[name]

    @classmethod
    def from_configs(cls, configs: dict[str, dict[str, Any]], pipeline: str = "") -> ServedModel:
        """From Triton's model configs as JSON (`get_model_config(..., as_json=True)["config"]`) of one
        pipeline, keyed by model name without the pipeline's prefix: txt2img's parameters and each engine
        model's platform/backend."""
        params = _parameters(configs["txt2img"])
        missing = [k for k in ("model", *_INT_KEYS) if k not in params]
        if missing:
            raise ValueError(f"txt2img config lacks parameters {missing}: re-export the repository")
        limits = Limits(**{k: int(params[k]) for k in asdict(Limits()) if k in params})
        engines = {name: engine_info(configs[name]) for name in ENGINE_MODELS if name in configs}
        return cls(
            model=params["model"],
            native_height=int(params["native_height"]),
            native_width=int(params["native_width"]),
            spatial_multiple=int(params["spatial_multiple"]),
            limits=limits,
            default_scheduler=params.get("default_scheduler", ""),
            engines=engines,
            architecture=params.get("architecture", "sd"),  # an export before SDXL: SD
            pipeline=pipeline,
            controlnets=json.loads(params.get("controlnets") or "[]"),
            max_clip_skip=int(params.get("max_clip_skip") or 0),
        )


def config_fingerprint(configs: dict[str, dict[str, Any]], versions: dict[str, list[str]]) -> str:
    """sha256 over what decides the served model's output: each model's platform, backend, model file,
    parameters (precision, device, and any artifact hashes the export writes there), engine kind, and
    the versions Triton has loaded. Instance counts, batching and ports do not count."""
    described = {
        name: {
            "platform": config.get("platform", ""),
            "backend": config.get("backend", ""),
            "default_model_filename": config.get("default_model_filename", ""),
            "parameters": _parameters(config),
            "engine": asdict(engine_info(config)),
            "versions": sorted(versions.get(name, [])),
        }
        for name, config in configs.items()
    }
    blob = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def engine_info(config: dict[str, Any]) -> EngineInfo:
    platform, backend = config.get("platform", ""), config.get("backend", "")
    kind = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime"}.get(platform)
    params = _parameters(config)
    if kind is None:
        kind = params.get("engine", "python-ort") if backend == "python" else backend or platform or "unknown"
    versions = config.get("version_policy", {}).get("specific", {}).get("versions", [])
    return EngineInfo(
        kind=kind,
        precision=params.get("precision", "fp32"),
        version=int(versions[-1]) if versions else None,
        sha256=params.get("artifact_sha256") or None,
    )
