"""`make perf-tools`: a working perf_analyzer in a project tool folder, without touching the venv's
tritonclient.

The binary ships inside the `tritonclient==2.41.1` manylinux1 wheel (newer perf-analyzer wheels need
glibc 2.38); it links against Debian's libb64 and CUDA's runtime library, which it loads even on a
machine without a GPU. All three come from package registries and are unpacked, not installed:

    <tools>/perf_analyzer/bin/perf_analyzer   the wrapper to call (sets LD_LIBRARY_PATH)
    <tools>/perf_analyzer/libexec/perf_analyzer
    <tools>/perf_analyzer/lib/{libb64.so.0d, libcudart.so.12}
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

TOOLS_DIR = Path(".tools")
TRITONCLIENT_WHEEL = "tritonclient==2.41.1"
CUDA_RUNTIME_WHEEL = "nvidia-cuda-runtime-cu12==12.4.127"
LIBB64_PACKAGE = "libb64-0d"
WRAPPER = """#!/bin/sh
# perf_analyzer from the tritonclient 2.41.1 wheel, with its libraries (written by `make perf-tools`)
here="$(cd "$(dirname "$0")/.." && pwd)"
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/libexec/perf_analyzer" "$@"
"""


class ToolError(RuntimeError):
    pass


def perf_analyzer_path(tools_dir: Path = TOOLS_DIR) -> Path:
    return tools_dir / "perf_analyzer" / "bin" / "perf_analyzer"


def _run(command: list[str], cwd: Path) -> None:
    log.info("perf-tools: %s", " ".join(command))
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def _pip_download(requirement: str, dest: Path) -> Path:
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", ".", requirement],
        dest,
    )
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if not wheels:
        raise ToolError(f"pip downloaded no wheel for {requirement} into {dest}")
    return wheels[0]


def _extract(wheel: Path, member_suffix: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(member_suffix)]
        if not members:
            raise ToolError(f"{wheel.name} has no file ending in {member_suffix}")
        with archive.open(members[0]) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out)


def _debian_library(package: str, library: str, work: Path, target: Path) -> None:
    try:
        _run(["apt-get", "download", package], work)
    except ToolError:  # stale package lists
        _run(["apt-get", "update", "-qq"], work)
        _run(["apt-get", "download", package], work)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise ToolError(f"apt-get downloaded no {package} package")
    _run(["dpkg-deb", "-x", debs[0].name, "root"], work)
    found = sorted((work / "root").rglob(library))
    if not found:
        raise ToolError(f"{debs[0].name} has no {library}")
    shutil.copyfile(found[0], target)


def works(wrapper: Path) -> bool:
    """perf_analyzer starts and prints its usage (it exits non-zero without a model name)."""
    if not wrapper.is_file():
        return False
    done = subprocess.run([str(wrapper), "--help"], capture_output=True, text=True)
    return "perf_analyzer" in done.stdout + done.stderr and "error while loading" not in done.stderr


def ensure_perf_analyzer(tools_dir: Path = TOOLS_DIR) -> Path:
    """Install perf_analyzer into `tools_dir` unless a working one is there; return the wrapper."""
    wrapper = perf_analyzer_path(tools_dir)
    if works(wrapper):
        log.info("perf-tools: %s works, nothing to do", wrapper)
        return wrapper
    home = tools_dir / "perf_analyzer"
    partial = tools_dir / "perf_analyzer.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for folder in ("bin", "libexec", "lib"):
        (partial / folder).mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="perf-tools-") as tmp:
        work = Path(tmp)
        # 1. The binary from the old tritonclient wheel (downloaded, never installed).
        binary = partial / "libexec" / "perf_analyzer"
        _extract(_pip_download(TRITONCLIENT_WHEEL, work), "/data/bin/perf_analyzer", binary)
        binary.chmod(0o755)
        # 2. Its libraries: CUDA's runtime from a wheel, libb64 from Debian.
        _extract(
            _pip_download(CUDA_RUNTIME_WHEEL, work),
            "/lib/libcudart.so.12",
            partial / "lib" / "libcudart.so.12",
        )
        _debian_library(LIBB64_PACKAGE, "libb64.so.0d", work, partial / "lib" / "libb64.so.0d")
    # 3. The wrapper, then the folder swapped in whole.
    (partial / "bin" / "perf_analyzer").write_text(WRAPPER)
    (partial / "bin" / "perf_analyzer").chmod(0o755)
    if not works(partial / "bin" / "perf_analyzer"):
        raise ToolError(
            f"perf_analyzer in {partial} does not start; see `{partial}/bin/perf_analyzer --help`"
        )
    shutil.rmtree(home, ignore_errors=True)
    partial.rename(home)
    log.info("perf-tools: installed %s", wrapper)
    return wrapper


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="install perf_analyzer into a project tool folder")
    parser.add_argument("--tools-dir", type=Path, default=TOOLS_DIR)
    args = parser.parse_args()
    logging.getLogger(__name__).info("perf_analyzer: %s", ensure_perf_analyzer(args.tools_dir))


if __name__ == "__main__":
    main()
