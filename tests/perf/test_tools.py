"""`make perf-tools` puts a working perf_analyzer in .tools/ and leaves the venv's tritonclient alone."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sd_triton.perf.tools import ensure_perf_analyzer, perf_analyzer_path, works

ROOT = Path(__file__).resolve().parents[2]


def test_perf_analyzer_is_installed_once_and_runs() -> None:
    tools = ROOT / ".tools"
    wrapper = ensure_perf_analyzer(tools)  # `make test` ran `make perf-tools` already
    assert wrapper == perf_analyzer_path(tools)
    assert works(wrapper)
    binary = tools / "perf_analyzer" / "libexec" / "perf_analyzer"
    before = binary.stat().st_mtime_ns
    assert ensure_perf_analyzer(tools) == wrapper  # idempotent: nothing downloaded again
    assert binary.stat().st_mtime_ns == before


def test_the_venv_keeps_its_own_tritonclient() -> None:
    assert importlib.metadata.version("tritonclient") != "2.41.1"


def test_a_missing_tool_does_not_count_as_working(tmp_path: Path) -> None:
    assert not works(perf_analyzer_path(tmp_path))
    broken = tmp_path / "perf_analyzer"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries' >&2\nexit 127\n")
    broken.chmod(0o755)
    assert not works(broken)
