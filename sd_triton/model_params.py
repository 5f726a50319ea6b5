"""The `parameters` of the python models' config.pbtxt, typed: the export writes them (`to_parameters`),
the model reads them back in Triton (`from_parameters`), and their defaults live here once. Triton keeps
every value as a string; booleans are "1" and "0". Torch-free (the export, the runtime and tests share it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sd_triton import contract as c

P = TypeVar("P", bound="ModelParams")


def _text(value: Any) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def _value(kind: Any, raw: str, name: str) -> Any:
    if kind in (bool, "bool"):
        if raw not in ("0", "1"):
            raise ValueError(f"parameters.{name}: expected 0 or 1, got {raw!r}")
        return raw == "1"
    if kind in (int, "int"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"parameters.{name}: expected an integer, got {raw!r}") from None
    return raw


@dataclass(frozen=True)
class ModelParams:
    """A model's parameters as one frozen dataclass; subclasses add the fields."""

    def to_parameters(self) -> dict[str, str]:
        return {f.name: _text(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_parameters(cls: type[P], params: Mapping[str, str]) -> P:
        """From a config's parameters (strings); absent ones take their default, others are ignored."""
        values = {
            f.name: _value(f.type, params[f.name], f.name)
            for f in dataclasses.fields(cls)
            if f.name in params
        }
        return cls(**values)

    @classmethod
    def from_model_config(cls: type[P], config: Mapping[str, Any]) -> P:
        """From Triton's model config as JSON (`args["model_config"]` in a python model)."""
        raw = config.get("parameters", {})
        return cls.from_parameters({k: v.get("string_value", "") for k, v in raw.items()})


# A config.pbtxt's `parameters { key: "K" value { string_value: "V" } }` entries, however spaced.
_PARAMETER = re.compile(r'key\s*:\s*"([^"]*)"\s*value\s*:?\s*\{\s*string_value\s*:\s*"([^"]*)"\s*\}')


def pbtxt_parameters(text: str) -> dict[str, str]:
    """The string parameters of a config.pbtxt's text, without a protobuf library (the python models
    read the UNet's config with it; the Triton image's python has no tritonclient)."""
    return dict(_PARAMETER.findall(text))


_MAX_BATCH = re.compile(r"^\s*max_batch_size\s*:\s*(\d+)", re.MULTILINE)


def pbtxt_max_batch_size(text: str) -> int:
    """A config.pbtxt's max_batch_size (0: none given, or no batching)."""
    match = _MAX_BATCH.search(text)
    return int(match.group(1)) if match else 0


UNET_PATHS = ("inline", "bls")


@dataclass(frozen=True)
class TokenizerParams(ModelParams):
    """The tokenizer model: how many 77-token chunks a prompt may fill (sd_triton/prompts.py)."""

    max_prompt_chunks: int = 1
    max_clip_skip: int = 0  # CLIP_SKIP at most (ServedModel.max_clip_skip)


@dataclass(frozen=True)
class BatchingParams(ModelParams):
    """The continuous batcher of `denoise` and `txt2img_stream` (sd_triton.runtime.batching)."""

    unet_model: str = c.UNET.name  # the engine model each step calls
    # inline: the loop runs the live version of that model's engine in its own process (no round trip
    # per step); bls: a BLS call to Triton's model per step (docs/engines.md, "The UNet path")
    unet_path: str = "bls"
    max_batch: int = 16  # UNet rows (latents, cond and uncond both counted) per call
    max_wait_us: int = 0  # wait this long for arrivals before a step below max_batch rows


@dataclass(frozen=True)
class DenoiseParams(BatchingParams):
    batching: str = "continuous"  # none, dynamic (one request per loop) or continuous


@dataclass(frozen=True)
class EngineParams(ModelParams):
    """An engine model run by the python backend (`python-ort` or `python-torch`)."""

    precision: str = "fp32"
    engine: str = "python-ort"
    device: str = "auto"  # auto: CUDA when the runtime sees a GPU, else CPU
    intra_op_threads: int = 0  # 0: the runtime's own choice
    allow_spinning: bool = False  # ONNX Runtime's spinning threads (burn a core between calls)
    model_file: str = "model.onnx"  # in the version folder; python-torch: the diffusers subfolder
    torch_compile: bool = True  # python-torch on a GPU: torch.compile with CUDA graphs
