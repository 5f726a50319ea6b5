"""Alternative (c) of `sd-triton perf compare`: the service most teams write first — FastAPI with
diffusers' pipeline (StableDiffusionPipeline, or the SDXL one) called inside an `async def` handler.
Requests therefore run one at a time (the pipeline blocks the event loop), which also keeps the
pipeline's stateful scheduler safe. It answers `/v1/generate` with the gateway's body and response
shape, so the same load driver measures both.

    SD_NAIVE_MODEL=<diffusers folder> uvicorn perf.naive_service:app --port 8090
"""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from sd_triton.gateway.process import GatewayProcess
from sd_triton.perf.reference import diffusers_pipeline


class Body(BaseModel):
    prompt: str
    negative_prompt: str | None = None
    height: int = 256
    width: int = 256
    steps: int = 10
    guidance_scale: float = 7.5
    seed: int = 0
    num_images: int = 1
    scheduler: str = "ddim"


state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state["pipe"] = diffusers_pipeline(os.environ["SD_NAIVE_MODEL"])
    yield


app = FastAPI(lifespan=lifespan)


@app.post("/v1/generate")
async def generate(body: Body) -> dict[str, Any]:
    if body.scheduler != "ddim":
        raise HTTPException(400, f"scheduler: this service runs ddim only, got {body.scheduler!r}")
    images = state["pipe"](
        body.prompt,
        negative_prompt=body.negative_prompt,
        height=body.height,
        width=body.width,
        num_inference_steps=body.steps,
        guidance_scale=body.guidance_scale,
        num_images_per_prompt=body.num_images,
        generator=[torch.Generator().manual_seed(body.seed + i) for i in range(body.num_images)],
    ).images
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append({"base64": base64.b64encode(buffer.getvalue()).decode()})
    return {"images": encoded}


@app.get("/healthz")
@app.get("/readyz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


class NaiveServiceProcess(GatewayProcess):
    """This app under uvicorn as a child process, on the diffusers folder `model`."""

    def __init__(self, model: Path, port: int) -> None:
        super().__init__(triton_url="", port=port, env={"SD_NAIVE_MODEL": str(model)})

    def command(self) -> list[str]:
        app = "perf.naive_service:app"
        return [sys.executable, "-m", "uvicorn", app, "--host", self.host, "--port", str(self.port)]
