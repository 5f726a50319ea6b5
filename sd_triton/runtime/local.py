"""The exported repository's ONNX files run in this process with ONNX Runtime, no server: the same
steps as txt2img (tokenizer, text encoder, denoising loop, VAE decoder, postprocess). It is the
engine floor the serving benchmarks compare against, and a way to debug an export without Triton."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sd_triton import contract as c
from sd_triton.model_params import EngineParams
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.requests import validate_params
from sd_triton.runtime.denoise import denoise, encode_init_image, sdxl_conditioning
from sd_triton.runtime.denoise import size_conditioning as conditioning_ids
from sd_triton.runtime.ort_runner import BatchRunner, OrtRunner
from sd_triton.runtime.postprocess import to_uint8_images
from sd_triton.runtime.tokenize import PromptTokenizer


@dataclass(frozen=True)
class LocalResult:
    images: np.ndarray  # uint8 [N, H, W, 3]
    prompt_truncated_tokens: int


class LocalPipeline:
    def __init__(
        self,
        repo: str | Path,
        device: str = "cpu",
        threads: int = 0,
        model_files: dict[str, str] | None = None,
        engine_params: dict[str, EngineParams] | None = None,
        pipeline: str = "",
    ) -> None:
        """`model_files`: per component, a graph other than version 1's model.onnx (e.g. {"unet":
        "model.int8.onnx"}, or any path), or a diffusers weights folder (python-torch, e.g. "unet").
        `engine_params`: per component, the runtime settings to run it with, as the Triton engine's
        config sets them (its threads and ONNX Runtime's spinning; the benchmarks' engine floor passes
        the stack's own). Without them: `threads`, and ONNX Runtime's default spinning. `pipeline`: a
        named pipeline of the repository (`sd-triton export --name`)."""
        repo = Path(repo)
        files = {name: "model.onnx" for name in c.ENGINE_MODELS} | (model_files or {})
        self.config = PipelineConfig.load(repo / c.model_name(pipeline, c.DENOISE.name) / "1" / FILENAME)
        self.tokenizer = PromptTokenizer.in_folder(repo / self.config.name_of(c.TOKENIZER.name) / "1")
        self.specs = c.models(self.config.architecture)
        self.runners: dict[str, BatchRunner] = {}
        for name in c.ENGINE_MODELS:
            path = repo / self.config.name_of(name) / "1" / files[name]
            if name == c.VAE_ENCODER.name and not path.exists():
                continue  # exported before image inputs: text-to-image only
            if path.is_dir():  # a checkpoint's subfolder, or a folder of several (SDXL's text encoders)
                from sd_triton.runtime.torch_runner import TorchRunner

                root = path.parent if (path / "config.json").is_file() else path
                self.runners[name] = TorchRunner(name, root, device=device, threads=threads)
            else:
                params = (engine_params or {}).get(name)
                if params is None:
                    self.runners[name] = OrtRunner(path, device=device, threads=threads)
                else:
                    self.runners[name] = OrtRunner(
                        path, device=device, threads=params.intra_op_threads, spinning=params.allow_spinning
                    )

    def _run_all(self, model: str, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        spec = self.specs[model]
        feeds = {t.name: a for t, a in zip(spec.inputs, arrays, strict=True)}
        return self.runners[model].run(feeds)

    def _run(self, model: str, *arrays: np.ndarray) -> np.ndarray:
        return self._run_all(model, *arrays)[self.specs[model].outputs[0].name]

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        size_conditioning: Sequence[int] | None = None,
        negative_size_conditioning: Sequence[int] | None = None,
        **fields: Any,
    ) -> LocalResult:
        """`fields`: sd_triton.requests.GenerationParams' names (its defaults for the rest). `image`:
        image-to-image from this uint8 [height, width, 3] image (`strength` in `fields`); `mask`:
        inpainting, uint8 [height, width], grey levels >= 128 repainted. SDXL: the size conditioning (the
        contract's SIZE_CONDITIONING, 6 integers) and no negative prompt -> zeros where the model says so."""
        params = validate_params(
            limits=self.config.limits, spatial_multiple=self.config.vae_scale_factor, **fields
        )
        sizes, negative_sizes = (
            None if v is None else np.asarray(v, dtype=np.int32)
            for v in (size_conditioning, negative_size_conditioning)
        )
        ids = conditioning_ids(params, self.config, sizes, negative_sizes)
        # 1. Tokens and text embeddings ([uncond,] cond); an init image's latent distribution.
        tokens = self.tokenizer.tokenize(prompt, negative_prompt or "", params.classifier_free_guidance)
        encoded = self._run_all(c.TEXT_ENCODER.name, *tokens.text_encoder_inputs)
        outputs = [t.name for t in self.specs[c.TEXT_ENCODER.name].outputs]
        pooled = encoded[outputs[1]] if len(outputs) > 1 else None
        embeds, added = sdxl_conditioning(
            encoded[outputs[0]], pooled, params, self.config, ids, negative_prompt is not None
        )
        init = None
        if image is not None:
            strength = c.DEFAULT_STRENGTH if params.strength is None else params.strength
            encoder = partial(self._run, c.VAE_ENCODER.name)
            init = encode_init_image(image, strength, mask, self.config, encoder)
        # 2. The denoising loop over the UNet session.
        unet = partial(self._run, c.UNET.name)
        latents = denoise(embeds, params, self.config, unet, init=init, added=added)
        # 3. Decode and convert.
        decoded = self._run(c.VAE_DECODER.name, latents)
        return LocalResult(to_uint8_images(decoded), tokens.prompt_truncated_tokens)
