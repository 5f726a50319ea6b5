"""The layers of pyproject.toml's [tool.importlinter] hold on this tree (`make lint` runs them too), and
each contract breaks when a forbidden import is added to a copy of the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(source_root: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sd_triton with its linked rooms (export, gateway, perf) copied as plain folders."""
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(
        ROOT / "sd_triton", root / "src" / "sd_triton", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root / "src"


def test_this_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        # the runtime (inside Triton) reaching up into the export
        ("runtime/denoise.py", "from sd_triton.export import components", "sd_triton layers"),
        # the contract reaching up into the gateway
        ("contract.py", "import sd_triton.gateway.schemas", "sd_triton layers"),
        # the gateway importing the runtime, or torch
        ("gateway/cache.py", "from sd_triton.runtime import schedulers", "the gateway runs without"),
        ("gateway/images.py", "import torch", "the gateway runs without"),
        # the SDK needing numpy
        ("sdk.py", "import numpy", "the base install"),
        # inside the gateway: a foundation (the schemas) reaching up into generation or the routes
        ("gateway/schemas.py", "from sd_triton.gateway import service", "the gateway: entry points"),
        ("gateway/triton/pool.py", "from sd_triton.gateway.api import ops", "the gateway: entry points"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    package_copy: Path, tmp_path: Path, module: str, statement: str, contract: str
) -> None:
    target = package_copy / "sd_triton" / module
    original = target.read_text()
    target.write_text(original + f"\n{statement}  # added by the test\n")
    try:
        result = lint_imports(package_copy, tmp_path)
    finally:
        target.write_text(original)
    assert result.returncode != 0, f"{module}: `{statement}` went unnoticed\n{result.stdout}"
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout
    assert module.replace("/", ".").removesuffix(".py") in broken, "the report names the importing module"
