"""`make demo`'s main step, on the exported tiny model: a valid PNG of the requested size."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from tests.conftest import free_port


def run_demo(repo, out, size: int, ports: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sd_triton.demo", "--repo", str(repo), "--out", str(out)]
    command += ["--size", str(size), "--steps", "4"]
    for flag, port in zip(
        ("--grpc-port", "--http-port", "--metrics-port", "--gateway-port"), ports, strict=True
    ):
        command += [flag, port]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_demo_writes_png(exported: dict, tmp_path) -> None:
    out = tmp_path / "demo.png"
    done = run_demo(exported["repo"], out, 96, [str(free_port()) for _ in range(4)])
    assert done.returncode == 0, done.stdout + done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 96)
    assert f"image: {out}" in done.stdout
    assert "seed: " in done.stdout and "timings (ms): " in done.stdout


def test_demo_stops_servers_when_it_fails(exported: dict, tmp_path) -> None:
    """A failing step (size over the limit) still stops both servers, and the demo says it failed."""
    ports = [str(free_port()) for _ in range(4)]
    done = run_demo(exported["repo"], tmp_path / "x.png", 2048, ports)
    assert done.returncode == 1
    assert "demo failed" in done.stderr and "2048" in done.stderr
    running = subprocess.run(["pgrep", "-f", f"grpc-port={ports[0]}"], capture_output=True, text=True)
    assert running.stdout.strip() == "", "Triton still running"
    running = subprocess.run(["pgrep", "-f", f"--port {ports[3]}"], capture_output=True, text=True)
    assert running.stdout.strip() == "", "gateway still running"
