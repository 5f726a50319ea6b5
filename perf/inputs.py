"""perf_analyzer input data (`--input-data FILE.json`) for txt2img and each engine component.

Shapes come from the exported repository (`denoise/1/pipeline.json`: latent channels, VAE scale
factor, text encoder width) and the request a user picks (height, width, steps, guidance, prompts).
Tensors of batching models leave the batch dimension out: give perf_analyzer `-b` for it (2 for a
UNet step with classifier-free guidance).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton import contract
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.requests import GenerationParams, uses_guidance

COMPONENTS = (contract.TXT2IMG.name, *contract.ENGINE_MODELS)
DEFAULT_PROMPTS = (
    "a red circle on a blue background",
    "a green square at the top left on a white background",
    "a yellow star on the right on a black background",
    "a purple triangle at the bottom on a orange background",
)


@dataclass(frozen=True)
class Request(GenerationParams):
    """The request whose shapes the data describes: the generation parameters (the perf tools' defaults:
    the tiny model's size, 10 DDIM steps, a fixed seed) and the prompts, image i of prompt j seeded
    seed + j."""

    height: int = 64
    width: int = 64
    steps: int = 10
    scheduler: str = "ddim"
    seed: int = 1234
    prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS)
    negative_prompt: str = ""
    init_image: bool = False  # image-to-image: a seeded picture as IMAGE (and `strength`, or its default)


def load_pipeline(repo: Path) -> PipelineConfig:
    path = Path(repo) / "denoise" / "1" / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"--repo {repo}: no {path.relative_to(repo)}; run `sd-triton export` first")
    return PipelineConfig.load(path)


def _tensor(values: np.ndarray[Any, Any]) -> dict[str, Any]:
    flat = values.reshape(-1)
    content = [round(float(v), 5) for v in flat] if values.dtype.kind == "f" else [int(v) for v in flat]
    return {"content": content, "shape": list(values.shape)}


def _bytes(text: str) -> dict[str, Any]:
    return {"content": [text], "shape": [1]}


def _latent_shape(pipeline: PipelineConfig, request: Request) -> tuple[int, int, int]:
    factor = pipeline.vae_scale_factor
    for name, side in (("height", request.height), ("width", request.width)):
        if side % factor:
            raise ValueError(f"{name} {side} is not a multiple of the VAE scale factor {factor}")
    return pipeline.latent_channels, request.height // factor, request.width // factor


def txt2img_data(request: Request) -> list[dict[str, Any]]:
    """One entry per prompt, with seeds seed, seed+1, ...; perf_analyzer cycles through them."""
    entries = []
    for i, prompt in enumerate(request.prompts):
        entry: dict[str, Any] = {contract.PROMPT.name: _bytes(prompt)}
        for spec, value in replace(request, seed=request.seed + i).inputs().items():
            if value is None:  # an optional input left out (STRENGTH of text-to-image)
                continue
            is_text = spec.dtype == "TYPE_STRING"
            entry[spec.name] = _bytes(value) if is_text else _tensor(np.array([value], spec.numpy_dtype))
        if request.negative_prompt:
            entry[contract.NEGATIVE_PROMPT.name] = _bytes(request.negative_prompt)
        if request.init_image:
            entry[contract.IMAGE.name] = _tensor(
                init_picture(request.height, request.width, request.seed + i)
            )
        entries.append(entry)
    return entries


def init_picture(height: int, width: int, seed: int) -> np.ndarray[Any, Any]:
    """A uint8 [height, width, 3] picture for image-to-image requests: a seeded colour gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [(a * x + b * y + c) % 1.0 for a, b, c in rng.uniform(0.2, 1.0, (3, 3))]
    picture: np.ndarray[Any, Any] = (np.stack(channels, axis=-1) * 255).astype(np.uint8)
    return picture


def component_data(
    component: str,
    pipeline: PipelineConfig,
    request: Request,
    token_ids: tuple[np.ndarray[Any, Any], ...] | None = None,
) -> list[dict[str, Any]]:
    """One entry (one sample, no batch dimension) of realistic values for an engine component."""
    rng = np.random.default_rng(request.seed)
    spec = contract.models(pipeline.architecture)[component]
    names = [t.name for t in spec.inputs]
    if component == "text_encoder":  # the tokenizer's inputs for it (SDXL: both tokenizers')
        if token_ids is None or len(token_ids) != len(names):
            raise ValueError(f"text_encoder data needs the tokenizer's {len(names)} inputs for it")
        pairs = zip(spec.inputs, token_ids, strict=True)
        return [{t.name: _tensor(value.astype(t.numpy_dtype)) for t, value in pairs}]
    latent = _latent_shape(pipeline, request)
    if component == "unet":
        latent = (pipeline.unet_in_channels or latent[0], *latent[1:])  # an inpainting UNet's 9 channels
        if pipeline.text_hidden_size is None:
            raise ValueError("pipeline.json has no text_hidden_size: re-export the repository")
        return [
            {
                names[0]: _tensor(rng.standard_normal(latent, dtype=np.float32)),
                names[1]: _tensor(np.array([500.0], np.float32)),
                names[2]: _tensor(
                    rng.standard_normal((contract.TOKEN_LENGTH, pipeline.text_hidden_size), dtype=np.float32)
                ),
                **_added_conditioning(names[3:], pipeline, request, rng),
            }
        ]
    if component == "vae_decoder":
        sample = rng.standard_normal(latent, dtype=np.float32) / pipeline.vae_scaling_factor
        return [{names[0]: _tensor(sample)}]
    if component == "vae_encoder":  # a picture in [-1, 1], channels first
        picture = init_picture(request.height, request.width, request.seed).astype(np.float32) / 127.5 - 1
        return [{names[0]: _tensor(picture.transpose(2, 0, 1))}]
    raise ValueError(f"component {component!r}: expected one of {', '.join(COMPONENTS)}")


def _added_conditioning(
    names: list[str], pipeline: PipelineConfig, request: Request, rng: np.random.Generator
) -> dict[str, Any]:
    """An SDXL UNet's text_embeds and time_ids (the request's size, no crop); nothing for SD's."""
    if not names:
        return {}
    if pipeline.pooled_dim is None:
        raise ValueError("pipeline.json has no pooled_dim for this SDXL model: re-export the repository")
    sizes = [request.height, request.width, 0, 0, request.height, request.width]
    return {
        names[0]: _tensor(rng.standard_normal((pipeline.pooled_dim,), dtype=np.float32)),
        names[1]: _tensor(np.array(sizes, np.float32)),
    }


def write_inputs(
    repo: Path, out: Path, request: Request, components: tuple[str, ...] = COMPONENTS
) -> dict[str, Path]:
    """Write `<out>/<component>.json` for each component; return the paths."""
    pipeline = load_pipeline(repo)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = None
    if "text_encoder" in components:
        from sd_triton.runtime.tokenize import PromptTokenizer

        tokenizer = PromptTokenizer.in_folder(Path(repo) / "tokenizer" / "1")
        token_ids = tokenizer.tokenize(request.prompts[0], "", guidance=False).text_encoder_inputs
        token_ids = tuple(ids[0] for ids in token_ids)  # one row: perf_analyzer batches with -b
    written = {}
    for component in components:
        if component == "txt2img":
            entries = txt2img_data(request)
        else:
            entries = component_data(component, pipeline, request, token_ids)
        path = out / f"{component}.json"
        path.write_text(json.dumps({"data": entries}) + "\n")
        written[component] = path
    return written


def batch_size_for(component: str, request: Request) -> int:
    """The batch perf_analyzer should send (`-b`) to match one call of `request`'s pipeline."""
    if component == "txt2img":
        return 1  # txt2img does not batch; NUM_IMAGES is an input
    rows = 2 if uses_guidance(request.guidance_scale) else 1  # [uncond, cond]
    if component == "unet":
        return rows * request.num_images
    if component == "text_encoder":
        return rows
    return request.num_images
