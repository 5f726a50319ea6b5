"""The trained demo model through the full stack gives the images diffusers' own pipeline gives on
the same folder. (How often its images follow their captions is measured by perf/demo_quality.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import DDIMScheduler, StableDiffusionPipeline

from export.demo_data import held_in_prompts
from export.pipeline import DEMO_MODEL, ExportOptions, run_export
from sd_triton.triton_server import TritonServer
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, free_port

PARAMS = {"height": 64, "width": 64, "steps": 25, "guidance_scale": 7.5, "scheduler": "ddim"}

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL / "model_index.json").is_file(), reason="no trained demo model in models/demo"
)


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpcclient.InferenceServerClient]:
    repo = tmp_path_factory.mktemp("demo") / "repo"
    run_export(ExportOptions(model="demo", repo=repo, work_dir=WORK_DIR))
    server = TritonServer(
        repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
        log_file=repo.parent / "triton.log",
    )  # fmt: skip
    with server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


def test_diffusers_gives_the_same_images(demo_client) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(DEMO_MODEL), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for scene, seed in held_in_prompts(3):
        ours = txt2img(demo_client, scene.caption, seed=seed, **PARAMS).images
        theirs = pipe(
            scene.caption,
            height=64,
            width=64,
            num_inference_steps=PARAMS["steps"],
            guidance_scale=PARAMS["guidance_scale"],
            generator=[torch.Generator().manual_seed(seed)],
            output_type="np",
        ).images
        diff = np.abs(ours.astype(int) - (theirs * 255).round().astype(int)).max()
        assert diff <= 2, (scene.caption, diff)
