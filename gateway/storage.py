"""Generated images kept for a while and handed out as URLs instead of base64.

Two stores with one interface:

- `LocalStorage` (default): files in `storage_dir`, served by this gateway at
  `GET /v1/images/{id}.{ext}?expires=...&signature=...`. The signature is an HMAC-SHA256 of the name and
  the expiry with `url_signing_secret`, so a link works without an API key, cannot be altered, and stops
  working when it expires. Replicas behind one load balancer must share the secret (and the folder).
- `S3Storage` (`s3_bucket` set): objects in any S3-compatible bucket, handed out as presigned GET URLs
  (the store checks those signatures); boto3 runs in threads, off the event loop.

Both delete what is older than `storage_ttl_s` in a background task (`run_cleanup`), started in the app's
lifespan. `with_urls` is the one call that turns a finished generation into URLs (routes and jobs use it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_triton.gateway.errors import BadSignatureError, NotFoundError, StorageError
from sd_triton.gateway.images import CONTENT_TYPES
from sd_triton.gateway.schemas import GenerateResponse, Image
from sd_triton.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

EXTENSIONS = {content_type: ext for ext, content_type in CONTENT_TYPES.items()}
NAME = re.compile(r"^[A-Za-z0-9_-]{22}\.(png|jpeg|webp)$")  # 16 random bytes, urlsafe base64
PRESIGN_MAX_S = 7 * 24 * 3600  # S3's SigV4 limit on a presigned URL's lifetime


@dataclass(frozen=True)
class StoredImage:
    name: str  # "<id>.<ext>"
    expires_at: int  # unix seconds: the URL and the stored file expire together


class UrlSigner:
    """HMAC-SHA256 over "<name>\\n<expires>"."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, name: str, expires: int) -> str:
        return hmac.new(self._secret, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, name: str, expires: int, signature: str) -> bool:
        return hmac.compare_digest(self.sign(name, expires), signature)


