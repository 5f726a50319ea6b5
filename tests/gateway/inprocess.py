"""The gateway in-process (the middle test tier): FastAPI's TestClient over `create_app` with an
in-memory TritonBackend, for what is the gateway's own logic (keys, limits, quotas, policy, validation,
error shapes). No Triton, no gateway process: what only they can show stays in the end-to-end tier."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from sd_triton.gateway.main import create_app
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.served_model import EngineInfo, ServedModel
from sd_triton.txt2img_client import Progress, Txt2ImgResult

UNET = {"component": "unet", "version": 1, "engine": "python-ort", "precision": "fp32", "sha256": "ab" * 32}


def _engine(pipeline: str) -> dict[str, Any]:
    """The UNet engine a pipeline's results name (a named pipeline's: an engine of its own)."""
    return UNET if not pipeline else {**UNET, "sha256": f"{zlib.crc32(pipeline.encode()):08x}" * 8}


def fake_served_model() -> ServedModel:
    """Shaped like the tiny export: 64 px native, multiples of 8, the default limits."""
    engine = EngineInfo(kind="python-ort", precision="fp32", version=1, sha256="ab" * 32)
    return ServedModel(
        model="fake",
        native_height=64,
        native_width=64,
        spatial_multiple=8,
        default_scheduler="PNDMScheduler",
        engines={"text_encoder": engine, "unet": engine, "vae_decoder": engine},
        fingerprint="fake-fingerprint",
    )


def fake_images(prompt: str, seed: int, num_images: int, height: int, width: int) -> np.ndarray:
    """Image i depends on the prompt and seed + i only, as the real pipeline's do."""
    images = [
        np.random.default_rng([seed + i, zlib.crc32(prompt.encode())]).integers(0, 256, (height, width, 3))
        for i in range(num_images)
    ]
    return np.stack(images).astype(np.uint8)


@dataclass
class FakeTriton:
    """A TritonBackend (sd_triton.gateway.backend) in memory: every call is recorded in `calls`."""

    served: ServedModel = field(default_factory=fake_served_model)
    more: list[ServedModel] = field(default_factory=list)  # other pipelines (ServedModel.pipeline set)
    step_s: float = 0.0  # each denoising step takes this long (for concurrency and job tests)
    error: Exception | None = None  # raised by every call while set (TritonUnavailableError, ...)
    healthy: bool = True
    calls: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return self.healthy

    def endpoint_states(self) -> dict[str, str]:
        return {"fake:8001": "ready" if self.healthy else "not ready: the test says so"}

    async def served_models(self, fresh: bool = False) -> list[ServedModel]:
        if self.error is not None:
            raise self.error
        return [self.served, *self.more]

    def _result(self, prompt: str, params: dict[str, Any], latents: bool = False) -> Txt2ImgResult:
        images = fake_images(prompt, params["seed"], params["num_images"], params["height"], params["width"])
        if "start_latents" in params:  # a refiner: the images depend on the latents it was given too
            images = images ^ np.uint8(int(np.abs(params["start_latents"]).sum() * 1000) % 256)
        shape = (params["num_images"], 4, params["height"] // 8, params["width"] // 8)
        return Txt2ImgResult(
            images,
            prompt_truncated_tokens=0,
            negative_prompt_truncated_tokens=0,
            engines=[_engine(params.get("pipeline", ""))],
            latents=np.random.default_rng(params["seed"]).normal(size=shape).astype(np.float32)
            if latents
            else None,
        )

    @staticmethod
    def steps(params: dict[str, Any]) -> int:
        """The steps a request runs: a hand-off's base, or its refiner, runs its share only."""
        steps = params["steps"]
        if params.get("denoising_end") is not None:
            return max(1, round(steps * params["denoising_end"]))
        if params.get("denoising_start") is not None:
            return max(1, steps - round(steps * params["denoising_start"]))
        return int(steps)

    async def txt2img(
        self, prompt: str, pipeline: str = "", latents: bool = False, **params: Any
    ) -> Txt2ImgResult:
        self.calls.append({"prompt": prompt, "pipeline": pipeline, **params})
        if self.error is not None:
            raise self.error
        await asyncio.sleep(self.step_s * self.steps(params))
        return self._result(prompt, {**params, "pipeline": pipeline}, latents)

    async def txt2img_stream(
        self, prompt: str, preview: bool = False, pipeline: str = "", latents: bool = False, **params: Any
    ) -> AsyncGenerator[Progress | Txt2ImgResult, None]:
        self.calls.append({"prompt": prompt, "preview": preview, "pipeline": pipeline, **params})
        if self.error is not None:
            raise self.error
        steps = self.steps(params)
        for step in range(1, steps + 1):
            await asyncio.sleep(self.step_s)
            small = (
                fake_images(prompt, params["seed"] + step, params["num_images"], 8, 8) if preview else None
            )
            yield Progress(step=step, steps=steps, previews=small)
        yield self._result(prompt, {**params, "pipeline": pipeline}, latents)


@contextmanager
def gateway_client(backend: FakeTriton | None = None, **settings: Any) -> Iterator[TestClient]:
    """The app over `backend` (a fresh FakeTriton by default), its lifespan run; `settings`: GatewaySettings
    fields (keys_file, redis_url, ...). The backend is `client.app.state.backend`."""
    settings.setdefault("triton_metrics_url", "")  # no Triton metrics to scrape
    app = create_app(GatewaySettings(**settings), backend=backend or FakeTriton())
    with TestClient(app) as client:
        yield client
