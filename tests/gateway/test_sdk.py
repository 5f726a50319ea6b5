"""The Python SDK, sync and async, against the real gateway."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sd_triton.sdk import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    InternalServerError,
    JobFailedError,
    RateLimitError,
    SDTritonError,
    ServiceUnavailableError,
    _raise_for,
    decode_image,
    to_pil,
)
from tests.conftest import free_port

FAST = {"steps": 3, "width": 64, "height": 48, "scheduler": "ddim"}  # ddim: one UNet call per step


def test_sync_client(gateway) -> None:
    with Client(gateway.url) as client:
        result = client.generate("a fox", seed=5, num_images=2, **FAST)
        assert [image.seed for image in result.images] == [5, 6]
        assert result.images[0].to_pil().size == (64, 48)
        assert decode_image(result.images[0].base64).startswith(b"\x89PNG")
        assert to_pil(result.images[1].base64).size == (64, 48)
        batch = client.generate_batch(["a fox", "a hen"], seed=5, **FAST)
        assert [image.prompt_index for image in batch.images] == [0, 1]
        assert batch.images[0].base64 == result.images[0].base64
        assert result.provenance["model"] == "tiny" and result.timings["total_ms"] > 0
        assert result.cache in ("miss", "hit")  # seeded: cached after the first run of this test
        assert client.generate("a fox", seed=5, num_images=2, **FAST).cache == "hit"


def test_async_client(gateway) -> None:
    async def run() -> list[int]:
        async with AsyncClient(gateway.url) as client:
            results = await asyncio.gather(*(client.generate("a fox", seed=s, **FAST) for s in (1, 2, 3)))
            return [r.images[0].seed for r in results]

    assert asyncio.run(run()) == [1, 2, 3]


def test_typed_errors(gateway) -> None:
    with Client(gateway.url) as client:
        with pytest.raises(BadRequestError) as info:
            client.generate("a fox", steps=0)
        assert info.value.status == 422 and info.value.field == "steps"
    with Client(f"http://127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(ServiceUnavailableError):
            nowhere.generate("a fox")


def test_generate_command(gateway, tmp_path) -> None:
    from sd_triton.cli import main

    out = tmp_path / "fox.png"
    args = ["generate", "a fox", "-o", str(out), "--gateway-url", gateway.url, "--steps", "3", "--seed", "9"]
    code = main([*args, "--width", "64", "--height", "48"])
    assert code == 0
    assert to_pil_from_file(out) == (64, 48)


def test_image_to_image_from_a_path_bytes_a_pil_image_or_base64(gateway, tmp_path) -> None:
    """Every form of `image` the SDK takes sends the same pixels: the same images come back; the
    command's --image and --strength too."""
    import base64

    import numpy as np
    from PIL import Image

    from sd_triton.cli import main

    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    forms = [
        path,
        str(path),
        path.read_bytes(),
        Image.open(path),
        base64.b64encode(path.read_bytes()).decode(),
    ]
    with Client(gateway.url) as client:
        params = {"steps": 4, "seed": 3, "strength": 0.5, "scheduler": "ddim"}
        results = [client.generate("a fox", image=form, **params) for form in forms]
        text_only = client.generate("a fox", steps=4, seed=3, scheduler="ddim", width=64, height=48)
    assert len({r.images[0].base64 for r in results}) == 1
    assert results[0].provenance["mode"] == "image-to-image"
    assert results[0].images[0].base64 != text_only.images[0].base64
    out = tmp_path / "fox.png"
    args = ["generate", "a fox", "-o", str(out), "--gateway-url", gateway.url, "--image", str(path)]
    assert main([*args, "--strength", "0.5", "--steps", "4", "--seed", "3", "--scheduler", "ddim"]) == 0
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(results[0].images[0].to_pil()))
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(64) < 32, 0, 255).astype(np.uint8)[None].repeat(48, 0)).save(mask)
    assert main([*args, "--mask", str(mask), "--steps", "4", "--seed", "3", "--scheduler", "ddim"]) == 0
    with Client(gateway.url) as client:
        inpainted = client.generate(
            "a fox", image=path, mask=Image.open(mask), steps=4, seed=3, scheduler="ddim"
        )
    assert inpainted.provenance["mode"] == "inpainting"
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(inpainted.images[0].to_pil()))


