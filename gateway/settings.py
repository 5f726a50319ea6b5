"""Gateway settings: environment variables `SD_GATEWAY_*`, or a `.env`-style file named by
`SD_GATEWAY_ENV_FILE`; the `sd-triton gateway` flags override both."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sd_triton import paths

ENDPOINT = re.compile(r"(dns:)?[A-Za-z0-9.\-_\[\]:]+:\d{1,5}")


def parse_endpoints(value: str) -> list[str]:
    """`triton_url` as a list: HOST:PORT or dns:NAME:PORT entries, comma-separated."""
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    bad = [entry for entry in entries if not ENDPOINT.fullmatch(entry)]
    if not entries or bad:
        raise ValueError(
            f"triton_url: expected comma-separated HOST:PORT or dns:NAME:PORT entries, got {bad or value!r}"
        )
    return entries


OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1")  # what OpenAI clients send as `model`


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SD_GATEWAY_", env_file=os.environ.get("SD_GATEWAY_ENV_FILE"), extra="forbid"
    )

    triton_url: str = Field(
        "localhost:8001",
        description="Triton gRPC endpoints, comma-separated HOST:PORT; dns:NAME:PORT means every address "
        "NAME resolves to (a Kubernetes headless Service), resolved again at every health check",
    )
    triton_health_interval_s: float = Field(1.0, gt=0, description="probe every Triton endpoint this often")
    triton_retries: int = Field(
        2,
        ge=0,
        description="a call that failed on an endpoint (down, not ready) is sent to another, this often",
    )
    triton_max_in_flight: int = Field(
        32,
        ge=1,
        description="requests outstanding on one Triton endpoint (running and queued there); with every "
        "endpoint at it, a request gets 429 + Retry-After instead of waiting without bound",
    )
    # --- which served pipeline answers (gateway/routing.py) ---
    default_model: str = Field(
        "",
        description="the model (GET /v1/models' id) a request without `model` gets; empty: the pipeline "
        "exported without --name, else the first by name",
    )
    model_aliases: dict[str, str] = Field(
        default_factory=lambda: dict.fromkeys(OPENAI_MODELS, ""),
        description="other names a request's `model` may use -> a served model's id (empty: the default); "
        "by default OpenAI's image model names go to the default model. JSON in the environment",
    )
    default_prompt_syntax: Literal["plain", "a1111"] = Field(
        "plain",
        description="how a request without prompt_syntax is read: plain (the text as it is) or a1111 "
        "(AUTOMATIC1111's (emphasis:1.2) and BREAK)",
    )
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # every Triton call has a deadline: a request never hangs on a dead server
    triton_timeout_s: float = Field(
        120.0, gt=0, description="deadline of one txt2img call, sent to Triton, which drops the work past it"
    )
    triton_probe_timeout_s: float = Field(2.0, gt=0, description="deadline of readiness/config calls")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503")
    # request limits on top of the served model's own (which come from Triton)
    # bodies carry base64 init images (image-to-image): 16 MiB holds a 4 MB PNG, OpenAI's edit limit, twice
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(2000, ge=1)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_image_pixels: int = Field(
        4096 * 4096, ge=64, description="an init image's pixels at most, checked before it is decoded"
    )
    max_batch_prompts: int = Field(16, ge=1)
    encode_workers: int = Field(4, ge=1, description="threads that encode images off the event loop")
    png_compress_level: int = Field(
        1,
        ge=0,
        le=9,
        description="zlib level of PNG results: 1 is fast, 9 smallest (the pixels are the same)",
    )

    # --- shared state (gateway/state.py) ---
    # read from SD_TRITON_REDIS_URL (the name the deployment files use), not SD_GATEWAY_*
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SD_TRITON_REDIS_URL", "SD_GATEWAY_REDIS_URL", "redis_url"),
        description="Redis URL; unset: limits, quotas, cache and jobs live in this process",
    )

    memory_store_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="without Redis: the in-process store keeps this many bytes at most; beyond, the oldest "
        "expiring entries (cached results first, in practice) are evicted",
    )

    # --- jobs (gateway/jobs/) ---
    jobs_max_running: int = Field(8, ge=1, description="jobs this gateway runs on Triton at once")
    job_ttl_s: float = Field(86400.0, gt=0, description="a job's record and events are kept this long")
    job_poll_s: float = Field(0.2, gt=0, description="idle workers look for jobs queued elsewhere this often")
    shutdown_grace_s: int = Field(
        30, ge=0, description="at SIGTERM: no new connections; requests in flight may finish this long"
    )
    job_retry_s: float = Field(
        600.0, ge=0, description="a job finding every Triton endpoint down or full is tried again this long"
    )
    job_drain_s: float = Field(15.0, ge=0, description="at shutdown, running jobs may finish this long")
    job_keepalive_s: float = Field(15.0, gt=0, description="an SSE comment line when no event came this long")
    webhook_secret: SecretStr | None = Field(
        None, description="signs webhooks of requests without an API key (open mode); keys have their own"
    )
    webhook_allow_private: bool = Field(
        False,
        description="allow webhook targets on loopback, private or link-local addresses (internal receivers)",
    )
    webhook_max_attempts: int = Field(5, ge=1)
    webhook_backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per attempt")
    webhook_timeout_s: float = Field(10.0, gt=0)

    # --- API keys, limits, content policy (gateway/access/) ---
    keys_file: str = Field(
        default_factory=lambda: str(paths.keys_file()),
        description="API key registry (`sd-triton keys`); no keys in it: the gateway runs open. "
        "Default: api-keys.json in the state directory (SD_TRITON_STATE_DIR, ~/.local/state/sd-triton)",
    )
    policy_file: str | None = Field(
        None, description='prompt policy JSON {"words": [...], "regexes": [...]}; unset: no global rules'
    )

    # --- storage, cache, metrics (gateway/storage.py, gateway/cache.py, gateway/metrics.py) ---
    storage_dir: str = Field(
        default_factory=lambda: str(paths.images_dir()),
        description="local image folder (no S3 bucket); default: images/ in the state directory",
    )
    storage_ttl_s: float = Field(86400.0, gt=0, description="stored images and their URLs expire after")
    storage_cleanup_interval_s: float = Field(300.0, gt=0, description="how often expired images are deleted")
    s3_bucket: str | None = Field(None, description="store images in this S3 bucket instead of storage_dir")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; unset: AWS")
    s3_region: str | None = None
    s3_prefix: str = Field("sd-triton/images/", description="key prefix of stored images in the bucket")
    # replicas behind one load balancer must share it, or a URL signed by one fails on another
    url_signing_secret: SecretStr | None = Field(None, description="HMAC key of image URLs; unset: random")
    public_url: str | None = Field(None, description="base of image links; unset: the request's base URL")
    cache_enabled: bool = True
    cache_ttl_s: float = Field(3600.0, gt=0, description="seeded results are served from cache this long")
    cache_max_entry_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger results are not cached")
    served_model_refresh_s: float = Field(10.0, gt=0, description="re-read Triton's model configs after")
    triton_metrics_url: str | None = Field(
        None, description="Triton's Prometheus endpoint; unset: Triton's host, port 8002; empty: off"
    )
    triton_metrics_timeout_s: float = Field(0.5, gt=0)

    @field_validator("triton_url")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        parse_endpoints(value)
        return value
