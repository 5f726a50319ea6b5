"""Parts of the attack surface (issue 10), over real HTTP to the real gateway: stored-image paths cannot
leave the storage folder, and cross-origin requests get no CORS grant (CORS is off by default)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

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
