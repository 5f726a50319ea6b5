"""Start and stop a real Triton server: the CPU build bundled in the nvidia-pytriton wheel.

Facts this relies on (DESIGN.md): the python backend's stub must be copied next to the backend;
the stub's embedded Python finds its environment from `python3` on PATH, so this virtualenv's
`bin/` goes first; libpython's folder goes on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sd_triton import paths
from sd_triton.contract import STREAM_IN_FLIGHT_METRIC, TOKENIZER, TXT2IMG, TXT2IMG_STREAM

log = logging.getLogger(__name__)


class TritonStartError(RuntimeError):
    pass


def pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed: it carries the Triton server binary")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def prepare_backends() -> tuple[Path, Path]:
    """(tritonserver binary, backends folder), with the python backend stub in place."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = root / "backends" / "python" / stub.name
    if not stub.is_file():
        raise TritonStartError(f"no python backend stub for Python {version} in {stub.parent.parent}")
    if not target.is_file() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    return root / "bin" / "tritonserver", root / "backends"


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


@dataclass
class TritonServer:
    repo: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_file: Path | None = None
    exit_timeout_s: int = 30
    # how long `stop` waits for txt2img requests in flight (None: exit_timeout_s). The count comes from
    # the tokenizer's statistics, so a direct call to the tokenizer (perf_analyzer -m tokenizer) looks
    # like a request in flight until the server stops, and the drain then waits this long.
    drain_timeout_s: float | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        binary, backends = prepare_backends()
        return [
            str(binary),
            f"--model-repository={Path(self.repo).resolve()}",
            f"--backend-directory={backends}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            # explicit model control: `sd-triton engine set` loads a new engine version while the old serves
            "--model-control-mode=explicit",
            "--load-model=*",
            # every config.pbtxt here is complete (export writes them from the contract); without this
            # flag the python backend starts one extra stub per model only to ask it for config
            # additions, importing torch and diffusers twice: Triton's start here took 18.5-20.6 s,
            # with the flag 8.0-9.0 s (docs/engines.md)
            "--disable-auto-complete-config",
            "--log-verbose=0",
        ]

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        if self.log_file is None:
            self.log_file = paths.logs_dir() / f"triton-{self.grpc_port}.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.info(
            "starting Triton on gRPC :%d, HTTP :%d; log: %s", self.grpc_port, self.http_port, self.log_file
        )
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonStartError(f"Triton exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                log.info("Triton ready (pid %d)", self.process.pid)
                return self
            time.sleep(0.5)
        self.stop()
        raise TritonStartError(f"Triton not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://localhost:{self.http_port}/v2/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        if self.log_file is None or not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def _completed(self, model: str) -> int:
        url = f"http://localhost:{self.http_port}/v2/models/{model}/stats"
        with urllib.request.urlopen(url, timeout=2) as r:
            stats = json.load(r)["model_stats"]
        return sum(s["inference_stats"][k]["count"] for s in stats for k in ("success", "fail"))

    def _streams_in_flight(self) -> int:
        """txt2img_stream requests not yet answered: the gauge that model keeps on the metrics port."""
        with urllib.request.urlopen(self.metrics_url, timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(STREAM_IN_FLIGHT_METRIC + "{"):
                    return int(float(line.rsplit(" ", 1)[1]))
        return 0

    def pipelines_in_flight(self) -> int:
        """txt2img requests past the tokenizer and not yet answered, and txt2img_stream requests."""
        # the stream model's own tokenizer calls count in the tokenizer's total, not in txt2img's
        ensemble = self._completed(TOKENIZER.name) - self._completed(TXT2IMG.name)
        ensemble -= self._completed(TXT2IMG_STREAM.name)
        return max(0, ensemble) + self._streams_in_flight()

    def drain(self, timeout_s: float) -> bool:
        """Wait until no txt2img request is in flight. Triton's own shutdown refuses the next step
        of an ensemble and the BLS calls of a running denoise loop, so multi-step requests must
        finish before it starts."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                in_flight = self.pipelines_in_flight()
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError):
                return False
            if in_flight == 0:
                return True
            log.info("draining: %d txt2img request(s) in flight", in_flight)
            time.sleep(0.5)
        log.warning("drain timed out after %.0f s", timeout_s)
        return False

    def stop(self) -> int | None:
        """Drain txt2img requests, then SIGTERM: Triton stops taking requests and finishes the
        single-model ones in flight (up to exit_timeout_s)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.drain(self.exit_timeout_s if self.drain_timeout_s is None else self.drain_timeout_s)
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=self.exit_timeout_s + 15)
        except subprocess.TimeoutExpired:
            log.warning("Triton did not stop in time; killing it")
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