def to_pil_from_file(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_jobs_sync_and_async(gateway) -> None:
    with Client(gateway.url) as client:
        job = client.submit_job("a fox on a job", seed=9, preview=True, **FAST)
        assert job.status == "queued" and job.id.startswith("job_")
        events = list(client.job_events(job.id))
        assert [e.event for e in events] == ["queued", "step", "step", "step", "completed"]
        assert [e.data["step"] for e in events[1:-1]] == [1, 2, 3] and events[1].data["preview"]
        result = events[-1].generation()
        assert result.images[0].seed == 9 and result.images[0].to_pil().size == (64, 48)
        assert client.wait_job(job.id).images[0].base64 == result.images[0].base64  # replayed
        assert client.get_job(job.id).status == "completed"
        long = client.submit_job("a fox", steps=150, width=32, height=32)
        assert client.cancel_job(long.id).status == "cancelled"
        with pytest.raises(JobFailedError) as info:
            client.wait_job(long.id)
        assert info.value.job_status == "cancelled" and info.value.job_id == long.id
        assert f"job {long.id} cancelled: cancelled by a client (DELETE /v1/jobs/{long.id})" == str(
            info.value
        )
        assert info.value.type == "cancelled" and isinstance(info.value, APIError)
        with pytest.raises(BadRequestError) as missing:
            client.get_job("job_nope")
        assert missing.value.status == 404

    async def run() -> tuple[list[str], int]:
        async with AsyncClient(gateway.url) as client:
            job = await client.submit_job("a hen on a job", seed=3, **FAST)
            names = [e.event async for e in client.job_events(job.id)]
            return names, (await client.wait_job(job.id)).images[0].seed

    assert asyncio.run(run()) == (["queued", "step", "step", "step", "completed"], 3)


def test_overloaded_is_retryable_and_rate_limits_are_not() -> None:
    """429 `overloaded` (every Triton endpoint full) is the servers' state, like a 503; a key's own
    rate limit is the caller's."""
    full = {"error": {"type": "overloaded", "message": "overloaded: ... (triton_max_in_flight)"}}
    with pytest.raises(ServiceUnavailableError) as raised:
        _raise_for(httpx.Response(429, json=full, headers={"Retry-After": "5"}))
    assert raised.value.status == 429 and raised.value.retry_after == 5.0
    limited = {"error": {"type": "rate_limited", "message": "rate limit: 5 per minute"}}
    with pytest.raises(RateLimitError) as refused:
        _raise_for(httpx.Response(429, json=limited, headers={"Retry-After": "7"}))
    assert (refused.value.type, refused.value.retry_after) == ("rate_limited", 7.0)
    assert not isinstance(refused.value, ServiceUnavailableError)


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (401, "unauthorized", AuthenticationError),
        (400, "content_policy", BadRequestError),
        (404, "not_found", BadRequestError),
        (422, "invalid_request", BadRequestError),
        (429, "quota_exceeded", RateLimitError),
        (429, "concurrency_limited", RateLimitError),
        (502, "triton_error", InternalServerError),
        (504, "timeout", InternalServerError),
        (503, "backend_unavailable", ServiceUnavailableError),
    ],
)
def test_one_error_hierarchy_under_api_error(status: int, kind: str, expected: type[APIError]) -> None:
    body = {"error": {"type": kind, "message": f"{kind}: what went wrong", "field": "prompt"}}
    with pytest.raises(expected) as raised:
        _raise_for(httpx.Response(status, json=body))
    assert isinstance(raised.value, APIError) and raised.value.status == status
    assert raised.value.type == kind and raised.value.message == f"{kind}: what went wrong"
    assert SDTritonError is APIError  # the former base name still catches everything
