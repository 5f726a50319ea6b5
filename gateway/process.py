"""Run the gateway as a child process (for `make demo` and the tests) and wait until it answers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sd_triton import paths

log = logging.getLogger(__name__)


@dataclass
class GatewayProcess:
    triton_url: str
    port: int = 8080
    host: str = "127.0.0.1"
    log_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sd_triton.cli", "gateway",
            "--triton-url", self.triton_url, "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip

    def start(self, timeout_s: float = 60.0, wait_ready: bool = True) -> GatewayProcess:
        command = self.command()
        self.log_file = self.log_file or paths.logs_dir() / f"gateway-{self.port}.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting the gateway on %s; log: %s", self.url, self.log_file)
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        path = "/readyz" if wait_ready else "/healthz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"gateway not answering {path} after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # uvicorn finishes the requests in flight
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
