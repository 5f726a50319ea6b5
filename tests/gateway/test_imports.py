"""The gateway stays free of torch/diffusers/transformers; the SDK needs only httpx."""

from __future__ import annotations

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_gateway_is_torch_free() -> None:
    modules = imported_after("import gateway.main, sd_triton.cli")
    assert not modules & {"torch", "diffusers", "transformers", "onnxruntime"}, modules


def test_sdk_needs_only_httpx() -> None:
    modules = imported_after("import sd_triton.sdk")
    assert "httpx" in modules
    assert not modules & {"fastapi", "tritonclient", "numpy", "torch", "pydantic", "PIL"}, modules
