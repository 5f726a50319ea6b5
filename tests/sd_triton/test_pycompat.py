"""`make lint` holds runtime code to Python 3.10 (the NGC Triton image's), standard-library APIs
included: `make pycompat` (vermin, part of `make lint`) fails on a 3.11-only call placed in a copy of
runtime code and passes on the code as it is."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_FILE = ROOT / "sd_triton" / "runtime" / "denoise.py"


def pycompat(*paths: Path) -> subprocess.CompletedProcess[str]:
    """The Makefile's own target, on `paths` instead of the package."""
    variable = "PYCOMPAT_PATHS=" + " ".join(str(p) for p in paths)
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "pycompat", variable],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_runtime_code_passes() -> None:
    result = pycompat(RUNTIME_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("addition", "named"),
    [
        ("from datetime import UTC\n", "datetime.UTC"),  # a name: the syntax is 3.0's
        ("import tomllib\n", "tomllib"),  # a module
        (
            "import asyncio\n\nasync def f():\n    async with asyncio.TaskGroup() as group:\n        pass\n",
            "asyncio.TaskGroup",
        ),  # fmt: skip
    ],
)
def test_a_311_only_call_in_runtime_code_fails(tmp_path: Path, addition: str, named: str) -> None:
    copy = tmp_path / "denoise.py"
    shutil.copyfile(RUNTIME_FILE, copy)
    copy.write_text(copy.read_text() + "\n\n" + addition)
    result = pycompat(copy)
    assert result.returncode != 0, f"{named} went unnoticed:\n{result.stdout}"
    assert named in result.stdout and "3.11" in result.stdout, result.stdout