class ImageStorage(ABC):
    kind: str

    def __init__(self, ttl_s: float, public_url: str | None) -> None:
        self.ttl_s = ttl_s
        self.public_url = public_url

    @abstractmethod
    async def put(self, data: bytes, ext: str) -> StoredImage:
        """Store one encoded image; it expires `ttl_s` from now."""

    @abstractmethod
    async def url(self, stored: StoredImage, base_url: str | None) -> str:
        """A link to `stored` that works without an API key until it expires."""

    @abstractmethod
    async def cleanup(self) -> int:
        """Delete what has expired; return how many images were deleted."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass

    def _new(self, ext: str) -> StoredImage:
        if ext not in CONTENT_TYPES:
            raise ValueError(f"ext: one of {', '.join(CONTENT_TYPES)}, got {ext!r}")
        name = f"{secrets.token_urlsafe(16)}.{ext}"
        return StoredImage(name, math.ceil(time.time() + self.ttl_s))

    async def store_image(self, image: Image, base_url: str | None = None) -> Image:
        """`image` stored, with `url` set and `base64` None."""
        if image.base64 is None:
            return image  # already a URL
        stored = await self.put(base64.b64decode(image.base64), EXTENSIONS[image.content_type])
        return image.model_copy(update={"base64": None, "url": await self.url(stored, base_url)})

    async def with_urls(self, response: GenerateResponse, base_url: str | None = None) -> GenerateResponse:
        """A finished generation with every image stored and carried as a URL instead of base64.

        `base_url` is the gateway's address as the client sees it (the request's base URL); the
        `public_url` setting wins over it, and S3 ignores both. Raises StorageError when the store fails."""
        images = await asyncio.gather(*(self.store_image(image, base_url) for image in response.images))
        return response.model_copy(update={"images": list(images)})

    async def run_cleanup(self, interval_s: float) -> None:
        """Delete expired images every `interval_s` until cancelled; failures are logged, not raised."""
        while True:
            try:
                deleted = await self.cleanup()
                if deleted:
                    log.info("deleted %d expired images from %s storage", deleted, self.kind)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one failed sweep
                log.warning("cleaning up %s storage failed: %s", self.kind, exc)
            await asyncio.sleep(interval_s)


class LocalStorage(ImageStorage):
    kind = "local"

    def __init__(
        self, directory: Path, ttl_s: float, signer: UrlSigner, public_url: str | None = None
    ) -> None:
        super().__init__(ttl_s, public_url)
        self.directory = directory
        self.signer = signer
        directory.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, data: bytes) -> None:
        partial = self.directory / f".{name}.partial"  # never served: NAME has no leading dot
        partial.write_bytes(data)
        os.replace(partial, self.directory / name)

    async def put(self, data: bytes, ext: str) -> StoredImage:
        stored = self._new(ext)
        await asyncio.to_thread(self._write, stored.name, data)
        return stored

    async def url(self, stored: StoredImage, base_url: str | None) -> str:
        base = self.public_url or base_url
        if not base:
            raise ValueError("a base URL is needed for local image links: set public_url or pass base_url")
        signature = self.signer.sign(stored.name, stored.expires_at)
        return f"{base.rstrip('/')}/v1/images/{stored.name}?expires={stored.expires_at}&signature={signature}"

    def _expired(self, path: Path, now: float) -> bool:
        return path.stat().st_mtime + self.ttl_s <= now

    def resolve(self, name: str, expires: str | None, signature: str | None) -> Path:
        """The file behind a signed link: 403 for a missing or wrong signature, 404 for an unknown or
        expired image (an expired file is deleted on the spot)."""
        if not NAME.match(name) or expires is None or not expires.isdigit() or signature is None:
            if NAME.match(name):
                raise BadSignatureError("signature: missing or malformed; use the URL as it was handed out")
            raise NotFoundError(f"image {name!r}: no such image")
        if not self.signer.verify(name, int(expires), signature):
            raise BadSignatureError("signature: does not match the image and expiry")
        path = self.directory / name
        now = time.time()
        try:
            file_expired = self._expired(path, now)
        except FileNotFoundError:
            raise NotFoundError(f"image {name!r}: no such image (or already deleted)") from None
        if file_expired:
            path.unlink(missing_ok=True)
        if file_expired or int(expires) <= now:
            raise NotFoundError(f"image {name!r}: expired")
        return path

    def _sweep(self) -> int:
        now, deleted = time.time(), 0
        for path in self.directory.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another replica's sweep got it first
                if path.is_file() and self._expired(path, now):
                    path.unlink()
                    deleted += 1
        return deleted

    async def cleanup(self) -> int:
        return await asyncio.to_thread(self._sweep)


class S3Storage(ImageStorage):
    """Any S3-compatible store. Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles, instance roles)."""

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str,
        ttl_s: float,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        super().__init__(ttl_s, None)
        import boto3  # only needed when configured
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        config = Config(
            signature_version="s3v4", connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    async def _call(self, what: str, method: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(method, **kwargs)
        except Exception as exc:  # botocore's errors share no base class with its transport errors
            raise StorageError(f"S3 bucket {self.bucket!r} ({what}): {exc}") from exc

    async def put(self, data: bytes, ext: str) -> StoredImage:
        stored = self._new(ext)
        await self._call(
            "put_object",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.prefix + stored.name,
            Body=data,
            ContentType=CONTENT_TYPES[ext],
        )
        return stored

    async def url(self, stored: StoredImage, base_url: str | None) -> str:
        expires_in = min(PRESIGN_MAX_S, max(1, stored.expires_at - int(time.time())))
        params = {"Bucket": self.bucket, "Key": self.prefix + stored.name}
        url = await self._call(
            "presign", self.client.generate_presigned_url, ClientMethod="get_object", Params=params,
            ExpiresIn=expires_in,
        )  # fmt: skip
        return str(url)

    def _sweep(self) -> int:
        cutoff = time.time() - self.ttl_s
        expired = [
            {"Key": item["Key"]}
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for item in page.get("Contents", ())
            if item["LastModified"].timestamp() <= cutoff
        ]
        for start in range(0, len(expired), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": expired[start : start + 1000], "Quiet": True}
            )
        return len(expired)

    async def cleanup(self) -> int:
        return int(await self._call("cleanup", self._sweep))

    async def close(self) -> None:
        self.client.close()


def make_storage(settings: GatewaySettings) -> ImageStorage:
    if settings.s3_bucket:
        log.info("images stored in S3 bucket %s (%s)", settings.s3_bucket, settings.s3_endpoint_url or "AWS")
        return S3Storage(
            settings.s3_bucket, settings.s3_prefix, settings.storage_ttl_s, settings.s3_endpoint_url,
            settings.s3_region,
        )  # fmt: skip
    if settings.url_signing_secret is not None:
        secret = settings.url_signing_secret.get_secret_value().encode()
    else:
        secret = secrets.token_bytes(32)
        log.warning(
            "url_signing_secret unset: image links are signed with a random key of this process; "
            "set SD_GATEWAY_URL_SIGNING_SECRET (the same on every replica) so any replica accepts them"
        )
    directory = Path(settings.storage_dir)
    log.info("images stored in %s for %.0f s", directory.resolve(), settings.storage_ttl_s)
    return LocalStorage(directory, settings.storage_ttl_s, UrlSigner(secret), settings.public_url)
