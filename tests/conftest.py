"""Session fixtures: the tiny model exported once, one real Triton server for the whole session, and
the real gateway process in front of it (over real HTTP) for the tests that need it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, settings

from sd_triton.contract import INLINE_UNET_CALLS_METRIC, INLINE_UNET_ROWS_METRIC
from sd_triton.export.pipeline import DEMO_MODEL, ExportOptions, run_export
from sd_triton.gateway.process import GatewayProcess
from sd_triton.paths import STATE_DIR_ENV
from sd_triton.perf.loadgen import parse_metrics
from sd_triton.triton_server import TritonServer

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".cache" / "sd-triton"  # the tiny checkpoint, kept between the test runs of this checkout


def triton_requests(client: grpcclient.InferenceServerClient, model: str = "") -> int:
    """Requests Triton has executed for `model` ("": every model), successes and failures, all versions."""
    total = 0
    for stats in client.get_inference_statistics(model, as_json=True)["model_stats"]:
        inference = stats.get("inference_stats", {})
        total += sum(int(inference.get(k, {}).get("count", 0)) for k in ("success", "fail"))
    return total


def unet_calls(server: TritonServer, settle_s: float = 0.3, timeout_s: float = 30.0) -> tuple[float, float]:
    """(UNet calls, UNet batch rows) so far, whichever path ran them: Triton's `unet` model (the BLS path,
    all versions) plus the loops' own counters (the inline path, sd_triton_inline_unet_*). The loops send
    theirs when they idle, so the figures are read until two reads `settle_s` apart agree."""

    def read() -> tuple[float, float]:
        samples = parse_metrics(httpx.get(server.metrics_url, timeout=10).text)
        calls = rows = 0.0
        for (name, labels), value in samples.items():
            triton_unet = dict(labels).get("model") == "unet"
            if name == INLINE_UNET_CALLS_METRIC or (triton_unet and name == "nv_inference_exec_count"):
                calls += value
            elif name == INLINE_UNET_ROWS_METRIC or (triton_unet and name == "nv_inference_count"):
                rows += value
        return calls, rows

    deadline, last = time.monotonic() + timeout_s, read()
    while True:
        time.sleep(settle_s)
        now = read()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


# Hypothesis property tests: reproducible in CI (derandomized, no example database written)
PROPERTIES = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def no_api_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every gateway a test starts runs open unless the test names a keys file, and every default
    (keys, images, logs, the export's work files) lands in a state directory of the session's: the
    keys and files of the developer's own state directory must not change what the tests see."""
    names = ("SD_GATEWAY_KEYS_FILE", STATE_DIR_ENV)
    previous = {name: os.environ.get(name) for name in names}
    os.environ["SD_GATEWAY_KEYS_FILE"] = str(tmp_path_factory.mktemp("keys") / "no-keys.json")
    os.environ[STATE_DIR_ENV] = str(tmp_path_factory.mktemp("state"))
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model exported (python-ort) into a fresh repository: {'repo', 'manifest'}."""
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    manifest = run_export(ExportOptions(model="tiny", repo=repo, work_dir=WORK_DIR))
    return {"repo": repo, "manifest": manifest}


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demo model exported as `make export` does it (python-ort, default settings)."""
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("no trained demo model in models/demo")
    repo = tmp_path_factory.mktemp("demo") / "repo"
    run_export(ExportOptions(model="demo", repo=repo, work_dir=WORK_DIR))
    return repo


@pytest.fixture(scope="session")
def tiny_checkpoint(exported: dict) -> Path:
    return Path(exported["manifest"]["source"]["path"])


def triton_server(repo: Path, log_file: Path) -> TritonServer:
    """A Triton server (not started) for `repo` on free ports. Its stop drains for 5 s at most: a test
    leaves nothing in flight, but the tokenizer and component calls the tests make alone look like
    requests in flight to the drain (sd_triton.triton_server), which would wait its full 30 s. Triton's
    own exit timeout is 10 s: after a session that cancelled streams, txt2img_stream can stay "live"
    at shutdown until the timeout runs out (docs/RELIABILITY.md), which is 30 s by default."""
    return TritonServer(
        repo,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=log_file,
        drain_timeout_s=5,
        exit_timeout_s=10,
    )


@pytest.fixture(scope="session")
def triton(exported: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = triton_server(exported["repo"], tmp_path_factory.mktemp("triton") / "triton.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spare_server(exported: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A second Triton on the session's repository, for the tests that kill, stop or pair one: started
    once a session (each start costs ~8-9 s of python stubs here). A test may leave it down; take it through
    `spare_triton` or `running`, which restart it."""
    server = triton_server(exported["repo"], tmp_path_factory.mktemp("spare-triton") / "triton.log")
    server.start()
    yield server
    server.stop()


def running(server: TritonServer) -> TritonServer:
    """`server`, started again if an earlier test left it down."""
    if server.process is None or server.process.poll() is not None:
        server.start()
    return server


@pytest.fixture
def spare_triton(spare_server: TritonServer) -> TritonServer:
    return running(spare_server)


@pytest.fixture(scope="session")
def client(triton: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(triton.grpc_url) as c:
        yield c


@pytest.fixture(scope="session")
def gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    log_file = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = GatewayProcess(triton.grpc_url, port=free_port(), log_file=log_file)  # open: no_api_keys
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


class RedisServer:
    """A real redis-server (Debian's, `make system-deps`) on a free port, no persistence; a test
    module may start its own to kill it without touching the session's."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not installed: run `make system-deps`")
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.process.kill()
        pytest.fail("redis-server did not start within 10 s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.kill()
