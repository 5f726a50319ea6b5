"""perf_analyzer input data for txt2img and each component, shaped by the exported repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_triton import contract
from sd_triton.perf.inputs import COMPONENTS, Request, batch_size_for, load_pipeline, write_inputs


def test_every_component_gets_data_with_the_contract_names_and_the_asked_shapes(
    exported: dict, tmp_path: Path
) -> None:
    request = Request(height=48, width=80, steps=3, prompts=("a red circle", "a blue square"))
    written = write_inputs(exported["repo"], tmp_path, request)
    assert set(written) == set(COMPONENTS)
    pipeline = load_pipeline(exported["repo"])
    latent = [pipeline.latent_channels, 48 // pipeline.vae_scale_factor, 80 // pipeline.vae_scale_factor]
    data = {name: json.loads(path.read_text())["data"] for name, path in written.items()}

    assert [e["PROMPT"]["content"] for e in data["txt2img"]] == [["a red circle"], ["a blue square"]]
    assert [e["SEED"]["content"] for e in data["txt2img"]] == [[request.seed], [request.seed + 1]]
    assert data["txt2img"][0]["HEIGHT"]["content"] == [48] and data["txt2img"][0]["STEPS"]["content"] == [3]
    required = {t.name for t in contract.TXT2IMG.inputs if not t.optional}
    assert set(data["txt2img"][0]) == required | {contract.SCHEDULER.name}  # the one asked for, named

    unet = data["unet"][0]
    assert unet["sample"]["shape"] == latent and len(unet["sample"]["content"]) == latent[0] * 48 * 80 // 64
    assert unet["encoder_hidden_states"]["shape"] == [contract.TOKEN_LENGTH, pipeline.text_hidden_size]
    assert unet["timestep"]["shape"] == [1]
    assert data["vae_decoder"][0]["latent_sample"]["shape"] == latent
    picture = data["vae_encoder"][0]["sample"]
    assert picture["shape"] == [3, 48, 80] and -1 <= min(picture["content"]) < max(picture["content"]) <= 1

    ids = data["text_encoder"][0]["input_ids"]
    assert ids["shape"] == [contract.TOKEN_LENGTH]
    assert ids["content"][0] == 49406 and 49407 in ids["content"]  # CLIP's start and end tokens


def test_negative_prompt_is_sent_only_when_given(exported: dict, tmp_path: Path) -> None:
    written = write_inputs(exported["repo"], tmp_path, Request(negative_prompt="blurry"), ("txt2img",))
    entry = json.loads(written["txt2img"].read_text())["data"][0]
    assert entry["NEGATIVE_PROMPT"]["content"] == ["blurry"]


def test_image_to_image_requests_carry_a_picture_and_the_strength(exported: dict, tmp_path: Path) -> None:
    request = Request(height=32, width=48, strength=0.6, init_image=True, prompts=("a", "b"))
    entries = json.loads(
        write_inputs(exported["repo"], tmp_path, request, ("txt2img",))["txt2img"].read_text()
    )
    first, second = entries["data"]
    assert first["IMAGE"]["shape"] == [32, 48, 3] and first["STRENGTH"]["content"] == [0.6]
    assert all(0 <= v <= 255 and v == int(v) for v in first["IMAGE"]["content"])
    assert first["IMAGE"]["content"] != second["IMAGE"]["content"]  # seeded per entry, as the seeds are
    text_only = json.loads(
        write_inputs(exported["repo"], tmp_path, Request(), ("txt2img",))["txt2img"].read_text()
    )
    assert not {"IMAGE", "STRENGTH"} & set(text_only["data"][0])


def test_a_side_off_the_vae_grid_is_refused_with_its_name(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="width 70 is not a multiple of the VAE scale factor 8"):
        write_inputs(exported["repo"], tmp_path, Request(width=70), ("unet",))


def test_a_repository_that_was_not_exported_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `sd-triton export` first"):
        write_inputs(tmp_path, tmp_path / "out", Request())


@pytest.mark.parametrize(
    ("component", "guidance", "images", "expected"),
    [
        ("unet", 7.5, 2, 4),
        ("unet", 1.0, 3, 3),
        ("text_encoder", 7.5, 4, 2),
        ("vae_decoder", 7.5, 3, 3),
        ("txt2img", 7.5, 4, 1),
    ],
)
def test_batch_size_matches_one_pipeline_call(
    component: str, guidance: float, images: int, expected: int
) -> None:
    assert batch_size_for(component, Request(guidance_scale=guidance, num_images=images)) == expected


def test_sdxl_components_get_the_added_tensors_and_their_graphs_take_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """tiny-xl: the text encoder's data holds both tokenizers' ids, the UNet's the pooled embeddings and
    the time ids; each component's data runs through its exported graph (as perf_analyzer sends it)."""
    import numpy as np

    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.runtime.ort_runner import OrtRunner
    from tests.conftest import WORK_DIR

    repo = tmp_path_factory.mktemp("xl-inputs") / "repo"
    run_export(ExportOptions("tiny-xl", repo, work_dir=WORK_DIR))
    written = write_inputs(
        repo, tmp_path_factory.mktemp("data"), Request(height=48, width=64), COMPONENTS[1:]
    )
    data = {name: json.loads(path.read_text())["data"][0] for name, path in written.items()}
    assert data["text_encoder"]["input_ids_2"]["content"][-1] == 0  # the second tokenizer pads with "!"
    assert data["unet"]["time_ids"]["content"] == [48, 64, 0, 0, 48, 64]
    assert data["unet"]["text_embeds"]["shape"] == [load_pipeline(repo).pooled_dim]
    for name, entry in data.items():
        feeds = {k: np.asarray(v["content"], np.float32).reshape(1, *v["shape"]) for k, v in entry.items()}
        feeds = {
            k: v.astype(np.int32) if k.startswith(("input_ids", "clip_skip")) else v for k, v in feeds.items()
        }
        outputs = OrtRunner(repo / name / "1" / "model.onnx").run(feeds)
        assert all(np.isfinite(v).all() for v in outputs.values()), name
