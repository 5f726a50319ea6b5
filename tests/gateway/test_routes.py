"""Every route over real HTTP against the real gateway and Triton."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from sd_triton.txt2img_client import txt2img

FAST = {"steps": 4, "width": 64, "height": 48}


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_generate(http: httpx.Client) -> None:
    response = http.post("/v1/generate", json={"prompt": "a red fox", **FAST, "seed": 11, "num_images": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [i["seed"] for i in body["images"]] == [11, 12]
    for item in body["images"]:
        image = decode(item["base64"])
        assert image.format == "PNG" and image.size == (64, 48) == (item["width"], item["height"])
        assert item["content_type"] == "image/png"
    timings = body["timings"]
    assert timings["total_ms"] >= timings["inference_ms"] > 0
    assert body["provenance"]["model"] == "tiny"
    unet = body["provenance"]["components"]["unet"]
    assert (unet["engine"], unet["precision"], unet["version"]) == ("python-ort", "fp32", 1)
    assert len(unet["sha256"]) == 64 and body["provenance"]["unet_engines"] == [unet]  # from Triton
    assert body["truncation"] == [{"prompt_tokens_cut": 0, "negative_prompt_tokens_cut": 0}]


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(http: httpx.Client, fmt: str, pil_format: str) -> None:
    body = http.post("/v1/generate", json={"prompt": "a boat", **FAST, "output_format": fmt}).json()
    item = body["images"][0]
    assert item["content_type"] == f"image/{fmt}"
    assert decode(item["base64"]).format == pil_format


def test_defaults_native_size_and_drawn_seed_reproduces(http: httpx.Client) -> None:
    first = http.post("/v1/generate", json={"prompt": "a tree", "steps": 3}).json()["images"][0]
    assert (first["width"], first["height"]) == (64, 64)  # the tiny model's native size
    again = http.post("/v1/generate", json={"prompt": "a tree", "steps": 3, "seed": first["seed"]}).json()
    assert again["images"][0]["base64"] == first["base64"]


def test_pixel_identical_to_direct_triton(http: httpx.Client, client) -> None:
    params = {
        "height": 56,
        "width": 88,
        "steps": 6,
        "guidance_scale": 6.0,
        "seed": 321,
        "scheduler": "dpmpp_2m",
    }
    body = http.post(
        "/v1/generate", json={"prompt": "a castle", "negative_prompt": "fog", "num_images": 2, **params}
    ).json()
    direct = txt2img(client, "a castle", negative_prompt="fog", num_images=2, **params).images
    via_gateway = np.stack([np.asarray(decode(i["base64"])) for i in body["images"]])
    np.testing.assert_array_equal(via_gateway, direct)


def test_batch_in_prompt_order(http: httpx.Client) -> None:
    prompts = ["a red fox", "a blue whale", "a green frog"]
    body = http.post(
        "/v1/generate/batch", json={"prompts": prompts, **FAST, "seed": 100, "num_images": 2}
    ).json()
    images = body["images"]
    assert [i["prompt_index"] for i in images] == [0, 0, 1, 1, 2, 2]
    assert [i["seed"] for i in images] == [100, 101, 102, 103, 104, 105]
    assert len(body["truncation"]) == 3
    for item in images:  # each equals the single generation of its prompt and seed
        single = http.post(
            "/v1/generate", json={"prompt": prompts[item["prompt_index"]], **FAST, "seed": item["seed"]}
        ).json()
        assert single["images"][0]["base64"] == item["base64"]


def test_openai_client(gateway) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    result = client.images.generate(prompt="a lighthouse", n=2, size="64x48", response_format="b64_json")
    assert len(result.data) == 2
    assert all(decode(item.b64_json).size == (64, 48) for item in result.data)
    with pytest.raises(openai.BadRequestError) as info:  # 4xx answers raise the client's own errors
        client.images.generate(prompt="a lighthouse", size="65x48")
    assert "size" in str(info.value)


def test_openai_client_edits(gateway) -> None:
    """`images.edit` of the official client against the real stack: with a mask (inpainting) and
    without (image-to-image), images of the asked size."""
    openai = pytest.importorskip("openai")
    from tests.gateway.test_openai_edits import png, rgba

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    picture, mask = png(rgba(48, 40)[..., :3]), png(rgba(48, 40, (slice(0, 20), slice(None))))
    edited = client.images.edit(
        image=("in.png", picture), mask=("m.png", mask), prompt="a fox", n=2, size="64x48"
    )
    assert [decode(item.b64_json).size for item in edited.data] == [(64, 48)] * 2
    redrawn = client.images.edit(image=("in.png", picture), prompt="a fox")
    assert decode(redrawn.data[0].b64_json).size == (48, 40)


def test_openai_url_format(http: httpx.Client) -> None:  # more in test_storage.py
    response = http.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert item["b64_json"] is None and http.get(item["url"]).headers["content-type"] == "image/png"
    bad = http.post("/v1/images/generations", json={"prompt": "x", "response_format": "png"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics(http: httpx.Client) -> None:
    http.post("/v1/generate", json={"prompt": "a cat", **FAST})
    http.post("/v1/generate", json={"prompt": "a cat", "steps": 0})
    text = http.get("/metrics").text
    assert 'gateway_requests_total{route="/v1/generate",status="200"}' in text
    assert 'gateway_requests_total{route="/v1/generate",status="422"}' in text
    assert 'gateway_request_seconds_bucket{le="0.5",route="/v1/generate"}' in text
    assert "gateway_images_generated_total" in text
    assert "gateway_in_flight_requests" in text


def test_openapi_complete(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    routes = {
        "/v1/generate",
        "/v1/generate/batch",
        "/v1/images/generations",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert routes <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for name in (
        "GenerateRequest",
        "BatchRequest",
        "OpenAIImageRequest",
        "GenerateResponse",
        "ErrorResponse",
    ):
        assert name in schemas
    for name in ("GenerateRequest", "BatchRequest", "OpenAIImageRequest"):
        assert schemas[name].get("examples"), name
    for path in ("/v1/generate", "/v1/generate/batch", "/v1/images/generations"):
        assert {"422" if "images" not in path else "400", "503"} <= set(
            spec["paths"][path]["post"]["responses"]
        )
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_no_scheduler_field_runs_the_checkpoints_own_and_provenance_names_it(http: httpx.Client) -> None:
    """No `scheduler`: the tiny checkpoint's PNDMScheduler with its config as shipped, which is what
    `pndm` builds too (no options on top) and not what `euler_karras` builds."""
    body = {"prompt": "a lighthouse", **FAST, "seed": 21}
    own = http.post("/v1/generate", json=body, headers={"Cache-Control": "no-cache"}).json()
    assert own["provenance"]["scheduler"] == {"name": "default", "class_name": "PNDMScheduler"}
    pndm = http.post("/v1/generate", json={**body, "scheduler": "pndm"}).json()
    assert pndm["provenance"]["scheduler"] == {"name": "pndm", "class_name": "PNDMScheduler"}
    assert pndm["images"][0]["base64"] == own["images"][0]["base64"]
    karras = http.post("/v1/generate", json={**body, "scheduler": "euler_karras"}).json()
    assert karras["provenance"]["scheduler"] == {
        "name": "euler_karras",
        "class_name": "EulerDiscreteScheduler",
    }
    assert karras["images"][0]["base64"] != own["images"][0]["base64"]
