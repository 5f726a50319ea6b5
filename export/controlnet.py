"""ControlNets of a pipeline (`sd-triton export ... --controlnet NAME=PATH`, repeatable): each diffusers
ControlNetModel exported to ONNX beside the pipeline's denoise model, and the pipeline's UNet exported once
more taking the ControlNets' residuals as inputs (the controlled UNet). Layout and records:
sd_triton/control.py. `PATH` is a ControlNetModel folder, or `random:SEED`: one built from the pipeline's
own UNet (diffusers' ControlNetModel.from_unet) with its zero-initialised output convolutions drawn at
random, so it changes images (tests, demos, benchmarks).

Idempotent: a ControlNet whose weights and UNet are unchanged is kept; the controlled UNet is exported
again only when the UNet changed. A re-export serves the ControlNets it names (the others are removed).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sd_triton import control
from sd_triton.contract import UNET, Limits
from sd_triton.export import tensorrt
from sd_triton.export.checkpoint import Checkpoint, sha256_tree
from sd_triton.export.components import ModelDims, Profile, Shape, UNet, latent_range
from sd_triton.export.onnx_export import export_onnx
from sd_triton.export.repository import RepositorySettings
from sd_triton.lora import check_name

log = logging.getLogger(__name__)

SOURCE = "source.json"  # the controlled UNet's: the UNet weights' hash it was exported from
PLAN = "model.plan"  # a graph's TensorRT plan, beside it (a pipeline whose UNet runs on TensorRT)


class ControlNetError(ValueError):
    pass


def parse_option(text: str) -> tuple[str, str]:
    """`NAME=PATH` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ControlNetError(
            f"--controlnet {text!r}: expected NAME=PATH (a ControlNetModel folder or random:SEED)"
        )
    try:
        return check_name(name), path
    except ValueError as exc:
        raise ControlNetError(f"--controlnet {exc}") from None


def residual_shapes(
    unet_config: dict, latent_hw: tuple[int, int]
) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """The down-block residuals' and the mid-block residual's [channels, h, w] at a latent size: conv_in's
    output, each down block's resnets and downsampler (none on the last), as diffusers' UNet collects them."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    per_block = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    h, w = latent_hw
    shapes = [(channels[0], h, w)]
    for i, width in enumerate(channels):
        shapes += [(width, h, w)] * per_block[i]
        if i < len(channels) - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            shapes.append((width, h, w))
    return shapes, (channels[-1], h, w)


class ControlNetModule(torch.nn.Module):
    """(sample, timestep [B, 1], encoder_hidden_states, controlnet_cond) -> (*down residuals, mid),
    unscaled."""

    def __init__(self, controlnet: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample, timestep.reshape(-1), hidden, cond, conditioning_scale=1.0, return_dict=False
        )
        return (*down, mid)


class ControlledUNetModule(torch.nn.Module):
    """The UNet with the residuals as inputs after its own: (sample, timestep, hidden, *down, mid)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor, *residuals: torch.Tensor
    ) -> torch.Tensor:
        *down, mid = residuals
        return self.unet(
            sample,
            timestep.reshape(-1),
            hidden,
            down_block_additional_residuals=list(down),
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


class _Residuals(UNet):
    """A component whose graph produces or takes the residuals: their names and dynamic axes."""

    def __init__(self, unet_config: dict) -> None:
        self.unet_config = unet_config
        self.count = len(residual_shapes(unet_config, (8, 8))[0])

    @property
    def residual_names(self) -> list[str]:
        return [*control.down_names(self.count), control.MID]

    def _residual_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 2: f"{name}_h", 3: f"{name}_w"} for name in self.residual_names}

    def _residual_profile(self, dims: ModelDims, limits: Limits) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Each residual's min/opt/max shape: the UNet's latent range and batch."""
        b = limits.max_unet_batch
        sides = latent_range(dims, limits)
        low, opt, high = (
            [*down, mid] for down, mid in (residual_shapes(self.unet_config, (s, s)) for s in sides)
        )
        return {
            name: ((1, *low[i]), (2, *opt[i]), (b, *high[i])) for i, name in enumerate(self.residual_names)
        }


class ControlNetComponent(_Residuals):
    def __init__(self, name: str, module: ControlNetModule, unet_config: dict) -> None:
        super().__init__(unet_config)
        self.label, self.module = name, module

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"controlnet {self.label}"

    @property
    def input_names(self) -> list[str]:
        return ["sample", "timestep", "encoder_hidden_states", control.CONDITION]

    @property
    def output_names(self) -> list[str]:
        return self.residual_names

    def load(self, checkpoint: Path) -> torch.nn.Module:
        return self.module

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {name: axes for name, axes in super().dynamic_axes().items() if name != "noise_pred"}
        image = {0: "batch", 2: "image_height", 3: "image_width"}
        return {**axes, control.CONDITION: image, **self._residual_axes()}

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        """The UNet's inputs' profile and the control image's, at pixel size."""
        b, s = limits.max_unet_batch, dims.vae_scale_factor
        lo, opt, hi = latent_range(dims, limits)
        image = ((1, 3, lo * s, lo * s), (2, 3, opt * s, opt * s), (b, 3, hi * s, hi * s))
        return Profile({**super().profile(dims, limits).shapes, control.CONDITION: image})

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        sample, timestep, hidden = super().sample_inputs(dims, batch, latent_hw)
        generator = torch.Generator().manual_seed(batch + 7)
        h, w = (side * dims.vae_scale_factor for side in latent_hw)
        return sample, timestep, hidden, torch.rand((batch, 3, h, w), generator=generator)


