"""LoRA adapters per request through Triton (issue 23): adapters of the pipeline's library applied by the
denoising loop's own engines (python-ort: the targeted initializers fed to a second session;
python-torch: functional_call), with no re-export and no reload, matching diffusers' load_lora_weights +
set_adapters; requests of different adapter sets in flight together each get their own images, and the
base stays the base."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.export import lora
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from sd_triton.gateway.process import GatewayProcess
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, free_port, triton_server
from tests.export.test_lora import write_adapter
from tests.gateway.test_playground import browser  # noqa: F401 - the fixture
from tests.integration.test_parity import MAX_ABS_DIFF, max_abs_diff

PROMPT = "a red circle on a blue background"
PARAMS = dict(height=64, width=64, steps=6, guidance_scale=7.5, scheduler="ddim", seed=3)
PIPELINES = ["", "torch"]  # python-ort engines (the default), python-torch engines


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("lora-serve")
    repo = work / "model_repository"
    run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR))
    torch_engines = {
        **dict.fromkeys(c.ENGINE_MODELS, "python-ort"),
        "unet": "python-torch",
        "text_encoder": "python-torch",
    }
    settings = RepositorySettings(pipeline="torch", engines=torch_engines)  # type: ignore[arg-type]
    run_export(ExportOptions("tiny", repo, settings=settings, work_dir=WORK_DIR))
    folder = Path(json.loads((repo / "manifest.json").read_text())["source"]["path"])
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    files = {
        "a": write_adapter(work / "a.safetensors", pipe, seed=5),
        "b": write_adapter(work / "b.safetensors", pipe, seed=6, kohya=True, alpha=8.0),
        "c": write_adapter(work / "c.safetensors", pipe, seed=7, rank=2),
    }
    with (
        triton_server(repo, work / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        served = {
            "client": client,
            "repo": repo,
            "folder": folder,
            "files": files,
            "grpc_url": server.grpc_url,
        }
        served["fresh_base"] = _ours(served, "", [])  # before any adapter is added or asked for
        for name in ("a", "b"):  # added while Triton serves: no reload
            for pipeline in PIPELINES:
                lora.add(repo, files[name], name, pipeline)
        yield served


@pytest.fixture(scope="module")
def gateway(served: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    log_file = tmp_path_factory.mktemp("lora-gateway") / "gateway.log"
    with GatewayProcess(served["grpc_url"], port=free_port(), log_file=log_file) as process:
        yield process


def _diffusers(served: dict, sets: list[tuple[str, float]]) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(served["folder"], safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if sets:
        for name, _ in sets:
            pipe.load_lora_weights(str(served["files"][name]), adapter_name=name)
        pipe.set_adapters([n for n, _ in sets], [s for _, s in sets])
    images = pipe(PROMPT, height=64, width=64, num_inference_steps=6, guidance_scale=7.5, output_type="np",
                  generator=[torch.Generator().manual_seed(3)]).images  # fmt: skip
    return (images * 255).round().astype(np.uint8)


def _ours(served: dict, pipeline: str, sets: list[tuple[str, float]]) -> np.ndarray:
    loras = [{"name": n, "scale": s} for n, s in sets]
    return txt2img(served["client"], PROMPT, pipeline=pipeline, loras=loras, **PARAMS).images


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_adapters_match_diffusers_load_lora_weights(served: dict, pipeline: str) -> None:
    """One adapter, and two at scales 0.7 and 1.3 (one kohya with an alpha): diffusers' images within
    2/255, each clearly not the base's."""
    base = _ours(served, pipeline, [])
    assert max_abs_diff(base, _diffusers(served, [])) <= MAX_ABS_DIFF
    for sets in ([("a", 1.0)], [("a", 0.7), ("b", 1.3)]):
        ours = _ours(served, pipeline, sets)
        assert max_abs_diff(ours, _diffusers(served, sets)) <= MAX_ABS_DIFF, sets
        assert max_abs_diff(ours, base) > 20, f"{sets} hardly changes the image"


def test_mixed_sets_in_flight_together_and_the_base_stays_the_base(served: dict) -> None:
    """The base and four adapter sets in flight together (one continuous batch): each gives what it gives
    alone; a base request after them is bit-identical to the one before and to the server's first, before
    any adapter; an adapter added while Triton serves is usable at once."""
    lora.add(served["repo"], served["files"]["c"], "c")
    sets: list[list[tuple[str, float]]] = [
        [],
        [("a", 1.0)],
        [("b", 0.5)],
        [("a", 0.5), ("b", 0.5)],
        [("c", 1.0)],
    ]
    before = _ours(served, "", [])
    alone = [_ours(served, "", s) for s in sets]
    with ThreadPoolExecutor(len(sets) * 2) as pool:
        together = list(pool.map(lambda s: _ours(served, "", s), sets * 2))
    for index, images in enumerate(together):
        assert max_abs_diff(images, alone[index % len(sets)]) <= 1, sets[index % len(sets)]
    assert np.array_equal(_ours(served, "", []), before)
    assert np.array_equal(before, served["fresh_base"])
    assert len({alone_images.tobytes() for alone_images in alone}) == len(sets)  # every set its own image


