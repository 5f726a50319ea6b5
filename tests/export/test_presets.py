"""The preset checkpoints in a shared work folder: built once, whole or not at all, and two exports
building the same preset at once (two shells, a benchmark beside an export) both end with the one
published."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from sd_triton.export import presets
from sd_triton.export.presets import PRESETS, ensure_preset_checkpoint
from sd_triton.export.tiny import save_pipeline


def test_an_export_that_loses_the_race_uses_the_published_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tiny"
    build = PRESETS["tiny"]

    def built_while_another_export_publishes() -> StableDiffusionPipeline:
        pipeline = build()
        save_pipeline(pipeline, folder)  # the other export finishes first
        (folder / "published-by-the-other").touch()
        return pipeline

    monkeypatch.setitem(presets.PRESETS, "tiny", built_while_another_export_publishes)
    assert ensure_preset_checkpoint("tiny", folder) == folder
    assert (folder / "published-by-the-other").is_file()  # kept, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no partial folder left behind
    StableDiffusionPipeline.from_pretrained(folder)


def test_an_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "unet").mkdir()  # a process died before writing model_index.json
    ensure_preset_checkpoint("tiny", folder)
    assert (folder / "model_index.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    StableDiffusionPipeline.from_pretrained(folder)
