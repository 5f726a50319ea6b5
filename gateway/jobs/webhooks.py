"""Signed webhook deliveries with retries.

A delivery is a POST of the JSON body with

    X-SD-Triton-Timestamp: <unix seconds>
    X-SD-Triton-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<unix seconds>." + body)>

so a receiver recomputes the HMAC over the raw body with its key's webhook secret and refuses
old timestamps (replays). `verify` does exactly that. A failed attempt (no connection, a timeout,
429 or 5xx) is retried after backoff_s, 2 x backoff_s, 4 x ... up to max_attempts; another 4xx is final.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-SD-Triton-Timestamp"
SIGNATURE_HEADER = "X-SD-Triton-Signature"
EVENT_HEADER = "X-SD-Triton-Event"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, event: str, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"t={timestamp},v1={signature(secret, timestamp, body)}",
        EVENT_HEADER: event,
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """A receiver's check: the signature matches the raw body and the timestamp is recent."""
    lowered = {k.lower(): v for k, v in headers.items()}
    parts = dict(
        item.split("=", 1) for item in lowered.get(SIGNATURE_HEADER.lower(), "").split(",") if "=" in item
    )
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(parts.get("v1", ""), signature(secret, timestamp, body))


@dataclass
class Delivery:
    url: str
    attempts: int = 0
    delivered: bool = False
    last_status: int | None = None  # the receiver's HTTP status; None: no answer
    last_error: str | None = None


async def refused_target(url: str, allow_private: bool) -> str | None:
    """Why the gateway will not POST to `url`, or None. Unless `allow_private`, a host that resolves to a
    loopback, private, link-local (cloud metadata), multicast, reserved or unspecified address is refused:
    a webhook must not let a caller reach the gateway's own network."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return "webhook_url: no host in the URL"
    if allow_private:
        return None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"webhook_url: cannot resolve {host}: {exc}"
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global or address.is_multicast:
            return (
                f"webhook_url: {host} is {address}, not a public address (internal receivers: set "
                "SD_GATEWAY_WEBHOOK_ALLOW_PRIVATE=true)"
            )
    return None


class WebhookSender:
    def __init__(
        self, max_attempts: int, backoff_s: float, timeout_s: float, allow_private: bool = False
    ) -> None:
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.allow_private = allow_private
        self.client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def close(self) -> None:
        await self.client.aclose()

    async def deliver(self, url: str, body: bytes, secret: str, event: str) -> Delivery:
        delivery = Delivery(url)
        while delivery.attempts < self.max_attempts:
            if delivery.attempts:
                await asyncio.sleep(self.backoff_s * 2 ** (delivery.attempts - 1))
            delivery.attempts += 1
            # checked again at every attempt: the name may resolve elsewhere now (DNS rebinding)
            refused = await refused_target(url, self.allow_private)
            if refused is not None:
                delivery.last_error = refused
                log.warning("webhook %s: not sent: %s", url, refused)
                break
            headers = signed_headers(secret, body, event)  # a fresh timestamp per attempt
            try:
                response = await self.client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                delivery.last_status, delivery.last_error = None, f"{type(exc).__name__}: {exc}"
            else:
                delivery.last_status, delivery.last_error = response.status_code, None
                if response.is_success:
                    delivery.delivered = True
                    return delivery
                if response.status_code < 500 and response.status_code != 429:
                    break  # the receiver refuses it; retrying will not help
            log.warning(
                "webhook %s: attempt %d/%d failed (%s)",
                url,
                delivery.attempts,
                self.max_attempts,
                delivery.last_error or f"HTTP {delivery.last_status}",
            )
        return delivery
