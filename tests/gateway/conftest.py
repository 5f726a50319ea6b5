"""The real gateway process in front of the session's Triton server, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gateway.process import GatewayProcess
from sd_triton.triton_server import TritonServer
from tests.conftest import free_port


@pytest.fixture(scope="session")
def gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    log_file = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = GatewayProcess(triton.grpc_url, port=free_port(), log_file=log_file)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client
