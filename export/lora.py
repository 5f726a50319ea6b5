"""`sd-triton lora add/list/remove`: a pipeline's adapter library (sd_triton/lora.py says its layout).

`add` reads a LoRA file the way diffusers' `load_lora_weights` does (its own `lora_state_dict`: diffusers
and PEFT keys, kohya's, with their alphas), checks every target against the pipeline's checkpoint (the
module exists, up x down has the base weight's shape: a file for another base is refused, naming a
target) and writes the normalized factors and the record. Nothing is re-exported and no model reloads.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton.export.checkpoint import sha256_file
from sd_triton.export.manifest import Manifest
from sd_triton.lora import (
    INDEX,
    WEIGHTS,
    AdapterRecord,
    check_name,
    indexed_graph,
    library_dir,
    records,
    spellings,
)

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # checkpoint subfolders an adapter may target
# diffusers' spellings of a target's two factors, after its lora_state_dict
FACTORS = {
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
}  # fmt: skip


PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


class LoraError(ValueError):
    """An adapter that cannot be added (the message names the problem)."""


def _pipeline_class(architecture: str) -> Any:
    import diffusers

    if architecture == "sd":
        return diffusers.StableDiffusionPipeline
    if architecture == "sdxl":
        return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionXLImg2ImgPipeline


def base_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Every weight's shape in the checkpoint's adapter-targetable components, by `component.name`."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for component in COMPONENTS:
        for path in sorted((checkpoint / component).glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open has no iteration
                    shapes[f"{component}.{key}"] = tuple(weights.get_slice(key).get_shape())
    return shapes


def _detect_format(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as raw:
        keys = list(raw.keys())
    return "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in keys) else "diffusers"


def _peft_scale(path: Path) -> float | None:
    """lora_alpha / r from a PEFT adapter's metadata, where the file carries it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as raw:
        metadata = raw.metadata() or {}
    config = metadata.get("lora_adapter_metadata")
    if not config:
        return None
    parsed = json.loads(config)
    parsed = next(iter(parsed.values())) if "r" not in parsed and parsed else parsed
    if "r" in parsed and "lora_alpha" in parsed:
        return float(parsed["lora_alpha"]) / float(parsed["r"])
    return None


def normalize(path: Path, architecture: str) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """A LoRA file's factors per target weight ({"down", "up"}) and each target's scale (alpha / rank),
    read by diffusers' loader for the architecture's pipeline."""
    try:
        state, alphas = _pipeline_class(architecture).lora_state_dict(str(path))[:2]
    except Exception as exc:  # noqa: BLE001 - whatever diffusers cannot read is not an adapter
        raise LoraError(
            f"{path.name}: not a LoRA file diffusers can read ({type(exc).__name__}: {exc})"
        ) from exc
    factors: dict[str, dict[str, np.ndarray]] = {}
    found_alphas: dict[str, float] = {}
    for key, tensor in state.items():
        processor = PROCESSOR.match(key)  # diffusers' older attention-processor spelling
        if processor:
            block, projection, side = processor.groups()
            if key.startswith("text_encoder"):  # CLIP's attention: q_proj, k_proj, v_proj, out_proj
                module = f"{block}.{projection.removeprefix('to_')}_proj"
            else:
                module = f"{block}.{projection}" + (".0" if projection == "to_out" else "")
        else:
            suffix = next((s for s in FACTORS if key.endswith("." + s)), None)
            if suffix is None:
                raise LoraError(
                    f"{path.name}: {key}: not a LoRA factor (only low-rank up/down weights are served)"
                )
            module, side = key[: -len(suffix) - 1], FACTORS[suffix]
        factors.setdefault(f"{module}.weight", {})[side] = tensor.float().numpy()
        if side == "down":  # diffusers keys an alpha by the down factor, its module, or the target's module
            for alpha_key in (
                f"{key}.alpha",
                f"{key.rsplit('lora', 1)[0].rstrip('._')}.alpha",
                f"{module}.alpha",
            ):
                if alpha_key in (alphas or {}):
                    found_alphas[f"{module}.weight"] = float(alphas[alpha_key])
    peft_scale = _peft_scale(path)
    scales = {}
    for target, pair in factors.items():
        if set(pair) != {"down", "up"}:
            raise LoraError(f"{path.name}: {target}: has {sorted(pair)} only; a target needs up and down")
        alpha = found_alphas.get(target)
        scales[target] = alpha / pair["down"].shape[0] if alpha is not None else (peft_scale or 1.0)
    return factors, scales


