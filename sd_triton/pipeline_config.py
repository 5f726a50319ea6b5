"""What the denoise step needs to know about the exported model, written by the export as
`denoise/1/pipeline.json` (and `txt2img_stream/1/pipeline.json`). Torch-free: the gateway reads
the limits from the same file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd_triton.contract import ARCHITECTURES, Limits, added_conditioning, model_name

FILENAME = "pipeline.json"


@dataclass(frozen=True)
class PipelineConfig:
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell; requests' height and width are multiples of it
    vae_scaling_factor: float  # latents are divided by it before the VAE decoder
    scheduler_config: dict[str, Any]
    limits: Limits = field(default_factory=Limits)
    text_hidden_size: int | None = None  # the text encoder's width (UNet cross-attention); None: unknown
    # latent channels (+ bias) -> RGB in [0, 1], for step previews (export/preview.py); None: no previews
    preview_weights: list[list[float]] | None = None
    # the UNet's input channels: latent_channels, or latents + mask + masked image for an inpainting UNet
    # (9 for SD); None: latent_channels
    unet_in_channels: int | None = None
    # "sdxl": two tokenizers and text encoders, the UNet's added conditioning (contract.ARCHITECTURES)
    architecture: str = "sd"
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero unconditional embeddings
    pooled_dim: int | None = None  # SDXL: the pooled text embeddings' width (the UNet's text_embeds)
    time_ids: int | None = None  # SDXL: the UNet's time ids per row (6: sizes; a refiner's 5: with the score)
    pipeline: str = ""  # the pipeline's name in its repository: its models are NAME_<model> ("": plain)
    # each text encoder's width (SDXL: two) and their vocabulary size (token embedding rows): textual
    # inversion's learned vectors are ids from vocab_size on (sd_triton/embeddings.py)
    text_widths: list[int] | None = None
    vocab_size: int | None = None

    @property
    def inpainting_unet(self) -> bool:
        """The UNet takes a mask and the masked image's latents besides the latents."""
        return self.unet_in_channels is not None and self.unet_in_channels > self.latent_channels

    def __post_init__(self) -> None:
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.vae_scale_factor < 1:
            raise ValueError(f"vae_scale_factor must be >= 1, got {self.vae_scale_factor}")
        if not self.vae_scaling_factor > 0:
            raise ValueError(f"vae_scaling_factor must be > 0, got {self.vae_scaling_factor}")
        if self.architecture not in ARCHITECTURES:
            choices = ", ".join(ARCHITECTURES)
            raise ValueError(f"architecture must be one of {choices}, got {self.architecture!r}")

    @property
    def xl(self) -> bool:
        """SDXL's added conditioning (a base model or a refiner)."""
        return added_conditioning(self.architecture)

    def name_of(self, model: str) -> str:
        """A model of this pipeline, by its name in the repository."""
        return model_name(self.pipeline, model)

    @property
    def refiner(self) -> bool:
        """An SDXL refiner: aesthetic-score time ids, one tokenizer and encoder."""
        return self.architecture == "sdxl-refiner"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> PipelineConfig:
        data = json.loads(Path(path).read_text())
        data["limits"] = Limits(**data.get("limits", {}))
        return cls(**data)