@pytest.mark.parametrize(
    ("loras", "words"),
    [
        ('[{"name": "nope"}]', "no adapter 'nope'"),
        ('[{"name": "a", "scale": 5}]', "scale must be from -4 to 4"),
        ('[{"name": "a"}, {"name": "a"}]', "named twice"),
        (json.dumps([{"name": "a"}] * 5), "at most 4 adapters"),
        ("{not json", "JSON"),
        ('{"name": "a"}', "JSON list"),
    ],
)
def test_bad_adapters_are_invalid_arg_naming_loras(served: dict, loras: str, words: str) -> None:
    from sd_triton.txt2img_client import infer_input, txt2img_inputs

    inputs = [
        *txt2img_inputs(PROMPT, **PARAMS),
        infer_input(c.LORAS, np.array([loras.encode()], dtype=object)),
    ]
    with pytest.raises(InferenceServerException, match="LORAS") as caught:
        served["client"].infer(c.TXT2IMG.name, inputs)
    assert words in str(caught.value) and "INVALID" in str(caught.value.status())
    assert txt2img(served["client"], PROMPT, **PARAMS).images.shape == (1, 64, 64, 3)  # still serving


def test_the_gateway_takes_loras(served: dict, gateway: GatewayProcess) -> None:
    """`loras` on /v1/generate and /v1/jobs: the images Triton gives directly, the adapters (with their
    files' sha256) in the provenance and the cache key; GET /v1/loras lists every model's; an adapter added
    a moment ago is found; an unknown adapter is a 422 naming `loras` at submission, as are too many and a
    scale out of range."""
    import base64
    import io

    import httpx
    from PIL import Image

    from sd_triton.sdk import Client
    from tests.load import job_events

    body = {"prompt": PROMPT, "steps": 6, "seed": 3, "scheduler": "ddim", "width": 64, "height": 64,
            "loras": [{"name": "a", "scale": 0.7}, {"name": "b", "scale": 1.3}]}  # fmt: skip
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        response = http.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["base64"]))))
        assert np.array_equal(image, _ours(served, "", [("a", 0.7), ("b", 1.3)])[0])
        shas = {r.name: r.sha256 for r in lora.listed(served["repo"])}
        assert response.json()["provenance"]["loras"] == [
            {**ref, "sha256": shas[ref["name"]]} for ref in body["loras"]
        ]
        assert http.post("/v1/generate", json=body).json()["cache"] == "hit"  # keyed by the adapters' files
        listing = http.get("/v1/loras").json()["data"]
        assert {(card["model"], card["name"]) for card in listing} >= {
            ("tiny", "a"),
            ("tiny", "b"),
            ("torch", "a"),
        }
        assert all(card["sha256"] == shas[card["name"]] for card in listing if card["model"] == "tiny")
        assert [c["name"] for c in http.get("/v1/loras", params={"model": "torch"}).json()["data"]] == [
            "a",
            "b",
        ]
        with Client(gateway.url) as sdk:  # the SDK passes `loras` and lists them
            via_sdk = sdk.generate(PROMPT, **{k: v for k, v in body.items() if k != "prompt"})
            assert via_sdk.images[0].base64 == response.json()["images"][0]["base64"]
            assert [card["name"] for card in sdk.loras(model="torch")] == ["a", "b"]
        job = http.post("/v1/jobs", json={**body, "seed": 4}).json()
        frames = [f["event"] for f in job_events(http, job["id"])]
        assert frames == ["queued"] + ["step"] * 6 + ["completed"], frames
        lora.add(
            served["repo"], served["files"]["c"], "fresh", "torch"
        )  # found at once: read again on a miss
        fresh = http.post("/v1/generate", json={**body, "model": "torch", "loras": [{"name": "fresh"}]})
        assert fresh.status_code == 200, fresh.text
        for loras, words in (
            ([{"name": "nope"}], "no adapter 'nope' in tiny's library (adapters: a, b"),
            ([{"name": "a"}] * 5, "at most 4"),
            ([{"name": "a", "scale": 4.5}], "less than or equal to 4"),
        ):
            bad = http.post("/v1/generate", json={**body, "loras": loras})
            assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("loras"), bad.text
            assert words in bad.json()["error"]["message"], bad.text
        assert http.get("/readyz").status_code == 200


def test_the_playground_sends_the_ticked_adapters(
    served: dict,
    gateway: GatewayProcess,
    browser: Any,  # noqa: F811 - the fixture
) -> None:
    """The page lists the chosen model's adapters, each with a scale; the ticked ones go in `loras`: the
    image shown is the one Triton gives for that set."""
    from selenium.webdriver.support.select import Select

    from tests.gateway.test_playground import Playground, decode

    page = Playground(browser, gateway.url).open()
    ticks = page.wait(
        lambda: page.driver.find_elements("css selector", "#adapter-list input[type=checkbox]"),
        10,
        "adapters",
    )
    assert {"a", "b"} <= {tick.get_attribute("data-name") for tick in ticks}
    page.el("lora-b").click()
    page.fill(
        prompt=PROMPT, width=64, height=64, steps=6, guidance_scale=7.5, seed=3, **{"lora-scale-b": 1.3}
    )
    Select(page.el("scheduler")).select_by_value("ddim")
    page.el("generate").click()
    page.wait(lambda: page.driver.find_elements("css selector", "#images img.result"), 120, "the image")
    shown = decode(page.driver.find_element("css selector", "#images img.result").get_attribute("src"))
    np.testing.assert_array_equal(shown, _ours(served, "", [("b", 1.3)])[0])
    assert not [e for e in page.console() if e["level"] == "SEVERE"]
