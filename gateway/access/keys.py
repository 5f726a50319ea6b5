"""API keys: a registry in one JSON file (`keys_file`), managed with `sd-triton keys`.

A token is `sdk_<id>_<secret>`: the id finds the record, the secret is checked against its stored
sha256 (`hmac.compare_digest`). The secret itself is never stored; it is shown once, at creation.
Each key also has a webhook secret (stored as is: the gateway signs webhooks with it), its own limits
(None = unlimited) and its own prompt policy additions. The file is written atomically with mode 0600.

The running gateway re-reads the file when it changes (checked at most once a second), so a new or
revoked key applies without a restart. With no key in the file the gateway runs open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sd_triton.gateway.access.policy import Rules
from sd_triton.gateway.errors import UnauthorizedError

log = logging.getLogger(__name__)

TOKEN_PREFIX = "sdk_"
HASH_PREFIX = "sha256:"
CHECK_INTERVAL_S = 1.0  # how often the gateway looks at the file's mtime, at most


def hash_secret(secret: str) -> str:
    return HASH_PREFIX + hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """`sdk_<id>_<secret>` -> (id, secret); None when it does not look like a token."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    key_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ApiKey(BaseModel):
    """One key as stored (no secret: only its hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(..., pattern=r"^[0-9a-f]{6,64}$")
    name: str = Field(..., min_length=1, max_length=200)
    hash: str = Field(..., pattern=r"^sha256:[0-9a-f]{64}$")
    created_at: str
    revoked_at: str | None = None
    rate_limit_per_min: int | None = Field(None, ge=1, description="requests per minute; None: unlimited")
    images_per_day: int | None = Field(None, ge=1, description="images per UTC day; None: unlimited")
    max_concurrency: int | None = Field(None, ge=1, description="requests served at once; None: unlimited")
    webhook_secret: str = Field(..., min_length=16)
    block_words: list[str] = Field(default_factory=list)
    block_regexes: list[str] = Field(default_factory=list)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def rules(self) -> Rules:
        where = f"key {self.id}"
        return Rules.build(
            "key", self.block_words, self.block_regexes, where, fields=("block_words", "block_regexes")
        )

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.hash.encode(), hash_secret(secret).encode())


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    keys: list[ApiKey] = Field(default_factory=list)


@dataclass(frozen=True)
class CreatedKey:
    """A new key: `token` and `key.webhook_secret` are shown to the operator once."""

    key: ApiKey
    token: str


# --- the file: read, and read-modify-write under a lock (the CLI) ---


def read_key_file(path: Path) -> KeyFile:
    """The registry in `path`; a missing file is an empty registry. Bad content: ValueError naming it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return KeyFile()
    try:
        data = KeyFile.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "file"
        raise ValueError(f"keys file {path}: {where}: {first.get('msg', 'invalid')}") from None
    seen: set[str] = set()
    for key in data.keys:
        if key.id in seen:
            raise ValueError(f"keys file {path}: key id {key.id} appears twice")
        seen.add(key.id)
        key.rules()  # a bad regex fails here, naming the key and the regex
    return data


def _write_atomically(path: Path, data: KeyFile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(data.model_dump(mode="json"), indent=2) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time (two `sd-triton keys` commands at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_key(
    path: Path,
    name: str,
    rate_limit_per_min: int | None = None,
    images_per_day: int | None = None,
    max_concurrency: int | None = None,
    block_words: list[str] | None = None,
    block_regexes: list[str] | None = None,
) -> CreatedKey:
    with _locked(path):
        data = read_key_file(path)
        taken = {key.id for key in data.keys}
        key_id = secrets.token_hex(6)
        while key_id in taken:
            key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        try:
            key = ApiKey(
                id=key_id,
                name=name,
                hash=hash_secret(secret),
                created_at=_now(),
                rate_limit_per_min=rate_limit_per_min,
                images_per_day=images_per_day,
                max_concurrency=max_concurrency,
                webhook_secret="whsec_" + secrets.token_urlsafe(32),
                block_words=list(block_words or []),
                block_regexes=list(block_regexes or []),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ()))
            raise ValueError(f"{field}: {first.get('msg', 'invalid')}") from None
        key.rules()  # a bad regex is refused before anything is written
        data.keys.append(key)
        _write_atomically(path, data)
    return CreatedKey(key, f"{TOKEN_PREFIX}{key_id}_{secret}")


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Mark a key revoked (kept in the file: the gateway stays keyed even when all are revoked)."""
    with _locked(path):
        data = read_key_file(path)
        for i, key in enumerate(data.keys):
            if key.id == key_id:
                if key.revoked:
                    return key
                data.keys[i] = key.model_copy(update={"revoked_at": _now()})
                _write_atomically(path, data)
                return data.keys[i]
    raise ValueError(f"key {key_id!r}: no such key in {path}")


# --- the running gateway's view ---


class KeyRegistry:
    """The keys file as the gateway sees it, re-read when its mtime, size or inode change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._keys: dict[str, ApiKey] = {}
        self._rules: dict[str, Rules] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = time.monotonic()
        self._load(self._stat())  # a broken file at startup is an error, not an open gateway

    @property
    def open(self) -> bool:
        """No key in the file: every /v1 request is served without one."""
        return not self._keys

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, stamp: tuple[int, int, int] | None) -> None:
        was_open = self.open
        data = read_key_file(self.path)
        self._keys = {key.id: key for key in data.keys}
        self._rules = {key.id: key.rules() for key in data.keys}
        self._stamp = stamp
        if stamp is not None and os.stat(self.path).st_mode & 0o077:
            log.warning("keys file %s is readable by others: chmod 600 it", self.path)
        live = sum(not key.revoked for key in data.keys)
        log.info("API keys from %s: %d, %d revoked", self.path, len(self._keys), len(self._keys) - live)
        if self.open and not was_open:
            log.warning("no API keys in %s any more: the gateway is open again", self.path)

    def refresh(self) -> None:
        """Re-read the file if it changed; checks its mtime at most once a second. A file that
        cannot be read keeps the keys loaded before (and says why)."""
        now = time.monotonic()
        if now - self._checked_at < CHECK_INTERVAL_S:
            return
        self._checked_at = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        try:
            self._load(stamp)
        except (ValueError, OSError) as exc:
            log.error("keeping the API keys loaded before: %s", exc)

    def get(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    def rules(self, key_id: str) -> Rules:
        return self._rules.get(key_id) or Rules("key")

    def webhook_secret(self, key_id: str) -> str | None:
        """The secret webhooks of this key's jobs are signed with (None: no such key)."""
        key = self._keys.get(key_id)
        return None if key is None else key.webhook_secret

    def authenticate(self, token: str | None) -> ApiKey:
        """The key of `token`; UnauthorizedError when it is missing, unknown, wrong or revoked."""
        if not token:
            raise UnauthorizedError(
                "missing API key: send 'Authorization: Bearer <token>' or 'X-API-Key: <token>'"
            )
        parsed = parse_token(token)
        key = self._keys.get(parsed[0]) if parsed else None
        if parsed is None or key is None:
            hmac.compare_digest(HASH_PREFIX, hash_secret(token))  # about the same work as a real check
            raise UnauthorizedError("invalid API key")
        if not key.matches(parsed[1]):
            raise UnauthorizedError("invalid API key")
        if key.revoked:
            raise UnauthorizedError(f"API key {key.id} was revoked at {key.revoked_at}")
        return key
