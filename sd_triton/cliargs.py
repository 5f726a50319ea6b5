"""Settings dataclasses from parsed command-line options: each field takes the option of the same name
(`--max-wait-us` is `max_wait_us`), so a setting added to both is wired without a third list."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_args(cls: type[T], args: argparse.Namespace, **converted: Any) -> T:
    """`cls(...)` from the options named like its fields; `converted`: fields whose option is spelled or
    typed otherwise (they win over an option of the same name)."""
    options = vars(args)
    named = {f.name: options[f.name] for f in fields(cls) if f.name in options}  # type: ignore[arg-type]
    return cls(**{**named, **converted})