def _in_base(target: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The base's name for a target: itself, or a text encoder's with or without transformers' older
    `text_model.` level (checkpoints and LoRA files were saved by transformers releases on either side)."""
    component, _, rest = target.partition(".")
    for candidate in spellings(rest):
        if f"{component}.{candidate}" in shapes:
            return f"{component}.{candidate}"
    return target


def check_against(
    name: str, factors: dict[str, dict[str, np.ndarray]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, np.ndarray]]:
    """Every target exists in the base with the shape up x down makes (a LoraError naming one otherwise);
    the factors by the base's names for their targets."""
    if not factors:
        raise LoraError(f"{name}: the file holds no LoRA factors")
    resolved = {}
    for target, pair in sorted(factors.items()):
        component = target.split(".", 1)[0]
        if component not in COMPONENTS:
            raise LoraError(f"{name}: {target}: targets {component!r}, not one of {', '.join(COMPONENTS)}")
        target = _in_base(target, shapes)
        resolved[target] = pair
        if target not in shapes:
            raise LoraError(
                f"{name}: {target}: the checkpoint has no such weight (an adapter for another base?)"
            )
        down, up = pair["down"], pair["up"]
        made = (up.shape[0], down.shape[1], *down.shape[2:])
        if down.shape[0] != up.shape[1] or made != shapes[target]:
            raise LoraError(
                f"{name}: {target}: up {list(up.shape)} x down {list(down.shape)} makes {list(made)}, the "
                f"base weight is {list(shapes[target])} (an adapter for another base?)"
            )
    return resolved


def add(repo: Path, file: Path, name: str, pipeline: str = "", replace: bool = False) -> AdapterRecord:
    """Adds `file` to the pipeline's library as `name`, checked against its checkpoint."""
    from safetensors.numpy import save_file

    check_name(name)
    if not file.is_file():
        raise LoraError(f"{file}: no such file")
    manifest = Manifest.load(repo, pipeline)
    architecture = manifest.settings.architecture
    folder = library_dir(repo, pipeline) / name
    if folder.exists() and not replace:
        raise LoraError(f"{name}: already in the library ({folder}); remove it first or pass --replace")
    # 1. The file as diffusers reads it, its targets checked against the base.
    factors, read_scales = normalize(file, architecture)
    shapes = base_shapes(manifest.checkpoint)
    factors = check_against(name, factors, shapes)
    scales = {_in_base(target, shapes): scale for target, scale in read_scales.items()}
    # 2. The normalized factors and the record, written beside, then moved in whole.
    staging = folder.with_name(f".{name}.adding")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = {
        f"{t}:{side}": np.ascontiguousarray(a) for t, pair in factors.items() for side, a in pair.items()
    }
    save_file(tensors, str(staging / WEIGHTS))
    components: dict[str, int] = {}
    for target in factors:
        component = target.split(".", 1)[0]
        components[component] = components.get(component, 0) + 1
    record = AdapterRecord(
        name=name,
        sha256=sha256_file(file),
        source=file.name,
        format=_detect_format(file),
        rank=max(pair["down"].shape[0] for pair in factors.values()),
        scales=scales,
        components=components,
        pipeline=pipeline,
        architecture=architecture,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    record.save(staging)
    index_graphs(repo, pipeline, set(factors))  # before it is listed: a refused graph adds nothing
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    log.info("%s: added to %s (%s, rank %d, %s)", name, folder.parent, record.format, record.rank, components)
    return record


ENGINE_OF = {
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
}  # the engine model


def _checkpoint_weight(folder: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as weights:
            if name in weights.keys():  # noqa: SIM118 - safe_open has no membership test
                return weights.get_tensor(name)
    raise LoraError(f"{folder.name}.{name}: not in the checkpoint")


def index_graphs(repo: Path, pipeline: str, targets: set[str]) -> None:
    """Finds, in the live ONNX graph of each engine the targets are in, the initializer holding each
    target's base weight (by value: the exporter renames and transposes a linear layer's weight), and
    adds it to the library's index (`index.json`, by the graph's sha256; a TensorRT plan's: the graph it
    was built from, whose initializers its refits set). python-torch engines need none. A target whose
    layer the graph does not run (SDXL's first text encoder's last layer: its output is unused, the
    exporter drops it) is indexed as absent: changing it changes nothing, as in diffusers. A graph that
    runs a target's layer with no initializer equal to its weight (INT8) is refused, naming it."""
    from sd_triton.export.engines import live_records

    manifest = Manifest.load(repo, pipeline)
    records = live_records(repo, manifest, pipeline)
    path = library_dir(repo, pipeline) / INDEX
    index = json.loads(path.read_text()) if path.is_file() else {}
    for engine in sorted(set(ENGINE_OF.values())):
        record = records.get(engine)
        wanted = {t for t in targets if ENGINE_OF[t.split(".", 1)[0]] == engine}
        found_graph = indexed_graph(repo / manifest.settings.name_of(engine), record) if record else None
        if record is None or found_graph is None or not wanted:
            continue
        if record.kind == "tensorrt" and not (record.build or {}).get("refit"):
            log.warning(
                "%s: its TensorRT plan was built without refit: requests with adapters are refused until "
                "it is built with --tensorrt-refit (README, LoRA adapters)",
                engine,
            )
        sha256, graph = found_graph
        entry = index.setdefault(sha256, {})
        missing = sorted(wanted - set(entry))
        if missing:
            what = f"{engine} is {record.kind} {record.precision}"
            entry.update(_find_in_graph(graph, missing, manifest.checkpoint, entry, what, repo))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def _find_in_graph(
    graph: Path, targets: list[str], checkpoint: Path, known: dict[str, Any], what: str, repo: Path
) -> dict[str, list[Any] | None]:
    """Each target's [initializer, stored transposed] in the graph, or None when the graph does not run
    its layer: no node in the scope of the layer (`/<component's root>/<layer path>/...`, the exporter's
    names; the component's roots read from the nodes using the weights it found)."""
    from onnx import load, numpy_helper

    model = load(str(graph))
    by_value = {}
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.ndim >= 2:
            by_value[(array.dtype.str, array.shape, array.tobytes())] = initializer.name
    found: dict[str, list[Any] | None] = {}
    for target in targets:
        component, _, name = target.partition(".")
        weight = _checkpoint_weight(checkpoint / component, name)
        for dtype, (transposed, array) in itertools.product(
            (np.float32, np.float16), ((False, weight), (True, weight.T))
        ):
            key = (np.dtype(dtype).str, array.shape, np.ascontiguousarray(array.astype(dtype)).tobytes())
            if key in by_value:
                found[target] = [by_value[key], transposed]
                break
    # where each initializer is used, as dotted scopes: /encoder_2/text_model/encoder/layers.1/x/MatMul
    # -> .encoder_2.text_model.encoder.layers.1.x.MatMul
    users: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.name.replace("/", "."))
    roots: dict[str, set[str]] = {}
    for target, place in {**known, **found}.items():
        component, layer = _layer(target)
        for scope in users.get(place[0], []) if place else []:
            at = scope.find(f".{layer}.")
            if at >= 0:
                roots.setdefault(component, set()).add(scope[: at + 1])
    scopes = [node.name.replace("/", ".") for node in model.graph.node]
    for target in targets:
        if target in found:
            continue
        component, layer = _layer(target)
        runs = [r for r in roots.get(component, ()) if any(s.startswith(f"{r}{layer}.") for s in scopes)]
        if roots.get(component) and not runs:
            found[target] = None
            log.info("%s: its layer is not in %s (its output is unused): no change", target, graph.name)
            continue
        raise LoraError(
            f"{target}: no weight of {graph.relative_to(repo)} equals the checkpoint's (adapters need an "
            f"FP32 or FP16 graph of it; {what})"
        )
    log.info("%d adapter targets indexed in %s", len(found), graph.relative_to(repo))
    return found


def _layer(target: str) -> tuple[str, str]:
    """A target's component and layer path in it: unet.a.to_q.weight -> (unet, a.to_q)."""
    component, _, name = target.partition(".")
    return component, name.removeprefix("text_model.").rsplit(".", 1)[0]


def listed(repo: Path, pipeline: str = "") -> list[AdapterRecord]:
    """The pipeline's adapters, by name."""
    return records(library_dir(repo, pipeline))


def remove(repo: Path, name: str, pipeline: str = "") -> None:
    folder = library_dir(repo, pipeline) / check_name(name)
    if not folder.is_dir():
        known = ", ".join(r.name for r in listed(repo, pipeline)) or "none"
        raise LoraError(f"{name}: not in the library (adapters: {known})")
    shutil.rmtree(folder)
    log.info("%s: removed from %s", name, folder.parent)
