"""Where sd-triton keeps its state, wherever a command runs from: one absolute folder.

`SD_TRITON_STATE_DIR` when set; else `$XDG_STATE_HOME/sd-triton`; else `~/.local/state/sd-triton`.
Inside it: `api-keys.json` (the gateway's keys), `images/` (stored results), `logs/` (the servers'
logs), `work/` (the export's preset checkpoints and TensorRT timing cache). Each can still be set on
its own (SD_GATEWAY_KEYS_FILE, --log-file, ...); the defaults no longer depend on the current folder.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "SD_TRITON_STATE_DIR"


def state_dir() -> Path:
    """The state folder (not created here), always absolute."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "sd-triton").resolve()


def keys_file() -> Path:
    return state_dir() / "api-keys.json"


def images_dir() -> Path:
    return state_dir() / "images"


def logs_dir() -> Path:
    return state_dir() / "logs"


def work_dir() -> Path:
    return state_dir() / "work"
