"""`sd-triton triton`: starts the CPU server, says where its log is, drains on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import tritonclient.grpc as grpcclient

from sd_triton.triton_server import TritonServer, server_env
from sd_triton.txt2img_client import txt2img
from tests.conftest import free_port


def test_server_env_puts_this_venv_first() -> None:
    env = server_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": ""})
    assert env["PATH"].split(":")[0] == str(__import__("pathlib").Path(sys.executable).parent)
    assert "libpython" not in env["LD_LIBRARY_PATH"] and env["LD_LIBRARY_PATH"]


def test_cli_serves_and_drains_on_sigterm(exported: dict, tmp_path) -> None:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log_file = tmp_path / "triton.log"
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sd_triton.cli",
            "triton",
            "--repo",
            str(exported["repo"]),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
            "--log-file",
            str(log_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    probe = TritonServer(exported["repo"], http_port=http_port)
    deadline = time.monotonic() + 180
    while not probe.ready():
        assert cli.poll() is None, cli.stdout.read() if cli.stdout else ""
        assert time.monotonic() < deadline, "Triton did not become ready"
        time.sleep(0.5)

    # a long request in flight when SIGTERM arrives still completes
    outcome: dict = {}

    def long_request() -> None:
        with grpcclient.InferenceServerClient(f"localhost:{grpc_port}") as client:
            try:
                outcome["result"] = txt2img(
                    client,
                    "a lighthouse",
                    height=64,
                    width=64,
                    steps=80,
                    guidance_scale=7.5,
                    seed=1,
                    scheduler="euler",
                    num_images=2,
                )
            except Exception as exc:  # noqa: BLE001 - the assertion below reports it
                outcome["error"] = exc

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)
    cli.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    output, _ = cli.communicate(timeout=120)
    assert "error" not in outcome, repr(outcome.get("error")) + str(
        getattr(outcome.get("error"), "message", lambda: "")()
    )
    assert outcome["result"].images.shape == (2, 64, 64, 3)
    assert cli.returncode == 0, output
    assert str(log_file) in output
    assert "Triton stopped with exit code 0" in output
