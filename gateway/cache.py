"""The seed-aware result cache.

Only a request with an explicit seed is deterministic, so only such requests are looked up and stored.
A request's LoRA adapters enter the fingerprint with their files' sha256 (service.py).
The key is a sha256 over the served model's fingerprint (`ServedModel.fingerprint`: what Triton serves,
from its model configs and loaded versions) and every parameter that decides the images: the prompts,
the negative prompt, width and height after defaults, steps, guidance, seeds, scheduler, images per
prompt and output format. A swapped engine changes the fingerprint, so its old entries are never hit
again (they expire after `cache_ttl_s`).

Entries live in the shared state store (memory, or Redis shared by the replicas). When the store is
unreachable the cache is bypassed: the request goes to Triton and a WARNING is logged at most once a
minute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import ValidationError

from sd_triton.gateway.access.limits import StateErrors
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.schemas import GenerateResponse, GenerationOptions
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.gateway.state import StateStore, StateUnavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "cache:v1:"
WARN_EVERY_S = 60.0


class _PlannedJob(Protocol):  # service.Job, without importing the service
    @property
    def params(self) -> Any: ...

    @property
    def conditioning(self) -> dict[str, Any]: ...


def cache_key(
    fingerprint: str,
    prompts: Sequence[str],
    request: GenerationOptions,
    jobs: Sequence[_PlannedJob],
    image_digest: str | None = None,
) -> str | None:
    """The cache key of a planned generation, or None when it is not deterministic (no seed).
    `image_digest`: an image-to-image request's init pixels (and mask), hashed (as sent to Triton)."""
    if request.seed is None or not jobs:
        return None
    checked = dataclasses.asdict(jobs[0].params)  # width/height after defaults, as sent to Triton
    described = {
        "fingerprint": fingerprint,
        "prompts": list(prompts),
        "negative_prompt": request.negative_prompt or "",  # absent and empty are both unconditional
        "width": checked["width"],
        "height": checked["height"],
        "steps": checked["steps"],
        "guidance_scale": checked["guidance_scale"],
        "seed": request.seed,
        "scheduler": checked["scheduler"],
        "num_images": checked["num_images"],
        "output_format": request.output_format,
    }
    if request.clip_skip:  # another layer's output
        described["clip_skip"] = request.clip_skip
    if request.prompt_syntax not in (None, "plain"):  # the same text read otherwise
        described["prompt_syntax"] = request.prompt_syntax
    if jobs[0].conditioning:  # SDXL: its size conditioning; and no negative prompt (zeros) is not ""
        described |= {"conditioning": jobs[0].conditioning, "negative_prompt": request.negative_prompt}
    if image_digest is not None:  # text-to-image keys stay what they were
        described |= {"image": image_digest, "strength": checked["strength"]}
    blob = json.dumps(described, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return KEY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    def __init__(self, store: StateStore, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.errors = StateErrors(metrics, "result cache bypassed ({use})", WARN_EVERY_S, log)

    @property
    def enabled(self) -> bool:
        return self.settings.cache_enabled

    def bypass(self, key: str | None) -> bool:
        """A request that could have been answered from the cache asked for a fresh generation
        (`Cache-Control: no-cache`): counted (result "bypass"), and its response says so."""
        if key is None or not self.enabled:
            return False
        self.metrics.cache.labels(result="bypass").inc()
        return True

    async def get(self, key: str | None) -> GenerateResponse | None:
        """The stored response for `key` (marked as a hit), or None; counts the lookup."""
        if key is None or not self.enabled:
            return None
        try:
            raw = await self.store.get(key)
        except StateUnavailable as exc:
            self.errors.record("cache lookup", exc)
            self.metrics.cache.labels(result="error").inc()
            return None
        cached = None
        if raw is not None:
            try:
                cached = GenerateResponse.model_validate_json(raw)
            except ValidationError as exc:  # written by another version of the gateway
                log.warning("unreadable cache entry %s dropped: %s", key, exc.errors()[0].get("msg"))
        self.metrics.cache.labels(result="miss" if cached is None else "hit").inc()
        return None if cached is None else cached.model_copy(update={"cache": "hit"})

    async def put(self, key: str | None, response: GenerateResponse) -> bool:
        """Store `response` under `key` for `cache_ttl_s`; False when skipped (too large, no key,
        disabled, store unreachable)."""
        if key is None or not self.enabled:
            return False
        if any(image.base64 is None for image in response.images):
            return False  # only full results are cached; URLs expire
        raw = response.model_dump_json(exclude={"cache"}).encode()
        if len(raw) > self.settings.cache_max_entry_bytes:
            log.info("result of %d bytes not cached (cache_max_entry_bytes %d)", len(raw),
                     self.settings.cache_max_entry_bytes)  # fmt: skip
            return False
        try:
            await self.store.set(key, raw, ttl_s=self.settings.cache_ttl_s)
        except StateUnavailable as exc:
            self.errors.record("cache store", exc)
            return False
        return True
