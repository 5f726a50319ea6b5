"""Parts of the attack surface (issue 10), over real HTTP to the real gateway: stored-image paths cannot
leave the storage folder, cross-origin requests get no CORS grant (CORS is off by default), and secrets
never reach the log."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from sd_triton.gateway.access.keys import create_key, parse_token
from sd_triton.gateway.process import GatewayProcess
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port
from tests.gateway.access_support import bearer

ROOT = Path(__file__).resolve().parents[2]
SECRET_FILE_TEXT = (ROOT / "pyproject.toml").read_text()[:40]  # a file a traversal would try to read


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/..%2F..%2F..%2Fpyproject.toml",
        "/v1/images/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/v1/images/..%252F..%252Fpyproject.toml",
        "/v1/images/....%2F%2F....%2F%2Fetc%2Fpasswd",
        "/v1/images/%2Fetc%2Fpasswd",
        "/v1/images/..%5C..%5Cpyproject.toml",
        "/v1/images/.AAAAAAAAAAAAAAAAAAAAAA.png.partial",
        "/v1/images/AAAAAAAAAAAAAAAAAAAAAA.png%00.txt",
        "/v1/images/..%2F..%2F..%2Fpyproject.toml?expires=9999999999&signature=00",
    ],
)
def test_stored_image_paths_cannot_escape_the_folder(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code in (400, 403, 404, 422), (path, response.status_code)
    assert SECRET_FILE_TEXT not in response.text and "root:" not in response.text
    assert response.headers["content-type"].startswith("application/json")  # an error body, never a file


def test_a_stored_image_is_served_by_its_signed_link(http: httpx.Client) -> None:
    """The route itself works (so the refusals above are about the paths, not a dead route)."""
    body = {
        "prompt": "a small boat",
        "steps": 2,
        "width": 32,
        "height": 32,
        "seed": 3,
        "response_format": "url",
    }
    response = http.post("/v1/generate", json=body, headers={"Cache-Control": "no-cache"})
    assert response.status_code == 200, response.text
    url = response.json()["images"][0]["url"]
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")


def test_cross_origin_requests_get_no_cors_grant(http: httpx.Client) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = http.options("/v1/generate", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = http.get("/healthz", headers=origin)
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_secrets_never_reach_the_log(triton: TritonServer, tmp_path: Path) -> None:
    """API keys (right and wrong), webhook secrets, the URL-signing secret and a Redis password do not
    appear in the gateway's log, even on the paths that log errors (a refused key, a Redis that is
    down, webhooks that fail, a body rejected)."""
    keys_file = tmp_path / "keys.json"
    created = create_key(keys_file, "team a")
    key_id, secret = parse_token(created.token)  # type: ignore[misc]
    wrong = f"sdk_{key_id}_{'x' * len(secret)}"
    secrets_ = {
        "token": created.token,
        "key secret": secret,
        "key webhook secret": created.key.webhook_secret,
        "wrong token": wrong,
        "signing secret": "sign-" + os.urandom(12).hex(),
        "redis password": "pw-" + os.urandom(12).hex(),
    }
    env = {
        "SD_GATEWAY_KEYS_FILE": str(keys_file),
        "SD_GATEWAY_URL_SIGNING_SECRET": secrets_["signing secret"],
        "SD_TRITON_REDIS_URL": f"redis://:{secrets_['redis password']}@127.0.0.1:{free_port()}/0",  # down
        "SD_GATEWAY_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    log_file = tmp_path / "gateway.log"
    with (
        GatewayProcess(triton.grpc_url, port=free_port(), log_file=log_file, env=env) as gateway,
        httpx.Client(base_url=gateway.url, timeout=60) as http,
    ):
        good, bad = bearer(created.token), bearer(wrong)
        cheap = {"prompt": "a key", "steps": 1, "width": 32, "height": 32, "response_format": "url"}
        generated = http.post("/v1/generate", json=cheap, headers=good)
        assert generated.status_code == 200, generated.text
        assert http.post("/v1/generate", json=cheap, headers=bad).status_code == 401
        assert http.post("/v1/generate", json={**cheap, "steps": -1}, headers=good).status_code == 422
        job = {**cheap, "webhook_url": f"http://127.0.0.1:{free_port()}/hook"}  # nobody listens there
        refused = http.post("/v1/jobs", json=job, headers=good)  # Redis is down: 503 naming it
        assert refused.status_code == 503 and secrets_["redis password"] not in refused.text
        assert "***" in refused.text  # the URL is there, its password masked
        assert http.get(generated.json()["images"][0]["url"].replace(gateway.url, "")).status_code == 200
    text = log_file.read_text()
    assert "401" in text and "503" in text  # the error paths ran and were logged
    leaked = [name for name, value in secrets_.items() if value in text]
    assert not leaked, f"in the gateway log: {leaked}"
