"""Prompts as users write them, through Triton (issue 25): a long prompt in AUTOMATIC1111's syntax (weights,
BREAK, past 77 tokens) gives the images diffusers' StableDiffusionPipeline gives when fed the reference
embeddings (tests/sd_triton/test_prompts.py's chunks and weighting, with diffusers' own text encoder) as
prompt_embeds; plain prompts are read as text; bad syntax is INVALID_ARG naming the field; clip_skip and
textual-inversion embeddings (`sd-triton embeddings add`) give diffusers' images."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tritonclient.utils import InferenceServerException

from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.export.presets import ensure_preset_checkpoint
from sd_triton.txt2img_client import txt2img
from tests.conftest import WORK_DIR, triton_server
from tests.integration.test_parity import MAX_ABS_DIFF, max_abs_diff
from tests.sd_triton.test_prompts import reference_chunks, reference_parse, reference_weighting

LONG = (
    "a (red circle:2.5) on a [[blue]] background, " + ", ".join(f"detail {i}" for i in range(40))
    + " BREAK (((bright))) studio light, (sharp focus:0.4)"
)  # fmt: skip
PARAMS = dict(height=64, width=64, steps=6, guidance_scale=7.5, scheduler="ddim", seed=3)


def _trained_like(work: Path) -> Path:
    """tiny with its text encoder's final layer norm given a bias, as a trained CLIP's has: the emphasis
    rescales each chunk to its mean, which an untrained norm (bias 0: every token's mean 0) leaves at ~0,
    where the arithmetic divides by rounding noise."""
    from transformers import CLIPTextModel

    folder = work / "tiny-trained-like"
    shutil.copytree(ensure_preset_checkpoint("tiny", WORK_DIR / "tiny"), folder)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        bias = getattr(encoder, "text_model", encoder).final_layer_norm.bias
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.3)
    encoder.save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("prompts-serve")
    repo = work / "model_repository"
    manifest = run_export(ExportOptions(str(_trained_like(work)), repo, work_dir=WORK_DIR))
    with (
        triton_server(repo, work / "triton.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        yield {"client": client, "checkpoint": Path(manifest["source"]["path"]), "repo": repo}


def _reference_embeds(pipe: StableDiffusionPipeline, texts: list[str], max_chunks: int) -> torch.Tensor:
    """[rows, 77 x k, D]: each text's reference chunks through diffusers' text encoder, weighted, the rows
    padded to one chunk count with the empty prompt's chunk."""
    rows = [reference_chunks(reference_parse(t), pipe.tokenizer, max_chunks) for t in texts]
    count = max(len(ids) for ids, _, _ in rows)
    empty_ids, empty_weights, _ = reference_chunks([("", 1.0)], pipe.tokenizer, 1)
    out = []
    with torch.no_grad():
        for ids, weights, _ in rows:
            ids, weights = (
                ids + empty_ids * (count - len(ids)),
                weights + empty_weights * (count - len(weights)),
            )
            chunks = []
            for chunk_ids, chunk_weights in zip(ids, weights, strict=True):
                z = pipe.text_encoder(torch.tensor([chunk_ids]))[0][0]
                w = torch.tensor(chunk_weights)
                chunks.append(z if torch.all(w == 1) else reference_weighting(z, w))
            out.append(torch.cat(chunks))
    return torch.stack(out)


def test_a_long_weighted_prompt_gives_diffusers_images_from_the_reference_embeddings(served: dict) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(served["checkpoint"], safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    negative = "(blurry:1.2), lowres"
    embeds = _reference_embeds(pipe, [negative, LONG], max_chunks=4)
    assert embeds.shape[1] in (77 * 3, 77 * 4)  # past 75 tokens, and a chunk after BREAK
    ours = txt2img(served["client"], LONG, negative_prompt=negative, prompt_syntax="a1111", **PARAMS)
    theirs = pipe(
        prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], height=64, width=64,
        num_inference_steps=6,
        guidance_scale=7.5, generator=[torch.Generator().manual_seed(3)], output_type="np",
    ).images  # fmt: skip
    assert max_abs_diff(ours.images, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF
    assert ours.prompt_truncated_tokens == 0
    # read as plain text, the same prompt is another image (the brackets are words)
    plain = txt2img(served["client"], LONG, negative_prompt=negative, **PARAMS)
    assert max_abs_diff(plain.images, ours.images) > 10
    # the weights matter: without them (the brackets as syntax, all weights 1) the image changes
    unweighted = (
        LONG.replace(":2.5", ":1")
        .replace(":0.4", ":1")
        .replace("[[blue]]", "blue")
        .replace("(((bright)))", "bright")
    )
    flat = txt2img(
        served["client"], unweighted, negative_prompt="blurry, lowres", prompt_syntax="a1111", **PARAMS
    )
    assert max_abs_diff(flat.images, ours.images) > 5


def test_a_prompt_past_the_chunks_is_cut_and_counted(served: dict) -> None:
    long = " ".join(f"w{i}" for i in range(400))
    result = txt2img(served["client"], long, **PARAMS)
    pipe = StableDiffusionPipeline.from_pretrained(served["checkpoint"], safety_checker=None)
    tokens = len(pipe.tokenizer(long, add_special_tokens=False).input_ids)
    assert result.prompt_truncated_tokens == tokens - 4 * 75 > 0  # the export's default: 4 chunks


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("PROMPT_SYNTAX", "comfy", "must be one of plain, a1111"), ("PROMPT", "(a:1.2.3)", "is not a number")],
)
def test_bad_prompts_are_invalid_arg(served: dict, field: str, value: str, words: str) -> None:
    kwargs = {"prompt_syntax": value} if field == "PROMPT_SYNTAX" else {"prompt_syntax": "a1111"}
    prompt = value if field == "PROMPT" else "a cat"
    with pytest.raises(InferenceServerException, match=field) as caught:
        txt2img(served["client"], prompt, **kwargs, **PARAMS)
    assert words in str(caught.value)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(served: dict, clip_skip: int) -> None:
    """diffusers' clip_skip (StableDiffusionPipeline.encode_prompt: the states clip_skip layers before the
    last, through the final layer norm; 2: the tiny encoder's embeddings), fed as prompt_embeds within
    2/255 (its own clip_skip path reaches for `text_model`, which this transformers release's CLIP no longer
    has); each changes the image; past the layers, INVALID_ARG."""
    pipe = StableDiffusionPipeline.from_pretrained(served["checkpoint"], safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
    embeds = []
    with torch.no_grad():
        for text in ("", prompt):
            ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids  # fmt: skip
            states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
            embeds.append(norm(states[-(clip_skip + 1)]))
    ours = txt2img(served["client"], prompt, clip_skip=clip_skip, **PARAMS).images
    theirs = pipe(prompt_embeds=embeds[1], negative_prompt_embeds=embeds[0], height=64, width=64,
                  num_inference_steps=6, guidance_scale=7.5, generator=[torch.Generator().manual_seed(3)],
                  output_type="np").images  # fmt: skip
    assert max_abs_diff(ours, (theirs * 255).round().astype(np.uint8)) <= MAX_ABS_DIFF
    assert max_abs_diff(ours, txt2img(served["client"], prompt, **PARAMS).images) > 5
    with pytest.raises(InferenceServerException, match="CLIP_SKIP: must be from 0 to 2"):
        txt2img(served["client"], prompt, clip_skip=3, **PARAMS)


def _pipe(checkpoint: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_image(pipe: StableDiffusionPipeline, prompt: str, negative: str | None = None) -> np.ndarray:
    images = pipe(
        prompt,
        negative_prompt=negative,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)  # fmt: skip


def _library(client: grpcclient.InferenceServerClient) -> list[dict]:
    """denoise's answer to a control request: the pipeline's embedding library."""
    import json

    flag = grpcclient.InferInput("EMBEDDING_LIBRARY", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    result = client.infer("denoise", [flag], outputs=[grpcclient.InferRequestedOutput("ENGINES")])
    return list(json.loads(result.as_numpy("ENGINES").reshape(-1)[0]))


def test_textual_inversion_embeddings_give_diffusers_images(served: dict, tmp_path: Path) -> None:
    """Two embeddings, an AUTOMATIC1111 .safetensors of 3 vectors and a diffusers .bin of one, added while
    Triton serves: a prompt using both (and a negative prompt using one) gives the image diffusers'
    load_textual_inversion gives, within 2/255; before they were added the tokens were text (another image),
    and once removed they are text again (the first image, bit for bit)."""
    from safetensors.torch import save_file

    from sd_triton.cli import main as cli
    from sd_triton.export import embeddings

    client, repo = served["client"], served["repo"]
    prompt, negative = "a <red-thing> beside a <Blue-Thing> circle", "<blue-thing>, lowres"
    before = txt2img(client, prompt, negative_prompt=negative, **PARAMS).images
    width = _pipe(served["checkpoint"]).text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    three, one = torch.randn(3, width, generator=generator), torch.randn(width, generator=generator)
    save_file({"emb_params": three}, tmp_path / "red.safetensors")
    torch.save({"<blue-thing>": one}, tmp_path / "learned_embeds.bin")
    assert cli(["embeddings", "add", str(tmp_path / "red.safetensors"), "--token", "<red-thing>",
                "--repo", str(repo)]) == 0  # fmt: skip
    record = embeddings.add(repo, tmp_path / "learned_embeds.bin")  # the token the file names
    assert (record.token, record.format, record.vectors) == ("<blue-thing>", "diffusers", 1)
    assert [(e["token"], e["vectors"], e["format"]) for e in _library(client)] == [
        ("<blue-thing>", 1, "diffusers"), ("<red-thing>", 3, "a1111"),
    ]  # fmt: skip

    ours = txt2img(client, prompt, negative_prompt=negative, **PARAMS).images
    pipe = _pipe(served["checkpoint"])  # loaded in the library's order (by token)
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.bin"))
    pipe.load_textual_inversion(str(tmp_path / "red.safetensors"), token="<red-thing>")
    assert max_abs_diff(ours, _diffusers_image(pipe, prompt, negative)) <= MAX_ABS_DIFF
    assert max_abs_diff(ours, before) > 5
    # weighted, the learned tokens are tokens like any other
    weighted = txt2img(client, "a (<red-thing>:1.4) circle", prompt_syntax="a1111", **PARAMS).images
    assert max_abs_diff(weighted, txt2img(client, "a <red-thing> circle", **PARAMS).images) > 0

    for token in ("<red-thing>", "<blue-thing>"):
        assert cli(["embeddings", "remove", "--token", token, "--repo", str(repo)]) == 0
    assert _library(client) == []
    np.testing.assert_array_equal(txt2img(client, prompt, negative_prompt=negative, **PARAMS).images, before)


def test_bad_embedding_files_and_tokens_are_refused(served: dict, tmp_path: Path) -> None:
    """Each refusal names what is wrong; nothing reaches the library."""
    from safetensors.torch import save_file

    from sd_triton.embeddings import EmbeddingError
    from sd_triton.export import embeddings

    repo = served["repo"]
    width = _pipe(served["checkpoint"]).text_encoder.config.hidden_size
    save_file({"emb_params": torch.zeros(2, width + 1)}, tmp_path / "wide.safetensors")
    save_file({"emb_params": torch.zeros(2, width)}, tmp_path / "ok.safetensors")
    save_file({"a": torch.zeros(width), "b": torch.zeros(width)}, tmp_path / "two.safetensors")
    cases = [
        (tmp_path / "wide.safetensors", "<x>", f"takes \\[n, {width}\\]"),
        (tmp_path / "two.safetensors", "<x>", "expected one embedding in the file, found 2"),
        (tmp_path / "ok.safetensors", "cat", "is a word of the tokenizer already"),
        (tmp_path / "ok.safetensors", "my style", "without whitespace"),
        (tmp_path / "ok.safetensors", None, "token ''"),  # an emb_params file names no token
        (tmp_path / "missing.pt", "<x>", "no such file"),
    ]
    for file, token, words in cases:
        with pytest.raises(EmbeddingError, match=words):
            embeddings.add(repo, file, token)
    assert embeddings.listed(repo) == []
