"""Which extra a command needs, and the message when it is not installed.

The base install is the SDK and `sd-triton generate` (httpx only); every other command lives in a
room whose packages come with an extra: `pip install 'sd-triton[export]'` and so on (README, Install).
"""

from __future__ import annotations

EXTRAS = {
    "runtime": "the denoising loop and engines Triton's python models run (torch, diffusers, ONNX Runtime)",
    "export": "checkpoint -> ONNX -> TensorRT -> model repository, and the engine commands",
    "serve": "the CPU Triton server of nvidia-pytriton, with the export",
    "gateway": "the FastAPI gateway and its API keys",
    "dev": "everything, with the test and benchmark tools",
}


class MissingExtraError(RuntimeError):
    """A command ran without the extra that carries its packages."""


def install_hint(extra: str) -> str:
    return f"pip install 'sd-triton[{extra}]'"


def missing_extra(exc: ModuleNotFoundError, command: str, extra: str | None) -> MissingExtraError | None:
    """The error to show for `exc` raised by `command`, or None when it is not a missing extra (a
    module of sd_triton itself, or a command with no extra: a real bug, raised as it is)."""
    package = (exc.name or "").partition(".")[0]
    if extra is None or not package or package == "sd_triton":
        return None
    return MissingExtraError(
        f"sd-triton {command} needs the [{extra}] extra ({EXTRAS[extra]}); "
        f"the package {package!r} is not installed: {install_hint(extra)}"
    )
