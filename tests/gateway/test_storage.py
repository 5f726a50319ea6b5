"""Images as URLs: local storage behind signed links (in-process, over the in-memory Triton), and an
S3-compatible store (moto_server, an S3 emulator from PyPI, run here on a free port) behind presigned
URLs, over real HTTP."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient

from sd_triton.gateway.process import GatewayProcess
from sd_triton.gateway.storage import UrlSigner
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port
from tests.gateway.inprocess import gateway_client

FAST = {"steps": 3, "width": 64, "height": 48}
SECRET = "test-signing-secret"
TTL_S = 4.0


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture
def local_gateway(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """In-process (tests/gateway/inprocess.py): storage and links are the gateway's own logic."""
    images = tmp_path / "images"
    settings = {
        "storage_dir": str(images),
        "storage_ttl_s": TTL_S,
        "storage_cleanup_interval_s": 0.5,
        "url_signing_secret": SECRET,
    }
    with gateway_client(**settings) as client:
        yield client, images


def test_local_urls(local_gateway: tuple[TestClient, Path]) -> None:
    http, images_dir = local_gateway
    body = {"prompt": "a lighthouse", **FAST, "seed": 5, "num_images": 2, "output_format": "webp"}
    # links are fetched through the same client (open mode: no API key to leave out)
    inline = http.post("/v1/generate", json=body).json()["images"]
    linked = http.post("/v1/generate", json={**body, "response_format": "url"})
    assert linked.status_code == 200, linked.text
    items = linked.json()["images"]
    assert [i["seed"] for i in items] == [5, 6] and all(i["base64"] is None for i in items)
    assert len(list(images_dir.glob("*.webp"))) == 2

    # 1. Each link (no API key, a fresh client) gives the same bytes as base64 did, typed right.
    for item, expected in zip(items, inline, strict=True):
        assert item["url"].startswith(str(http.base_url) + "/v1/images/")
        fetched = http.get(item["url"])
        assert fetched.status_code == 200, fetched.text
        assert fetched.content == base64.b64decode(expected["base64"])
        assert fetched.headers["content-type"] == "image/webp" == item["content_type"]

    # 2. Altered links: 403 for a wrong or missing signature, also for a pushed-out expiry.
    url = items[0]["url"]
    signature = parse_qs(urlsplit(url).query)["signature"][0]
    tampered = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    for bad in (
        with_query(url, signature=tampered),
        with_query(url, expires=str(int(time.time()) + 10**6)),
        url.split("?")[0],
    ):
        response = http.get(bad)
        assert response.status_code == 403, bad
        assert response.json()["error"]["type"] == "forbidden"
    # a correctly signed link to an image that does not exist: 404
    name, expires = "A" * 22 + ".png", int(time.time()) + 60
    signature = UrlSigner(SECRET.encode()).sign(name, expires)
    unknown = f"{http.base_url}/v1/images/{name}?expires={expires}&signature={signature}"
    assert http.get(unknown).status_code == 404

    # 3. Batch and the OpenAI route hand out links too.
    batch = http.post(
        "/v1/generate/batch", json={"prompts": ["a fox", "a hen"], **FAST, "response_format": "url"}
    ).json()
    assert [http.get(i["url"]).status_code for i in batch["images"]] == [200, 200]
    openai = http.post(
        "/v1/images/generations", json={"prompt": "a fox", "size": "64x48", "response_format": "url"}
    )
    assert openai.status_code == 200, openai.text
    data = openai.json()["data"]
    assert data[0]["b64_json"] is None and http.get(data[0]["url"]).headers["content-type"] == "image/png"

    # 4. Past the TTL: the link answers 404 and the cleanup task has deleted every file.
    time.sleep(TTL_S + 1.0)
    expired = http.get(url)  # "expired", or "no such image" if the sweep came first
    assert expired.status_code == 404, expired.text
    assert expired.json()["error"]["type"] == "not_found"
    deadline = time.monotonic() + 5
    while list(images_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(images_dir.iterdir()) == []


def test_openai_client_url_format(local_gateway: tuple[TestClient, Path]) -> None:
    openai = pytest.importorskip("openai")
    http, _ = local_gateway
    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http)
    result = client.images.generate(prompt="a lighthouse", n=1, size="64x48", response_format="url")
    assert result.data[0].url is not None and result.data[0].b64_json is None
    assert http.get(result.data[0].url).headers["content-type"] == "image/png"


# --- S3, against moto_server (an S3 emulator) over real HTTP ---


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if binary is None:
        pytest.fail("moto_server not installed: pip install -e '.[dev]' (moto[server])")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
    yield url
    process.terminate()
    process.wait(timeout=10)


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def test_s3_presigned_urls_and_expiry(triton: TritonServer, s3_endpoint: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    s3.create_bucket(Bucket="images")
    env = {
        **AWS_ENV,
        "SD_GATEWAY_S3_BUCKET": "images",
        "SD_GATEWAY_S3_ENDPOINT_URL": s3_endpoint,
        "SD_GATEWAY_S3_REGION": "us-east-1",
        "SD_GATEWAY_S3_PREFIX": "generated/",
        "SD_GATEWAY_STORAGE_TTL_S": str(TTL_S),
        "SD_GATEWAY_STORAGE_CLEANUP_INTERVAL_S": "0.5",
    }
    gateway = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "gw.log", env=env)
    body = {"prompt": "a harbour", **FAST, "seed": 9, "output_format": "jpeg"}
    with gateway, httpx.Client(base_url=gateway.url, timeout=60) as http:
        inline = http.post("/v1/generate", json=body).json()["images"][0]
        response = http.post("/v1/generate", json={**body, "response_format": "url"})
        assert response.status_code == 200, gateway.log_tail()
        url = response.json()["images"][0]["url"]
        assert url.startswith(s3_endpoint + "/images/generated/") and "X-Amz-Signature=" in url

        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="images").get("Contents", [])]
        assert len(keys) == 1 and keys[0].startswith("generated/") and keys[0].endswith(".jpeg")
        fetched = httpx.get(url)
        assert fetched.status_code == 200
        assert fetched.content == base64.b64decode(inline["base64"])
        assert fetched.headers["content-type"] == "image/jpeg"
        # the gateway's own image route serves local files only
        name = keys[0].removeprefix("generated/")
        assert http.get(f"/v1/images/{name}").status_code == 404

        # the cleanup task deletes objects older than the TTL (what it tracks: the prefix)
        deadline = time.monotonic() + TTL_S + 6
        while s3.list_objects_v2(Bucket="images").get("KeyCount", 0) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert s3.list_objects_v2(Bucket="images").get("KeyCount", 0) == 0


def test_s3_unreachable_is_a_clear_502(triton: TritonServer, tmp_path: Path) -> None:
    env = {
        **AWS_ENV,
        "SD_GATEWAY_S3_BUCKET": "images",
        "SD_GATEWAY_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    }
    gateway = GatewayProcess(triton.grpc_url, port=free_port(), log_file=tmp_path / "gw.log", env=env)
    with gateway, httpx.Client(base_url=gateway.url, timeout=60) as http:
        response = http.post("/v1/generate", json={"prompt": "x", **FAST, "response_format": "url"})
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["type"] == "storage_error" and "images" in error["message"]


def test_signer() -> None:
    signer = UrlSigner(b"k")
    signature = signer.sign("a.png", 100)
    assert signer.verify("a.png", 100, signature)
    assert not signer.verify("a.png", 101, signature)
    assert not signer.verify("b.png", 100, signature)
    assert not UrlSigner(b"other").verify("a.png", 100, signature)
