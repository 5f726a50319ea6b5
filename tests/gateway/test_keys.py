"""API keys: the registry file, the `sd-triton keys` command, and authentication by the gateway in-process
(open without keys; a key created or revoked while it runs applies)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sd_triton.gateway.access.keys import KeyRegistry, create_key, parse_token, read_key_file, revoke_key
from sd_triton.gateway.errors import UnauthorizedError
from tests.gateway.access_support import CHEAP, bearer, sample
from tests.gateway.inprocess import gateway_client

# --- the registry ---


def test_created_key_is_stored_hashed_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys.json"
    created = create_key(path, "team a", rate_limit_per_min=5, block_words=["kale"])
    key_id, secret = parse_token(created.token)  # type: ignore[misc]
    assert created.token == f"sdk_{key_id}_{secret}" and key_id == created.key.id
    text = path.read_text()
    assert secret not in text and created.token not in text  # only the hash is stored
    record = json.loads(text)["keys"][0]
    assert record["hash"].startswith("sha256:") and len(record["hash"]) == len("sha256:") + 64
    assert record["webhook_secret"] == created.key.webhook_secret  # stored as is: it signs webhooks
    assert (record["rate_limit_per_min"], record["images_per_day"], record["max_concurrency"]) == (
        5,
        None,
        None,
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no leftovers


def test_authenticate_accepts_only_the_right_live_token(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = create_key(path, "a")
    other = create_key(path, "b")
    registry = KeyRegistry(path)
    assert registry.authenticate(created.token).id == created.key.id
    assert registry.webhook_secret(other.key.id) == other.key.webhook_secret
    wrong_secret = f"sdk_{created.key.id}_{parse_token(other.token)[1]}"  # type: ignore[index]
    for token, message in (
        (None, "missing API key"),
        ("", "missing API key"),
        ("not-a-token", "invalid API key"),
        ("sdk_ffffffffffff_nope", "invalid API key"),
        (wrong_secret, "invalid API key"),
    ):
        with pytest.raises(UnauthorizedError, match=message) as info:
            registry.authenticate(token)
        assert info.value.status == 401 and info.value.headers["WWW-Authenticate"] == "Bearer"
    revoke_key(path, created.key.id)
    registry = KeyRegistry(path)
    with pytest.raises(UnauthorizedError, match=f"API key {created.key.id} was revoked at"):
        registry.authenticate(created.token)
    assert not registry.open  # revoked keys still close the gateway


def test_registry_notices_file_changes_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    registry = KeyRegistry(path)
    assert registry.open
    created = create_key(path, "a")
    registry.refresh()  # within a second of the last look: not re-read yet
    assert registry.open
    time.sleep(1.05)
    registry.refresh()
    assert not registry.open and registry.authenticate(created.token).id == created.key.id


def test_bad_files_and_bad_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    with pytest.raises(ValueError, match=r"block_regexes\[0\]: invalid regex '\('"):
        create_key(path, "a", block_regexes=["("])
    assert not path.exists()  # nothing written
    with pytest.raises(ValueError, match="rate_limit_per_min: Input should be greater than or equal to 1"):
        create_key(path, "a", rate_limit_per_min=0)
    with pytest.raises(ValueError, match="'nope': no such key"):
        revoke_key(path, "nope")
    path.write_text('{"version": 1, "keys": [{"id": "abcdef"}]}')
    with pytest.raises(ValueError, match=f"keys file {path}: keys.0.name: Field required"):
        read_key_file(path)
    with pytest.raises(ValueError, match="keys file"):
        KeyRegistry(path)  # the gateway refuses to start on it rather than run open


# --- the command ---


def sd_triton(*args: str, keys_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sd_triton.cli", "keys", "--keys-file", str(keys_file), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def created_fields(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.strip().splitlines())


def test_cli_create_list_revoke(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    done = sd_triton(
        "create", "--name", "ci bot", "--rate-limit", "30", "--images-per-day", "500", "--concurrency", "2",
        "--block-word", "kale", "beet", "--block-regex", r"^draw", keys_file=path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = created_fields(done.stdout)
    assert shown["token"].startswith(f"sdk_{shown['id']}_") and shown["webhook_secret"].startswith("whsec_")
    record = json.loads(path.read_text())["keys"][0]
    assert shown["token"] not in path.read_text()
    assert record["block_words"] == ["kale", "beet"] and record["block_regexes"] == ["^draw"]
    assert (record["rate_limit_per_min"], record["images_per_day"], record["max_concurrency"]) == (30, 500, 2)

    listed = sd_triton("list", keys_file=path)
    assert listed.returncode == 0, listed.stderr
    assert shown["id"] in listed.stdout and "ci bot" in listed.stdout
    for secret in (shown["token"], shown["webhook_secret"], record["hash"], parse_token(shown["token"])[1]):  # type: ignore[index]
        assert secret not in listed.stdout + listed.stderr

    revoked = sd_triton("revoke", shown["id"], keys_file=path)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(path.read_text())["keys"][0]["revoked_at"] is not None
    assert f"key {shown['id']} (ci bot) revoked at" in revoked.stderr


def test_cli_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    zero = sd_triton("create", "--name", "x", "--rate-limit", "0", keys_file=path)
    assert zero.returncode == 2 and "--rate-limit: must be at least 1, got 0" in zero.stderr
    bad = sd_triton("create", "--name", "x", "--block-regex", "[a-", keys_file=path)
    assert bad.returncode == 2 and "invalid regex '[a-'" in bad.stderr
    unknown = sd_triton("revoke", "0123456789ab", keys_file=path)
    assert unknown.returncode == 2 and "'0123456789ab': no such key" in unknown.stderr
    assert not path.exists()
    # the keys file also comes from SD_GATEWAY_KEYS_FILE
    env = {**os.environ, "SD_GATEWAY_KEYS_FILE": str(path)}
    done = subprocess.run(
        [sys.executable, "-m", "sd_triton.cli", "keys", "create", "--name", "env"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert read_key_file(path).keys[0].name == "env"


# --- over HTTP ---


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not {what} within {timeout_s} s")


def test_open_without_keys_until_one_is_created(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"  # no file: no keys
    with caplog.at_level(logging.WARNING), gateway_client(keys_file=str(path)) as http:
        # 1. Open: served without a key, and the log says so.
        response = http.post("/v1/generate", json={"prompt": "a fox", **CHEAP})
        assert response.status_code == 200, response.text
        assert "X-RateLimit-Limit" not in response.headers
        assert any(r.levelname == "WARNING" and "runs OPEN" in r.getMessage() for r in caplog.records)

        # 2. A key created while it runs closes it, without a restart.
        created = sd_triton("create", "--name", "first", keys_file=path)
        assert created.returncode == 0, created.stderr
        token = created_fields(created.stdout)["token"]
        wait_for(lambda: http.post("/v1/generate", json={"prompt": "x"}).status_code == 401, "closed")
        response = http.post("/v1/generate", json={"prompt": "a fox", **CHEAP}, headers=bearer(token))
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    live, doomed = create_key(path, "live"), create_key(path, "doomed")
    with gateway_client(keys_file=str(path)) as http:
        yield {"http": http, "path": path, "live": live, "doomed": doomed}


def assert_401(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "unauthorized" and message in error["message"], error


def test_missing_and_bad_keys_are_401(keyed: dict) -> None:
    http = keyed["http"]
    before = sample(http, "gateway_rejections_total", reason="auth")
    body = {"prompt": "a fox", **CHEAP}
    assert_401(http.post("/v1/generate", json=body), "missing API key")
    assert_401(http.post("/v1/generate/batch", json={"prompts": ["a"]}), "missing API key")
    assert_401(http.post("/v1/images/generations", json={"prompt": "a"}), "missing API key")
    assert_401(http.post("/v1/generate", json=body, headers=bearer("sdk_abc_def")), "invalid API key")
    assert_401(http.post("/v1/generate", json=body, headers={"X-API-Key": "junk"}), "invalid API key")
    wrong = keyed["live"].token[:-3] + "xyz"
    assert_401(http.post("/v1/generate", json=body, headers=bearer(wrong)), "invalid API key")
    assert_401(
        http.post("/v1/generate", json=body, headers={"Authorization": "Basic abc"}), "missing API key"
    )
    assert sample(http, "gateway_rejections_total", reason="auth") == before + 7
    assert sample(http, "gateway_requests_total", route="/v1/generate", status="401") >= 5


def test_both_headers_carry_a_key(keyed: dict) -> None:
    http, token = keyed["http"], keyed["live"].token
    body = {"prompt": "a fox", **CHEAP}
    assert http.post("/v1/generate", json=body, headers=bearer(token)).status_code == 200
    assert http.post("/v1/generate", json=body, headers={"X-API-Key": token}).status_code == 200
    # a bad body with a good key: past authentication, the body's own error
    response = http.post("/v1/generate", json={"prompt": "a fox", "steps": 0}, headers={"X-API-Key": token})
    assert response.status_code == 422 and response.json()["error"]["field"] == "steps"


def test_public_routes_need_no_key(keyed: dict) -> None:
    http = keyed["http"]
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert http.get(path).status_code == 200, path
    for path in ("/", "/static/app.js", "/v1/images/0123456789abcdef.png"):  # others' routes: any but 401
        assert http.get(path).status_code != 401, path


def test_revoked_key_is_refused_without_restart(keyed: dict) -> None:
    http, doomed = keyed["http"], keyed["doomed"]
    body = {"prompt": "a fox", "steps": 0}  # 422 when authenticated: no Triton work needed
    assert http.post("/v1/generate", json=body, headers=bearer(doomed.token)).status_code == 422
    done = sd_triton("revoke", doomed.key.id, keys_file=keyed["path"])
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    wait_for(
        lambda: http.post("/v1/generate", json=body, headers=bearer(doomed.token)).status_code == 401,
        "revoked",
    )
    assert time.monotonic() - started < 2.5  # the file's mtime is looked at once a second
    assert_401(http.post("/v1/generate", json=body, headers=bearer(doomed.token)), "was revoked at")
    assert http.post("/v1/generate", json=body, headers=bearer(keyed["live"].token)).status_code == 422


def test_keys_made_in_one_folder_close_a_gateway_started_in_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No keys file named anywhere: `keys create` and the gateway both use the state directory's, whatever
    folder each runs from, and both say which file that is."""
    state, here, there = tmp_path / "state", tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    monkeypatch.setenv("SD_TRITON_STATE_DIR", str(state))
    monkeypatch.delenv("SD_GATEWAY_KEYS_FILE")
    done = subprocess.run(
        [sys.executable, "-m", "sd_triton.cli", "keys", "create", "--name", "ops"],
        cwd=here, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = state / "api-keys.json"
    assert created_fields(done.stdout)["keys_file"] == str(path) and path.is_file()
    assert f"SD_GATEWAY_KEYS_FILE={path}" in done.stderr  # what a gateway elsewhere needs
    monkeypatch.chdir(there)
    with caplog.at_level(logging.INFO), gateway_client() as http:
        refused = http.post("/v1/generate", json={"prompt": "a fox", **CHEAP})
        assert refused.status_code == 401, refused.text  # closed: it found the keys
    assert f"API keys required ({path})" in caplog.text


def test_keys_commands_show_the_keys_file_option() -> None:
    for command in ("create", "list", "revoke"):
        shown = subprocess.run(
            [sys.executable, "-m", "sd_triton.cli", "keys", command, "--help"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "--keys-file" in shown.stdout and "SD_TRITON_STATE_DIR" in shown.stdout, command
