"""ControlNets through Triton (issue 24): exported with the pipeline (`--controlnet NAME=PATH`), run by the
denoising loop every step on the request's control images, matching diffusers'
StableDiffusionControlNetPipeline on the same weights (one ControlNet and two, scales, a window of steps,
non-square, two images, no guidance); requests with and without ControlNets in flight together each get
their own images; bad ControlNet inputs are INVALID_ARG naming the input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from PIL import Image
from tritonclient.utils import InferenceServerException

from sd_triton.export.controlnet import load_controlnet
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, triton_server
from tests.integration.test_parity import MAX_ABS_DIFF, max_abs_diff

PROMPT = "a red circle on a blue background"
CONTROLNETS = {"edges": "random:1", "depth": "random:2"}


def control_image(height: int, width: int, seed: int) -> np.ndarray:
    """A control map: white rectangles' outlines on black, uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    for _ in range(4):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        bottom, right = rng.integers(top + 4, height), rng.integers(left + 4, width)
        image[top:bottom, [left, right - 1]] = 255
        image[[top, bottom - 1], left:right] = 255
    return image


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("controlnet-serve")
    repo = work / "model_repository"
    manifest = run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR, controlnets=CONTROLNETS))
    checkpoint = Path(manifest["source"]["path"])
    folders = {name: load_controlnet(source, checkpoint, WORK_DIR)[0] for name, source in CONTROLNETS.items()}
    with (
        triton_server(repo, work / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        yield {"client": client, "repo": repo, "checkpoint": checkpoint, "folders": folders,
               "grpc_url": server.grpc_url}  # fmt: skip


def _ours(served: dict, controls: list[dict], images: list[np.ndarray], **params: object) -> np.ndarray:
    merged = {"height": 64, "width": 64, "steps": 6, "guidance_scale": 7.5, "scheduler": "ddim", "seed": 3}
    merged.update(params)
    extra = {"controlnets": controls, "control_images": np.stack(images)} if controls else {}
    return txt2img(served["client"], PROMPT, **extra, **merged).images


def _diffusers(served: dict, controls: list[dict], images: list[np.ndarray], **params: object) -> np.ndarray:
    height, width = params.get("height", 64), params.get("width", 64)
    nets = [ControlNetModel.from_pretrained(served["folders"][ref["name"]]) for ref in controls]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        served["checkpoint"], controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    n = int(params.get("num_images", 1))  # type: ignore[call-overload]
    many = len(nets) > 1
    pick = (lambda key, default: [r.get(key, default) for r in controls]) if many else (
        lambda key, default: controls[0].get(key, default))  # fmt: skip
    out = pipe(
        PROMPT,
        image=[Image.fromarray(i) for i in images] if many else Image.fromarray(images[0]),
        height=height,
        width=width,
        num_inference_steps=6,
        guidance_scale=params.get("guidance_scale", 7.5),
        num_images_per_prompt=n,
        controlnet_conditioning_scale=pick("scale", 1.0),
        control_guidance_start=pick("start", 0.0),
        control_guidance_end=pick("end", 1.0),
        generator=[torch.Generator().manual_seed(3 + i) for i in range(n)],
        output_type="np",
    ).images
    return (out * 255).round().astype(np.uint8)


CASES = {
    "one": ([{"name": "edges"}], {}),
    "two at different scales": ([{"name": "edges", "scale": 0.7}, {"name": "depth", "scale": 1.3}], {}),
    "a window of steps": ([{"name": "edges", "start": 0.1, "end": 0.6}], {}),
    "non-square, two images": ([{"name": "depth", "scale": 0.8}], {"width": 96, "num_images": 2}),
    "no guidance": ([{"name": "edges"}, {"name": "depth", "end": 0.5}], {"guidance_scale": 1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnets_match_diffusers(served: dict, case: str) -> None:
    """diffusers' StableDiffusionControlNetPipeline (MultiControlNet for two) within 2/255; each case's
    ControlNets change the image clearly."""
    controls, params = CASES[case]
    height, width = 64, int(params.get("width", 64))  # type: ignore[call-overload]
    images = [control_image(height, width, seed=k) for k in range(len(controls))]
    ours = _ours(served, controls, images, **params)
    assert max_abs_diff(ours, _diffusers(served, controls, images, **params)) <= MAX_ABS_DIFF
    assert max_abs_diff(ours, _ours(served, [], [], **params)) > 10, "the ControlNets hardly change the image"


def test_controlnets_with_an_init_image_match_diffusers_img2img(served: dict) -> None:
    """Image-to-image with a ControlNet (strength 0.6, a window): diffusers'
    StableDiffusionControlNetImg2ImgPipeline within 2/255, the window counted over the steps it runs."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    init = np.zeros((64, 64, 3), np.uint8)
    init[:, :32] = (200, 60, 60)
    init[:, 32:] = (40, 90, 210)
    ref = {"name": "edges", "scale": 0.9, "start": 0.0, "end": 0.75}
    cond = control_image(64, 64, seed=5)
    ours = _ours(served, [ref], [cond], image=init, strength=0.6)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        served["checkpoint"], controlnet=ControlNetModel.from_pretrained(served["folders"]["edges"]),
        safety_checker=None,
    )  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT, image=Image.fromarray(init), control_image=Image.fromarray(cond), strength=0.6,
        height=64, width=64, num_inference_steps=6, guidance_scale=7.5, controlnet_conditioning_scale=0.9,
        control_guidance_start=0.0, control_guidance_end=0.75, generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images  # fmt: skip
    assert max_abs_diff(ours, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF
    assert max_abs_diff(ours, _ours(served, [], [], image=init, strength=0.6)) > 10


def test_requests_with_and_without_controlnets_in_flight_together(served: dict) -> None:
    """Plain requests and ControlNet requests (one, two) at once: each gives its alone images."""
    images = [control_image(64, 64, seed=k) for k in range(2)]
    requests = [
        ([], []),
        ([{"name": "edges"}], images[:1]),
        ([{"name": "edges", "scale": 0.5}, {"name": "depth"}], images),
        ([{"name": "depth", "start": 0.5}], images[1:]),
    ]
    alone = [_ours(served, controls, imgs) for controls, imgs in requests]
    with ThreadPoolExecutor(len(requests) * 2) as pool:
        together = list(pool.map(lambda r: _ours(served, *r), requests * 2))
    for index, result in enumerate(together):
        assert max_abs_diff(result, alone[index % len(requests)]) <= 1, requests[index % len(requests)][0]
    assert len({a.tobytes() for a in alone}) == len(requests)


@pytest.mark.parametrize(
    ("controls", "images", "name", "words"),
    [
        ('[{"name": "canny"}]', 1, "CONTROLNETS", "no ControlNet 'canny'"),
        ('[{"name": "edges", "start": 0.6, "end": 0.6}]', 1, "CONTROLNETS", "must be below end"),
        ('[{"name": "edges", "scale": 2.5}]', 1, "CONTROLNETS", "scale must be from 0 to 2"),
        (json.dumps([{"name": "edges"}, {"name": "depth"}, {"name": "e"}, {"name": "f"}]), 4, "CONTROLNETS",
         "at most 3"),
        ('[{"name": "edges"}]', 2, "CONTROL_IMAGES", "must be uint8 [CONTROLNETS, HEIGHT, WIDTH, 3]"),
        ('[{"name": "edges"}]', 0, "CONTROL_IMAGES", "is required"),
    ],
)  # fmt: skip
def test_bad_controlnet_inputs_are_invalid_arg(
    served: dict, controls: str, images: int, name: str, words: str
) -> None:
    from sd_triton import contract as c
    from sd_triton.txt2img_client import infer_input, txt2img_inputs

    inputs = [
        *txt2img_inputs(PROMPT, height=64, width=64, steps=2),
        infer_input(c.CONTROLNETS, np.array([controls.encode()], dtype=object)),
    ]
    if images:
        inputs.append(
            infer_input(c.CONTROL_IMAGES, np.stack([control_image(64, 64, k) for k in range(images)]))
        )
    with pytest.raises(InferenceServerException, match=name) as caught:
        served["client"].infer(c.TXT2IMG.name, inputs)
    assert words in str(caught.value) and "INVALID" in str(caught.value.status())
    # a control image of another size than the output
    wrong = [*txt2img_inputs(PROMPT, height=64, width=64, steps=2, controlnets=[{"name": "edges"}],
                             control_images=control_image(64, 96, 0)[None])]  # fmt: skip
    with pytest.raises(InferenceServerException, match="CONTROL_IMAGES"):
        served["client"].infer(c.TXT2IMG.name, wrong)
    assert txt2img(served["client"], PROMPT, height=64, width=64, steps=2).images.shape == (1, 64, 64, 3)


def test_the_gateway_takes_controlnets(served: dict, tmp_path: Path) -> None:
    """`controlnets` on /v1/generate through the real gateway: a photo with preprocess canny gives the
    images Triton gives for OpenCV's edges of it; /v1/models lists the ControlNets."""
    import base64
    import io

    import cv2
    import httpx

    from sd_triton.gateway.process import GatewayProcess
    from sd_triton.sdk import Client
    from tests.conftest import free_port

    photo = np.zeros((64, 64, 3), np.uint8)
    photo[10:50, 12:40] = (220, 120, 30)
    photo[30:60, 35:60] = (20, 160, 220)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    ref = {"name": "edges", "image": base64.b64encode(buffer.getvalue()).decode(), "preprocess": "canny"}
    body = {"prompt": PROMPT, "steps": 6, "seed": 3, "scheduler": "ddim", "width": 64, "height": 64,
            "controlnets": [ref]}  # fmt: skip
    with (
        GatewayProcess(served["grpc_url"], port=free_port(), log_file=tmp_path / "gateway.log") as gateway,
        httpx.Client(base_url=gateway.url, timeout=60) as http,
    ):
        response = http.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["base64"]))))
        edges = np.repeat(cv2.Canny(photo, 100, 200)[:, :, None], 3, axis=2)
        assert np.array_equal(shown, _ours(served, [{"name": "edges"}], [edges])[0])
        with Client(gateway.url) as sdk:  # the SDK passes them; a job (txt2img_stream) gives the same image
            fields = {k: v for k, v in body.items() if k != "prompt"}
            assert sdk.generate(PROMPT, **fields).images[0].base64 == response.json()["images"][0]["base64"]
            streamed = sdk.wait_job(sdk.submit_job(PROMPT, **{**fields, "seed": 4}).id)  # not cached
            assert streamed.provenance["controlnets"][0]["name"] == "edges"
            pixels = np.asarray(Image.open(io.BytesIO(streamed.images[0].data)))
            assert np.array_equal(pixels, _ours(served, [{"name": "edges"}], [edges], seed=4)[0])
        models = http.get("/v1/models").json()["data"]
        assert sorted(c["name"] for c in models[0]["controlnets"]) == ["depth", "edges"]
        bad = http.post("/v1/generate", json={**body, "controlnets": [{**ref, "name": "pose"}]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "controlnets", bad.text
