"""The jobs' data: the request a job is submitted with, its record in the state store, what
`GET /v1/jobs/{id}` answers (manager.py runs them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from sd_triton.gateway.schemas import ErrorDetail, GenerateRequest, GenerateResponse

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class JobRequest(GenerateRequest):
    """The /v1/generate body, plus what only a job has."""

    preview: bool = Field(False, description="step events carry a small preview image of the latents")
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="POSTed the finished job (signed, see docs/jobs.md); retried with backoff",
    )


class JobProgress(BaseModel):
    step: int
    steps: int
    eta_s: float | None = Field(None, description="seconds left, from the mean step time so far")
    elapsed_s: float


class WebhookStatus(BaseModel):
    url: str
    attempts: int = 0
    delivered: bool = False
    last_status: int | None = None
    last_error: str | None = None


class JobRecord(BaseModel):
    id: str
    status: JobStatus
    created_at: str
    updated_at: str
    request: JobRequest
    key_id: str | None = None
    base_url: str = Field("", description="the gateway as the client saw it, for image URLs")
    use_cache: bool = Field(True, description="False: submitted with Cache-Control: no-cache")
    progress: JobProgress | None = None
    result: GenerateResponse | None = None
    error: ErrorDetail | None = None
    webhook: WebhookStatus | None = None


class JobView(BaseModel):
    """What `GET /v1/jobs/{id}` answers."""

    id: str
    status: JobStatus
    queue_position: int | None = Field(None, description="1 = next to run; null once it runs")
    progress: JobProgress | None = None
    result: GenerateResponse | None = Field(None, description="the /v1/generate response, once completed")
    error: ErrorDetail | None = None
    created_at: str
    updated_at: str
    events_url: str
    webhook: WebhookStatus | None = None
