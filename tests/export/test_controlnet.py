"""ControlNet export (export/controlnet.py): each ControlNet's graph and the controlled UNet, checked
against the UNet; the residual shapes the TensorRT profiles use are the graphs' own; idempotent; a
ControlNet of another base and bad options are refused naming what is wrong."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sd_triton import control
from sd_triton.contract import Limits
from sd_triton.export.checkpoint import Checkpoint
from sd_triton.export.controlnet import (
    ControlledUNet,
    ControlNetComponent,
    ControlNetError,
    ControlNetModule,
    check_against_unet,
    load_controlnet,
    parse_option,
    residual_shapes,
)
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import RepositorySettings
from tests.conftest import WORK_DIR


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    repo = tmp_path_factory.mktemp("controlnet") / "model_repository"
    manifest = run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR, controlnets={"edges": "random:1"}))
    return {
        "repo": repo,
        "checkpoint": Checkpoint.open(Path(manifest["source"]["path"])),
        "manifest": manifest,
    }


def test_the_graphs_residuals_are_the_shapes_the_profiles_use(exported: dict) -> None:
    """The ControlNet's outputs at the profile's min and opt latent sizes (and an odd size) have the shapes
    residual_shapes gives and the controlled UNet's profile expects; the controlled UNet takes them."""
    repo, checkpoint = exported["repo"], exported["checkpoint"]
    unet_config = json.loads((checkpoint.path / "unet" / "config.json").read_text())
    graph = ort.InferenceSession(str(control.library_dir(repo) / "edges" / "model.onnx"))
    variant = ort.InferenceSession(str(control.controlled_unet_dir(repo) / "model.onnx"))
    profile = ControlledUNet(unet_config).profile(checkpoint.dims, Limits()).shapes
    dims, rng = checkpoint.dims, np.random.default_rng(0)
    for index, (h, w) in enumerate([(1, 1), (64, 64), (9, 11)]):
        feeds = {
            "sample": rng.normal(size=(1, 4, h, w)).astype(np.float32),
            "timestep": np.array([[400.0]], np.float32),
            "encoder_hidden_states": rng.normal(size=(1, 77, dims.text_hidden)).astype(np.float32),
            control.CONDITION: rng.random((1, 3, 8 * h, 8 * w)).astype(np.float32),
        }
        names = [o.name for o in graph.get_outputs()]
        outputs = dict(zip(names, graph.run(names, feeds), strict=True))
        down, mid = residual_shapes(unet_config, (h, w))
        assert [tuple(outputs[n].shape[1:]) for n in names] == [*down, mid]
        if index < 2:  # the profile's min (latent 1) and opt (512 px: latent 64) shapes, batch aside
            assert all(tuple(outputs[n].shape[1:]) == profile[n][index][1:] for n in names)
        noise = variant.run(
            None, {k: feeds[k] for k in ("sample", "timestep", "encoder_hidden_states")} | outputs
        )
        assert noise[0].shape == (1, 4, h, w)


def test_a_re_export_keeps_what_is_unchanged_and_drops_what_it_does_not_name(exported: dict) -> None:
    repo = exported["repo"]
    graph = control.library_dir(repo) / "edges" / "model.onnx"
    before = graph.stat().st_mtime_ns, (control.controlled_unet_dir(repo) / "model.onnx").stat().st_mtime_ns
    both = {"edges": "random:1", "depth": "random:2"}
    manifest = run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR, controlnets=both))
    after = graph.stat().st_mtime_ns, (control.controlled_unet_dir(repo) / "model.onnx").stat().st_mtime_ns
    assert before == after and manifest["controlnets"] == {"edges": "random:1", "depth": "random:2"}
    parameters = (repo / "txt2img" / "config.pbtxt").read_text()
    assert "depth" in parameters and "edges" in parameters  # /v1/models reads them from txt2img's config
    run_export(ExportOptions("tiny", repo, work_dir=WORK_DIR, controlnets={"edges": "random:1"}))
    assert [r.name for r in control.records(control.library_dir(repo))] == ["edges"]


def test_tensorrt_pipelines_get_plans_where_a_gpu_builds_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipeline whose UNet is `tensorrt` asks for plans of the ControlNets and the controlled UNet; here
    (no GPU) each is reported not built, and the graphs are served by ONNX Runtime."""
    from sd_triton.export.tensorrt import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT builds here: the plans are built (checked on the GPU host)")
    engines = {"text_encoder": "python-ort", "unet": "tensorrt", "vae_decoder": "python-ort",
               "vae_encoder": "python-ort"}  # fmt: skip
    settings = RepositorySettings(engines=engines)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        run_export(ExportOptions("tiny", tmp_path / "repo", settings=settings, work_dir=WORK_DIR,
                                 controlnets={"edges": "random:1"}))  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "TensorRT plan NOT built" in r.getMessage()]
    assert len(warned) == 2 and any("controlnet edges" in w for w in warned), warned
    from sd_triton.runtime.controlnets import ControlNetLibrary
    from sd_triton.runtime.ort_runner import OrtRunner

    assert isinstance(ControlNetLibrary(tmp_path / "repo" / "denoise").runner("edges"), OrtRunner)


def test_a_controlnet_of_another_base_and_bad_options_are_refused(exported: dict) -> None:
    checkpoint = exported["checkpoint"]
    unet_config = json.loads((checkpoint.path / "unet" / "config.json").read_text())
    _, model = load_controlnet("random:1", checkpoint.path, WORK_DIR)
    check_against_unet("edges", dict(model.config), unet_config)  # its own base: fits
    for key, value, words in (
        ("block_out_channels", [16, 32], "its block_out_channels is [16, 32]"),
        ("cross_attention_dim", 768, "its cross_attention_dim is 768"),
        ("in_channels", 9, "takes 9 latent channels"),
    ):
        with pytest.raises(ControlNetError, match="edges") as caught:
            check_against_unet("edges", {**dict(model.config), key: value}, unet_config)
        assert words in str(caught.value)
    for option, words in (
        ("edges", "expected NAME=PATH"),
        ("Bad Name=x", "name 'Bad Name'"),
        ("e=", "NAME=PATH"),
    ):
        with pytest.raises(ControlNetError, match="--controlnet") as caught:
            parse_option(option)
        assert words in str(caught.value)
    with pytest.raises(ControlNetError, match="not a diffusers ControlNetModel folder"):
        load_controlnet(str(checkpoint.path / "vae"), checkpoint.path, WORK_DIR)
    component = ControlNetComponent("edges", ControlNetModule(model), unet_config)
    assert component.output_names[-1] == control.MID and len(component.output_names) == component.count + 1
