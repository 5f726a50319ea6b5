"""An SDXL checkpoint (`tiny-xl`) through the export: every engine kind's config and profile, the VAE kept
FP32 where the checkpoint says FP16 overflows in it, the ONNX graphs against the SDXL contract, and the
exported engines (ONNX and PyTorch) run in process against diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sd_triton import contract as c
from sd_triton.export.checkpoint import Checkpoint
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.repository import CONFIG_FILE, RepositorySettings, parse
from sd_triton.runtime.local import LocalPipeline
from tests.conftest import WORK_DIR
from tests.export.test_contract import check_config_against_contract
from tests.integration.test_parity import MAX_ABS_DIFF, max_abs_diff

PROMPT = "a lighthouse on a cliff at dusk"
XL = c.models("sdxl")


def _export(tmp: pytest.TempPathFactory, name: str, **settings: object) -> tuple[Path, dict]:
    repo = tmp.mktemp(name) / "repo"
    return repo, run_export(
        ExportOptions("tiny-xl", repo, settings=RepositorySettings(**settings), work_dir=WORK_DIR)  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """tiny-xl with python-torch text encoder and UNet (the ONNX graphs are exported too)."""
    engines = {
        **dict.fromkeys(c.ENGINE_MODELS, "python-ort"),
        "text_encoder": "python-torch",
        "unet": "python-torch",
    }
    return _export(tmp_path_factory, "xl-torch", engines=engines)


@pytest.fixture(scope="module")
def tensorrt_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return _export(
        tmp_path_factory, "xl-trt", engines=dict.fromkeys(c.ENGINE_MODELS, "tensorrt"), precision="fp16"
    )


@pytest.fixture(scope="module")
def pipe(torch_repo: tuple[Path, dict]) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(torch_repo[1]["source"]["path"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_checkpoint_reads_as_sdxl(torch_repo: tuple[Path, dict]) -> None:
    checkpoint = Checkpoint.open(Path(torch_repo[1]["source"]["path"]))
    assert checkpoint.architecture == "sdxl"
    assert checkpoint.dims.text_hidden == 32 + 48  # both encoders' states, concatenated
    assert (checkpoint.dims.pooled_dim, checkpoint.dims.time_ids) == (32, 6)
    assert checkpoint.force_zeros_for_empty_prompt and checkpoint.vae_force_upcast


@pytest.mark.parametrize("name", c.ENGINE_MODELS)
def test_onnx_graphs_follow_the_sdxl_contract(torch_repo: tuple[Path, dict], name: str) -> None:
    repo, manifest = torch_repo
    graph = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False).graph
    assert [v.name for v in graph.input] == [t.name for t in XL[name].inputs]
    assert [v.name for v in graph.output] == [t.name for t in XL[name].outputs]
    assert manifest["components"][name]["onnx"]["max_abs_diff_vs_pytorch"] < 1e-3
    check_config_against_contract(parse((repo / name / CONFIG_FILE).read_text()), XL[name])


def test_python_torch_weights_hold_both_text_encoders(torch_repo: tuple[Path, dict]) -> None:
    repo, manifest = torch_repo
    weights = repo / "text_encoder" / "1" / "weights"
    assert (weights / "text_encoder" / "config.json").is_file()
    assert (weights / "text_encoder_2" / "config.json").is_file()
    assert set(manifest["components"]["text_encoder"]["torch"]["artifacts"]) == {"text_encoder/1/weights"}


@pytest.mark.parametrize("files", ["onnx", "torch"])
@pytest.mark.parametrize(
    ("negative", "guidance", "sizes"), [(None, 6.0, None), ("fog", 7.5, (96, 128, 0, 8, 64, 64))]
)
def test_the_exported_engines_match_diffusers(
    torch_repo: tuple[Path, dict], pipe: StableDiffusionXLPipeline, files: str, negative: str | None,
    guidance: float, sizes: tuple | None,
) -> None:  # fmt: skip
    """The ONNX graphs and the python-torch weights, run in process by LocalPipeline (what the engine swap's
    parity gate renders with), give diffusers' images."""
    repo, _ = torch_repo
    model_files = {"text_encoder": "weights", "unet": "unet"} if files == "torch" else None
    local = LocalPipeline(repo, model_files=model_files)
    ours = local(
        PROMPT, negative_prompt=negative, height=64, width=64, steps=6, guidance_scale=guidance, seed=3,
        size_conditioning=sizes,
    ).images  # fmt: skip
    extra = (
        {}
        if sizes is None
        else {"original_size": sizes[:2], "crops_coords_top_left": sizes[2:4], "target_size": sizes[4:]}
    )
    theirs = pipe(
        PROMPT, negative_prompt=negative, height=64, width=64, num_inference_steps=6, guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(3)], output_type="np", **extra,
    ).images  # fmt: skip
    assert max_abs_diff(ours, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF


@pytest.mark.parametrize("name", c.ENGINE_MODELS)
def test_tensorrt_profiles_cover_the_added_conditioning(tensorrt_repo: tuple[Path, dict], name: str) -> None:
    """Every input of the SDXL engines has a profile; the VAE stays FP32 in an FP16 repository (its
    config's force_upcast), the text encoder and the UNet go FP16."""
    repo, manifest = tensorrt_repo
    entry = manifest["components"][name]
    profile = entry["plan"]["profile"]
    assert set(profile) == {t.name for t in XL[name].inputs}
    config = parse((repo / name / CONFIG_FILE).read_text())
    check_config_against_contract(config, XL[name])
    assert config.platform == "tensorrt_plan"
    upcast = name in (c.VAE_DECODER.name, c.VAE_ENCODER.name)
    assert entry["precision"] == ("fp32" if upcast else "fp16")
    assert config.parameters["precision"].string_value == entry["precision"]
    if name == c.UNET.name:
        assert list(profile["text_embeds"][2]) == [config.max_batch_size, 32]
        assert list(profile["time_ids"][2]) == [config.max_batch_size, 6]
    assert (repo / name / "1" / "model.onnx").is_file()
