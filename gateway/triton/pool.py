"""The gateway's Triton endpoints: one gRPC client each (tritonclient.grpc.aio), health checks that take
an endpoint out of rotation and back, least-in-flight routing with a bounded queue per endpoint, and the
decision to retry a call on another endpoint. `triton_url`: "a:8001,b:8001", or "dns:NAME:PORT" for
every address NAME resolves to (resolved again at every health check)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.gateway.errors import OverloadedError, TritonUnavailableError
from sd_triton.gateway.metrics import GatewayMetrics
from sd_triton.gateway.settings import GatewaySettings, parse_endpoints

log = logging.getLogger(__name__)

# reconnect quickly once Triton is back, instead of gRPC's default backoff of up to 2 minutes
CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Retryable(TritonUnavailableError):
    """This endpoint could not run the call (down, or txt2img not ready there); another one may."""


@dataclass(eq=False)
class Endpoint:
    address: str  # HOST:PORT
    client: grpcaio.InferenceServerClient
    in_flight: int = 0
    healthy: bool = True  # in rotation; optimistic until the first health check
    reason: str = ""  # why it is out of rotation


async def resolve(entry: str) -> list[str]:
    """HOST:PORT as is; dns:NAME:PORT -> every address NAME resolves to, with PORT."""
    if not entry.startswith("dns:"):
        return [entry]
    host, port = entry.removeprefix("dns:").rsplit(":", 1)
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]


class EndpointPool:
    """The endpoints of `settings.triton_url`, their health and their load."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.entries = parse_endpoints(settings.triton_url)
        self.endpoints: dict[str, Endpoint] = {}
        for entry in self.entries:
            if not entry.startswith("dns:"):
                self._add(entry)
        self._turn = itertools.count()  # breaks ties between endpoints equally in flight
        self._health: asyncio.Task[None] | None = None
        self._health_lock = asyncio.Lock()

    def start(self) -> None:
        """The health checks, every `triton_health_interval_s` (call from a running event loop)."""
        self._health = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        for endpoint in self.endpoints.values():
            await endpoint.client.close()

    def _add(self, address: str) -> Endpoint:
        client = grpcaio.InferenceServerClient(address, channel_args=CHANNEL_ARGS)
        endpoint = self.endpoints[address] = Endpoint(address, client)
        self._report(endpoint)
        return endpoint

    def _report(self, endpoint: Endpoint) -> None:
        if self.metrics is not None:
            self.metrics.triton_endpoint_up.labels(endpoint=endpoint.address).set(int(endpoint.healthy))
            self.metrics.triton_endpoint_in_flight.labels(endpoint=endpoint.address).set(endpoint.in_flight)

    # -- health -----------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # noqa: BLE001 - the loop outlives any one round
                log.exception("Triton health check failed")
            await asyncio.sleep(self.settings.triton_health_interval_s)

    async def check_health(self) -> None:
        """Resolve dns: entries again, probe every endpoint, and move endpoints in and out of rotation.
        One round at a time (the loop and /readyz both call it): two would add a new address twice."""
        async with self._health_lock:
            await self._check_health()

    async def _check_health(self) -> None:
        wanted: list[str] = []
        for entry in self.entries:
            try:
                wanted += await resolve(entry)
            except OSError as exc:
                log.warning("Triton endpoint %s: cannot resolve: %s", entry, exc)
        for address in wanted:
            if address not in self.endpoints:
                log.info("Triton endpoint %s: discovered", address)
                self._add(address)
        for address in [a for a in self.endpoints if a not in wanted and wanted]:
            endpoint = self.endpoints.pop(address)
            log.info("Triton endpoint %s: no longer resolved; removed", address)
            await endpoint.client.close()
        endpoints = list(self.endpoints.values())
        results = await asyncio.gather(*(self._probe(e) for e in endpoints))
        for endpoint, (ready, reason) in zip(endpoints, results, strict=True):
            if ready and not endpoint.healthy:
                log.info("Triton endpoint %s: ready again, back in rotation", endpoint.address)
            elif not ready and endpoint.healthy:
                log.warning("Triton endpoint %s: out of rotation: %s", endpoint.address, reason)
            endpoint.healthy, endpoint.reason = ready, "" if ready else reason
            self._report(endpoint)

    async def _probe(self, endpoint: Endpoint) -> tuple[bool, str]:
        timeout = self.settings.triton_probe_timeout_s
        try:
            if not await endpoint.client.is_server_ready(client_timeout=timeout):
                return False, "server not ready"
            if not await endpoint.client.is_model_ready(c.TXT2IMG.name, client_timeout=timeout):
                return False, "txt2img not ready"
        except InferenceServerException as exc:
            return False, exc.message() or str(exc)
        return True, ""

    def endpoint_states(self) -> dict[str, str]:
        return {
            e.address: "ready" if e.healthy else f"out of rotation: {e.reason}"
            for e in self.endpoints.values()
        }

    # -- routing

    def pick(self, tried: set[str]) -> Endpoint:
        """The least busy endpoint in rotation not tried yet (ties in turn); with none in rotation, the
        least busy of the others (the health check may lag behind)."""
        untried = [e for e in self.endpoints.values() if e.address not in tried]
        if not untried:
            raise TritonUnavailableError(
                f"no Triton endpoint left to try ({', '.join(self.endpoints) or self.settings.triton_url})",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        pool = [e for e in untried if e.healthy] or untried
        limit = self.settings.triton_max_in_flight
        pool = [e for e in pool if e.in_flight < limit]
        if not pool:  # a bounded queue per endpoint: refuse now rather than wait without bound
            if self.metrics is not None:
                self.metrics.rejections.labels(reason="overloaded").inc()
            raise OverloadedError(
                f"overloaded: every Triton endpoint has {limit} requests in flight "
                f"(triton_max_in_flight); try again in {self.settings.retry_after_s} s",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        turn = next(self._turn)
        return min(pool, key=lambda e: (e.in_flight, (pool.index(e) - turn) % len(pool)))

    def _out_of_rotation(self, endpoint: Endpoint, reason: str) -> None:
        if endpoint.healthy:
            log.warning("Triton endpoint %s: out of rotation: %s", endpoint.address, reason)
        endpoint.healthy, endpoint.reason = False, reason
        self._report(endpoint)

    @contextlib.contextmanager
    def busy(self, tried: set[str]) -> Iterator[Endpoint]:
        """The endpoint `_pick` chooses, counted in flight while the call runs."""
        endpoint = self.pick(tried)
        endpoint.in_flight += 1
        self._report(endpoint)
        try:
            yield endpoint
        finally:
            endpoint.in_flight -= 1
            self._report(endpoint)

    def retry(self, error: Exception, endpoint: Endpoint, tried: set[str], what: str) -> bool:
        """After `error` on `endpoint`: True when another endpoint should take the call (and this one
        leaves rotation until its health check passes)."""
        if not isinstance(error, Retryable):
            return False
        self._out_of_rotation(endpoint, error.message)
        tried.add(endpoint.address)
        if len(tried) > self.settings.triton_retries or all(a in tried for a in self.endpoints):
            return False
        log.warning(
            "%s failed on %s (%s); retrying on another endpoint", what, endpoint.address, error.message
        )
        return True
