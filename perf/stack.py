"""How every benchmark starts what it measures: Triton on an exported repository and, in front of it,
a gateway set up for benchmarks, on free ports, their logs in one folder; started, waited for, stopped.

    with serving(repo) as stack:                 # Triton and the gateway
        run_load(Load(stack.gateway_url, ...), stack.triton.metrics_url)
    with serving(repo, gateway=False) as stack:  # Triton alone (perf_analyzer)
        ...
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sd_triton import paths
from sd_triton.gateway.process import GatewayProcess
from sd_triton.triton_server import TritonServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_gateway(
    triton_grpc_url: str, port: int | None = None, *, cache: bool = False, log_file: Path | None = None
) -> GatewayProcess:
    """A gateway for benchmarks, not started: open (no API keys, whatever the state directory's keys file
    holds) and without the result cache unless `cache` (the loads also ask for no-cache)."""
    env = {
        "SD_GATEWAY_KEYS_FILE": str(paths.state_dir() / "perf" / "no-api-keys.json"),  # never created
        "SD_GATEWAY_CACHE_ENABLED": "true" if cache else "false",
    }
    return GatewayProcess(triton_grpc_url, port=port or free_port(), log_file=log_file, env=env)


@dataclass(frozen=True)
class Stack:
    triton: TritonServer
    gateway: GatewayProcess | None

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None, "started with gateway=False"
        return self.gateway.url


@contextmanager
def serving(
    repo: Path, *, gateway: bool = True, cache: bool = False, log_dir: Path | None = None
) -> Iterator[Stack]:
    """Triton on `repo` (and the gateway) on free ports, logs in `log_dir` (default: the state
    directory's logs/); both stopped on the way out."""
    logs = log_dir or paths.logs_dir()
    grpc, front = free_port(), free_port()
    log_file = logs / f"triton-{grpc}.log"
    with TritonServer(repo, grpc, free_port(), free_port(), log_file=log_file) as triton:
        if not gateway:
            yield Stack(triton, None)
            return
        with bench_gateway(triton.grpc_url, front, cache=cache, log_file=logs / f"gateway-{front}.log") as gw:
            yield Stack(triton, gw)
