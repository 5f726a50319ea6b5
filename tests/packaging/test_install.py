"""The wheel, installed as users install it: not editable, in fresh virtualenvs outside this checkout.

1. The base install (`pip install sd-triton`): the SDK and `sd-triton generate` with httpx only, no torch;
   a command of another room names the extra it needs; `sd-triton generate` draws through a real gateway.
2. The full install (`sd-triton[export,serve,gateway]`): `sd-triton export --model tiny` writes a complete
   repository (every python model's model.py, from the wheel alone), `sd-triton triton` serves it and
   `sd-triton gateway` + `sd-triton generate` get an image through it — every process from that venv,
   run from a folder where no source tree can be imported.

Installs use pip's cache (the packages `make setup` fetched) and `--no-compile` to keep CI short. The full
install's dependencies are hard links to this venv's (the same pins, installed from the index by `make
setup`), so pip only resolves the extras against them and installs the wheel: 1.5 GB of dependencies
installed again took 90 of the test's 130 s. `SD_TRITON_TEST_FRESH_INSTALL=1` installs them from the
index instead (as a release check), as does a temporary folder on another file system.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
OPEN_CLIP = "open-clip-torch==3.3.0"  # the CLIP vocabulary of the tiny model (Makefile: --no-deps)
HEAVY = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "nvidia-pytriton", "tritonclient")


def find_python(version: str) -> str | None:
    """An interpreter of `version` on this machine (on PATH, or pyenv's), or None."""
    pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")
    for candidate in filter(None, [shutil.which(f"python{version}"), *sorted(glob.glob(pattern))]):
        done = subprocess.run([candidate, "--version"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.startswith(f"Python {version}."):
            return candidate
    return None


def run(
    command: list[str], cwd: Path, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """A command with no trace of this checkout in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


# this venv's own install of the checkout, and the installer itself (the new venv has its own)
NOT_SEEDED = ("sd_triton", "__editable__", "pip", "setuptools", "_distutils_hack", "distutils-precedence")


def seed_site_packages(folder: Path) -> bool:
    """Hard links of this venv's installed distributions (not the checkout's own) into the venv at
    `folder`; False (nothing linked) on another file system or when a fresh install is asked for."""
    source = Path(sysconfig.get_paths()["purelib"])
    target = folder / source.relative_to(sys.prefix)
    if os.environ.get("SD_TRITON_TEST_FRESH_INSTALL") == "1" or source.stat().st_dev != target.stat().st_dev:
        return False
    entries = [str(p) for p in sorted(source.iterdir()) if not p.name.startswith(NOT_SEEDED)]
    run(["cp", "-al", *entries, str(target)], cwd=folder.parent)
    return True


def make_venv(
    folder: Path,
    *requirements: str,
    no_deps: tuple[str, ...] = (),
    python: str = sys.executable,
    seeded: bool = False,
) -> Path:
    run([python, "-m", "venv", str(folder)], cwd=folder.parent)
    if seeded and seed_site_packages(folder):
        logging.getLogger(__name__).info("%s: dependencies linked from %s", folder, sys.prefix)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]
    run([*pip, *requirements], cwd=folder.parent)
    if no_deps:
        run([*pip, "--no-deps", *no_deps], cwd=folder.parent)
    return folder / "bin"


def installed(bin_dir: Path, cwd: Path) -> set[str]:
    listing = run([str(bin_dir / "python"), "-m", "pip", "list", "--format=json"], cwd=cwd).stdout
    return {entry["name"].lower() for entry in json.loads(listing)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
         str(ROOT)], cwd=out)  # fmt: skip
    (path,) = out.glob("sd_triton-*.whl")
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working folder with no source tree in it: `python -c` and the commands import the install."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_wheel_has_one_namespace_and_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.startswith("sd_triton-")}
    assert top == {"sd_triton"}, f"top-level names besides sd_triton: {top}"
    for package in ("export", "gateway", "perf", "runtime"):
        assert f"sd_triton/{package}/__init__.py" in names, package
    assert {"sd_triton/gateway/static/index.html", "sd_triton/gateway/static/app.js"} <= set(names)


def test_base_install_is_the_sdk_without_torch(wheel: Path, tmp_path: Path, outside: Path, gateway) -> None:
    """On the oldest Python supported (3.10, the NGC Triton image's) when this machine has one."""
    python = find_python("3.10") or sys.executable
    bin_dir = make_venv(tmp_path / "base", str(wheel), python=python)
    version = run([str(bin_dir / "python"), "--version"], cwd=outside).stdout.strip()
    logging.getLogger(__name__).info("base install on %s", version)
    packages = installed(bin_dir, outside)
    assert not packages & set(HEAVY), f"the base install pulled {sorted(packages & set(HEAVY))}"
    assert "httpx" in packages
    where = run([str(bin_dir / "python"), "-c", "import sd_triton.sdk, sd_triton; print(sd_triton.__file__)"],
                cwd=outside).stdout  # fmt: skip
    assert str(tmp_path / "base") in where and str(ROOT) not in where

    # a room's command without its extra: exit 3 and the extra to install, no traceback
    refused = run([str(bin_dir / "sd-triton"), "export", "--model", "tiny"], cwd=outside, check=False)
    assert refused.returncode == 3, refused.stderr
    assert "pip install 'sd-triton[export]'" in refused.stderr and "Traceback" not in refused.stderr
    refused = run([str(bin_dir / "sd-triton"), "gateway"], cwd=outside, check=False)
    assert refused.returncode == 3 and "sd-triton[gateway]" in refused.stderr, refused.stderr

    # what the base install is for: an image from a running gateway
    out = outside / "lighthouse.png"
    run([str(bin_dir / "sd-triton"), "generate", "a lighthouse", "-o", str(out), "--gateway-url", gateway.url,
         "--steps", "2", "--seed", "3"], cwd=outside)  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("version", ["3.10", "3.12"])
def test_every_module_compiles_on(wheel: Path, tmp_path: Path, version: str) -> None:
    """The grammar of every module in the wheel on the oldest and newest Python supported (vermin in
    `make lint` checks the standard-library APIs; this runs the real compilers)."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine (looked on PATH and in ~/.pyenv/versions)")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "unpacked")
    sources = sorted(str(p) for p in (tmp_path / "unpacked" / "sd_triton").rglob("*.py"))
    assert len(sources) > 50
    script = "import py_compile, sys\nfor path in sys.argv[1:]:\n    py_compile.compile(path, doraise=True)\n"
    run([python, "-W", "error::SyntaxWarning", "-c", script, *sources], cwd=tmp_path)


class Served:
    """`sd-triton triton` and `sd-triton gateway` of one venv, as background processes."""

    def __init__(self, bin_dir: Path, cwd: Path) -> None:
        self.bin_dir, self.cwd = bin_dir, cwd
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, ready_url: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        log = open(self.cwd / f"{name}.log", "wb")  # noqa: SIM115 - kept open while it runs
        process = subprocess.Popen([str(self.bin_dir / "sd-triton"), name, *args], cwd=self.cwd, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.processes.append(process)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited {process.returncode}: {self.log(name)}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{name} not ready at {ready_url}: {self.log(name)}")

    def log(self, name: str) -> str:
        return (self.cwd / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def test_full_install_exports_serves_and_generates(wheel: Path, tmp_path: Path, outside: Path) -> None:
    bin_dir = make_venv(
        tmp_path / "full", f"{wheel}[export,serve,gateway]", no_deps=(OPEN_CLIP,), seeded=True
    )
    # every requirement met (open-clip-torch is installed without its own, as `make setup` does)
    checked = run([str(bin_dir / "python"), "-m", "pip", "check"], cwd=outside, check=False).stdout
    assert [line for line in checked.splitlines() if not line.startswith("open-clip-torch ")] == [], checked
    where = run([str(bin_dir / "python"), "-c", "import sd_triton.export; print(sd_triton.export.__file__)"],
                cwd=outside).stdout  # fmt: skip
    assert str(tmp_path / "full") in where and str(ROOT) not in where

    # 1. The export, from the wheel alone: every python model gets its model.py.
    repo = outside / "model_repository"
    run([str(bin_dir / "sd-triton"), "export", "--model", "tiny", "--repo", str(repo)], cwd=outside)
    python_models = sorted(
        p.parent.name for p in repo.glob("*/config.pbtxt") if 'backend: "python"' in p.read_text()
    )
    assert len(python_models) >= 4, python_models
    for model in python_models:
        text = (repo / model / "1" / "model.py").read_text()
        assert "from sd_triton.runtime." in text and "TritonPythonModel" in text, model

    # 2. Triton and the gateway from that venv; 3. one image through them.
    grpc, http, metrics, port = free_port(), free_port(), free_port(), free_port()
    served = Served(bin_dir, outside)
    try:
        ports = ["--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)]
        served.start(
            "triton", "--repo", str(repo), *ports, ready_url=f"http://127.0.0.1:{http}/v2/health/ready"
        )
        gateway = f"http://127.0.0.1:{port}"
        served.start(
            "gateway", "--triton-url", f"127.0.0.1:{grpc}", "--port", str(port), ready_url=f"{gateway}/readyz"
        )
        out = outside / "fox.png"
        generate = [
            "generate",
            "a red fox",
            "-o",
            str(out),
            "--steps",
            "3",
            "--seed",
            "1",
            "--gateway-url",
            gateway,
        ]
        run([str(bin_dir / "sd-triton"), *generate], cwd=outside)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        models = httpx.get(f"{gateway}/v1/models", timeout=10).json()
        assert models["data"][0]["default_scheduler_class"] == "PNDMScheduler"  # the tiny checkpoint's own
    finally:
        served.stop()
