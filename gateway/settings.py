"""Gateway settings: environment variables `SD_GATEWAY_*`, or a `.env`-style file named by
`SD_GATEWAY_ENV_FILE`; the `sd-triton gateway` flags override both."""

from __future__ import annotations

import os

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SD_GATEWAY_", env_file=os.environ.get("SD_GATEWAY_ENV_FILE"), extra="forbid"
    )

    triton_url: str = Field("localhost:8001", description="Triton gRPC endpoint, HOST:PORT")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # every Triton call has a deadline: a request never hangs on a dead server
    triton_timeout_s: float = Field(120.0, gt=0, description="deadline of one txt2img call")
    triton_probe_timeout_s: float = Field(2.0, gt=0, description="deadline of readiness/config calls")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503")
    # request limits on top of the served model's own (which come from Triton)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_prompt_chars: int = Field(2000, ge=1)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_batch_prompts: int = Field(16, ge=1)
    encode_workers: int = Field(4, ge=1, description="threads that encode images off the event loop")

    # --- shared state (gateway/state.py) ---
    # read from SD_TRITON_REDIS_URL (the name the deployment files use), not SD_GATEWAY_*
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SD_TRITON_REDIS_URL", "SD_GATEWAY_REDIS_URL", "redis_url"),
        description="Redis URL; unset: limits, quotas, cache and jobs live in this process",
    )

    # --- jobs (gateway/jobs.py) ---

    # --- API keys, limits, content policy (gateway/keys.py, gateway/limits.py, gateway/policy.py) ---

    # --- storage, cache, metrics (gateway/storage.py, gateway/cache.py, gateway/metrics.py) ---
