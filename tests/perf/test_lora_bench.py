"""`sd-triton perf lora`'s parts: its synthetic adapters are real ones (the library takes them, they target
the UNet and the text encoder with non-zero factors), and its verdict follows the rounds' spread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sd_triton.export import lora
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.perf.lora import synthetic_adapter, table
from tests.conftest import WORK_DIR


def test_synthetic_adapters_are_taken_by_the_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    repo = tmp_path / "repo"
    run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR))
    checkpoint = Path(json.loads((repo / "manifest.json").read_text())["source"]["path"])
    file = synthetic_adapter(checkpoint, tmp_path / "a.safetensors", seed=1, rank=8)
    assert all(np.abs(v).max() > 0 for v in load_file(str(file)).values())
    record = lora.add(repo, file, "bench")
    assert set(record.components) == {"unet", "text_encoder"} and record.rank == 8


@pytest.mark.parametrize(
    ("rates", "verdict"),
    [((1.0, 0.9, 0.95), "met"), ((0.6, 0.7, 0.75), "missed"), ((0.7, 0.85, 0.9), "INCONCLUSIVE")],
)
def test_the_verdict_follows_the_spread(rates: tuple[float, ...], verdict: str) -> None:
    document = {
        "settings": {"preset": "tiny", "steps": 10, "concurrency": 8, "requests": 32, "rounds": 3, "rank": 8},
        "size": [64, 64],
        "images_per_s": {"base": [10.0] * 3, "mixed": [10 * r for r in rates]},
        "mixed_over_base": sorted(rates)[1],
        "mixed_over_base_spread": [min(rates), max(rates)],
        "target": 0.8,
        "time_to_usable": {"add_s": 0.5, "first_request_ms": 120.0, "warm_request_ms": 80.0},
    }
    assert f"target >= 0.8: {verdict}" in table(document)