class ControlledUNet(_Residuals):
    @property
    def name(self) -> str:  # type: ignore[override]
        return "controlled unet"

    @property
    def input_names(self) -> list[str]:
        return ["sample", "timestep", "encoder_hidden_states", *self.residual_names]

    def load(self, checkpoint: Path) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return ControlledUNetModule(UNet2DConditionModel.from_pretrained(checkpoint / "unet")).eval()

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {**super().dynamic_axes(), **self._residual_axes()}

    def profile(self, dims: ModelDims, limits: Limits) -> Profile:
        return Profile({**super().profile(dims, limits).shapes, **self._residual_profile(dims, limits)})

    def sample_inputs(
        self, dims: ModelDims, batch: int, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(batch + 11)
        down, mid = residual_shapes(self.unet_config, latent_hw)
        residuals = [torch.randn((batch, *shape), generator=generator) * 0.1 for shape in (*down, mid)]
        return (*super().sample_inputs(dims, batch, latent_hw), *residuals)


def _random_controlnet(checkpoint: Path, seed: int) -> torch.nn.Module:
    """A ControlNet from the pipeline's UNet, its zero convolutions (the residual outputs and the
    conditioning embedding's last layer) drawn at random: a ControlNet that changes images."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3)
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]  # fmt: skip
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.05)
    return controlnet.eval()


def load_controlnet(source: str, checkpoint: Path, work_dir: Path) -> tuple[Path, torch.nn.Module]:
    """The ControlNet's folder (a `random:SEED` one saved under `work_dir`) and the model."""
    from diffusers import ControlNetModel

    if source.startswith("random:"):
        seed = int(source.split(":", 1)[1])
        folder = work_dir / "controlnets" / f"{checkpoint.resolve().name}-random-{seed}"
        if not (folder / "config.json").is_file():
            _random_controlnet(checkpoint, seed).save_pretrained(folder)
        return folder, ControlNetModel.from_pretrained(folder).eval()
    folder = Path(source)
    config = folder / "config.json"
    kind = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    if kind != "ControlNetModel":
        raise ControlNetError(
            f"--controlnet: {folder} is not a diffusers ControlNetModel folder "
            f"({'no config.json' if kind is None else f'its config is a {kind}'})"
        )
    return folder, ControlNetModel.from_pretrained(folder).eval()


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_against_unet(name: str, controlnet_config: dict, unet_config: dict) -> None:
    """A ControlNet fits a UNet when its residuals are the UNet's: the same blocks, widths, layers and
    cross-attention width, on latents of the UNet's channels."""
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        ours, theirs = (_plain(config.get(key)) for config in (controlnet_config, unet_config))
        if ours != theirs:
            raise ControlNetError(
                f"--controlnet {name}: its {key} is {ours}, the pipeline's UNet has {theirs} "
                "(a ControlNet for another base)"
            )
    if controlnet_config.get("in_channels") != unet_config.get("in_channels"):
        raise ControlNetError(
            f"--controlnet {name}: it takes {controlnet_config.get('in_channels')} latent channels, the UNet "
            f"{unet_config.get('in_channels')} (an inpainting UNet has no ControlNets here)"
        )


def export_controlnets(
    controlnets: dict[str, str],
    checkpoint: Checkpoint,
    repo: Path,
    settings: RepositorySettings,
    limits: Limits,
    work_dir: Path,
) -> list[control.ControlNetRecord]:
    """Exports each ControlNet (`controlnets`: name -> PATH) and, with any, the controlled UNet (and,
    where the UNet's engine is `tensorrt`, their TensorRT plans: `model.plan` beside each graph); removes
    the ControlNets of an earlier export that this one does not name. Returns the records, by name."""
    pipeline = settings.pipeline
    library = control.library_dir(repo, pipeline)
    for stale in (p for p in library.glob("*") if p.is_dir() and p.name not in controlnets):
        log.info("  ControlNet %s: not in this export, removed", stale.name)
        shutil.rmtree(stale)
    variant = control.controlled_unet_dir(repo, pipeline)
    if not controlnets:
        shutil.rmtree(variant, ignore_errors=True)
        return []
    if checkpoint.architecture != "sd":
        raise ControlNetError(
            "--controlnet: ControlNets serve SD 1.x/2.x pipelines; this checkpoint is "
            f"{checkpoint.architecture}"
        )
    unet_config = json.loads((checkpoint.path / "unet" / "config.json").read_text())
    records = []
    for name, source in sorted(controlnets.items()):
        folder, model = load_controlnet(source, checkpoint.path, work_dir)
        check_against_unet(name, dict(model.config), unet_config)
        component = ControlNetComponent(name, ControlNetModule(model), unet_config)
        # its weights, the UNet's and the graph's dynamic axes: a change in any exports it again
        salt = sha256_tree(checkpoint.path / "unet") + json.dumps(component.dynamic_axes(), sort_keys=True)
        sha256 = sha256_tree(folder, salt=salt)
        out = library / name
        old = control.ControlNetRecord.load(out) if (out / control.RECORD).is_file() else None
        if old is not None and old.sha256 == sha256 and (out / "model.onnx").is_file():
            log.info("  ControlNet %s: unchanged, kept", name)
            records.append(old)
            _plan(component, out / "model.onnx", checkpoint, settings, limits, work_dir)
            continue
        started = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        (out / PLAN).unlink(missing_ok=True)  # made from the graph before
        diff = export_onnx(component, checkpoint.path, checkpoint.dims, out / "model.onnx")
        record = control.ControlNetRecord(
            name=name,
            source=source if source.startswith("random:") else str(folder.resolve()),
            sha256=sha256,
            residuals=component.count,
            conditioning_channels=int(model.config.conditioning_channels),
            max_abs_diff=diff,
            pipeline=pipeline,
        )
        record.save(out)
        log.info(
            "  ControlNet %s: exported in %.1f s, max abs diff vs PyTorch %.3g",
            name,
            time.monotonic() - started,
            diff,
        )
        records.append(record)
        _plan(component, out / "model.onnx", checkpoint, settings, limits, work_dir)
    controlled = ControlledUNet(unet_config)
    unet_sha = sha256_tree(
        checkpoint.path / "unet", salt=json.dumps(controlled.dynamic_axes(), sort_keys=True)
    )
    source_file = variant / SOURCE
    if (
        source_file.is_file()
        and json.loads(source_file.read_text()).get("unet_sha256") == unet_sha
        and (variant / "model.onnx").is_file()
    ):
        log.info("  controlled UNet: unchanged, kept")
    else:
        started = time.monotonic()
        variant.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=variant.parent) as tmp:
            staged = Path(tmp) / "model.onnx"
            diff = export_onnx(controlled, checkpoint.path, checkpoint.dims, staged)
            (variant / PLAN).unlink(missing_ok=True)
            for f in Path(tmp).iterdir():
                f.replace(variant / f.name)
        source_file.write_text(json.dumps({"unet_sha256": unet_sha, "max_abs_diff": diff}) + "\n")
        log.info(
            "  controlled UNet: exported in %.1f s, max abs diff vs PyTorch %.3g",
            time.monotonic() - started,
            diff,
        )
    _plan(controlled, variant / "model.onnx", checkpoint, settings, limits, work_dir)
    return records


def _plan(
    component: _Residuals,
    graph: Path,
    checkpoint: Checkpoint,
    settings: RepositorySettings,
    limits: Limits,
    work_dir: Path,
) -> None:
    """The graph's TensorRT plan beside it when the pipeline's UNet runs on TensorRT (the profile: the
    UNet's latent range and batch); without a GPU here, a warning: ONNX Runtime runs the graph until the
    export runs on the GPU host."""
    if settings.engines[UNET.name] != "tensorrt" or (graph.parent / PLAN).is_file():
        return
    reason, target = tensorrt.unavailable_reason(), tensorrt.build_target()
    if reason or target is None:
        log.warning("  %s: TensorRT plan NOT built (%s); ONNX Runtime runs its graph", component.name, reason)
        return
    from sd_triton.export.pipeline import engine_profile  # (the pipeline imports this module)

    profile = engine_profile(component, checkpoint, settings, limits)  # UNet-shaped: its batch rule too
    fp16 = settings.precision_of(UNET.name) == "fp16"
    cache = tensorrt.timing_cache_path(work_dir, target)
    tensorrt.build_engine(graph, graph.parent / PLAN, profile, fp16=fp16, timing_cache=cache)
