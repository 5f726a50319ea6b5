"""Textual inversion without a server: embedding files read as diffusers reads them (sd_triton/embeddings.py),
the library written by `embeddings add` (export/embeddings.py), and the tokenizer's ids and vector tables
against diffusers' load_textual_inversion on the tiny tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from sd_triton import contract as c
from sd_triton.cli import main as cli
from sd_triton.embeddings import EmbeddingError, vectors_of
from sd_triton.export import embeddings
from sd_triton.requests import InvalidRequest
from sd_triton.runtime.tokenize import PromptTokenizer

WIDTHS = {"text_encoder": 4}


@pytest.mark.parametrize(
    ("state", "fmt", "token"),
    [
        ({"string_to_param": {"*": np.ones((2, 4))}, "name": "style"}, "a1111", "style"),
        ({"emb_params": np.ones((3, 4))}, "a1111", ""),
        ({"<cat-toy>": np.ones(4)}, "diffusers", "<cat-toy>"),
        ({"clip_l": np.ones((2, 4)), "clip_g": np.ones((2, 8))}, "sdxl", ""),
    ],
)
def test_each_file_format_reads_as_diffusers_reads_it(state: dict, fmt: str, token: str) -> None:
    found, vectors, named = vectors_of(state, WIDTHS)
    assert (found, named) == (fmt, token)
    assert vectors["text_encoder"].dtype == np.float32 and vectors["text_encoder"].shape[1] == 4


def test_sdxl_files_fill_both_encoders_and_others_are_refused() -> None:
    both = {"text_encoder": 4, "text_encoder_2": 8}
    _, vectors, _ = vectors_of({"clip_l": np.zeros((2, 4)), "clip_g": np.ones((2, 8))}, both)
    assert vectors["text_encoder_2"].shape == (2, 8) and vectors["text_encoder"].shape == (2, 4)
    with pytest.raises(EmbeddingError, match="holds clip_l and clip_g"):
        vectors_of({"emb_params": np.ones((2, 4))}, both)
    with pytest.raises(EmbeddingError, match="vector counts differ"):
        vectors_of({"clip_l": np.zeros((2, 4)), "clip_g": np.ones((3, 8))}, both)
    with pytest.raises(EmbeddingError, match="NaN"):
        vectors_of({"emb_params": np.full((1, 4), np.nan)}, WIDTHS)
    with pytest.raises(EmbeddingError, match=r"1 <= n <= 75"):
        vectors_of({"emb_params": np.ones((76, 4))}, WIDTHS)


@pytest.fixture()
def repo(exported: dict, tmp_path: Path) -> Path:
    """A repository with the tiny export's tokenizer model alone (its tokenizer and pipeline.json)."""
    repo = tmp_path / "repo"
    shutil.copytree(exported["repo"] / "tokenizer" / "1", repo / "tokenizer" / "1")
    return repo


def test_the_tokenizer_gives_diffusers_ids_and_the_learned_vectors(repo: Path, tmp_path: Path) -> None:
    """Two embeddings in the library; a prompt using the second only: its ids are diffusers' (the learned
    ids renumbered into the request's own table, in library order) and the table holds its vectors."""
    tokenizer = PromptTokenizer.in_folder(repo / "tokenizer" / "1")
    width = tokenizer.widths[0]
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, width, generator=generator), torch.randn(3, width, generator=generator)
    save_file({"emb_params": first}, tmp_path / "a.safetensors")
    torch.save({"string_to_param": {"*": second}, "name": "<b-style>"}, tmp_path / "b.pt")
    embeddings.add(repo, tmp_path / "a.safetensors", "<a-style>")
    embeddings.add(repo, tmp_path / "b.pt")  # the token the A1111 file names
    prompt = "a photo, <B-STYLE>, sharp"
    out = tokenizer.tokenize(prompt, "", guidance=True)

    theirs = CLIPTokenizer.from_pretrained(str(repo / "tokenizer" / "1" / "tokenizer"))
    theirs.add_tokens(["<a-style>", "<a-style>_1", "<b-style>", "<b-style>_1", "<b-style>_2"])
    expanded = prompt.replace("<B-STYLE>", "<b-style> <b-style>_1 <b-style>_2")
    ids = theirs(expanded, padding="max_length", max_length=77).input_ids
    vocabulary = tokenizer.vocabulary
    renumbered = [i - 2 if i >= vocabulary else i for i in ids]  # <a-style>'s 2 vectors are not in the table
    assert out.input_ids[1].tolist() == renumbered
    assert out.input_ids[0].tolist() == theirs("", padding="max_length", max_length=77).input_ids
    (table,) = out.vectors
    assert table.shape == (2, 3, width)
    np.testing.assert_array_equal(table[1], second.numpy())
    np.testing.assert_array_equal(table[0], table[1])  # one table for both rows

    # no learned token: one zero row; the library's change reaches the next request
    plain = tokenizer.tokenize("a photo", "", guidance=False)
    assert plain.vectors[0].shape == (1, 1, width) and not plain.vectors[0].any()
    embeddings.remove(repo, "<b-style>")
    gone = tokenizer.tokenize(prompt, "", guidance=False)
    assert (gone.input_ids < vocabulary).all() and not gone.vectors[0].any()


def test_the_learned_vectors_reach_the_text_encoder_module(
    repo: Path, tmp_path: Path, exported: dict
) -> None:
    """The exported module's learned-token path (the ids past the vocabulary read the table) equals
    diffusers' text encoder with the embedding loaded (resized table), within 1e-5."""
    from diffusers import StableDiffusionPipeline

    from sd_triton.runtime.torch_modules import load_module

    checkpoint = Path(exported["manifest"]["source"]["path"])
    tokenizer = PromptTokenizer.in_folder(repo / "tokenizer" / "1")
    vectors = torch.randn(2, tokenizer.widths[0], generator=torch.Generator().manual_seed(1))
    save_file({"emb_params": vectors}, tmp_path / "e.safetensors")
    embeddings.add(repo, tmp_path / "e.safetensors", "<e>")
    out = tokenizer.tokenize("a <e> on a table", "", guidance=False)
    module = load_module(c.TEXT_ENCODER.name, checkpoint)
    ids, skip, table = (torch.from_numpy(a) for a in out.text_encoder_inputs)
    with torch.no_grad():
        ours = module(ids, skip, table)

    loader = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    loader.load_textual_inversion(vectors, token="<e>")
    text = loader.maybe_convert_prompt("a <e> on a table", loader.tokenizer)
    their_ids = loader.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = loader.text_encoder(their_ids)[0]
    assert float((ours - theirs).abs().max()) <= 1e-5


def test_too_many_learned_vectors_in_one_request_is_invalid(repo: Path, tmp_path: Path) -> None:
    tokenizer = PromptTokenizer.in_folder(repo / "tokenizer" / "1")
    width = tokenizer.widths[0]
    for name in ("x", "y"):
        save_file({"emb_params": torch.ones(70, width)}, tmp_path / f"{name}.safetensors")
        embeddings.add(repo, tmp_path / f"{name}.safetensors", f"<{name}>")
    assert tokenizer.tokenize("<x>", "", guidance=True).vectors[0].shape == (2, 70, width)
    with pytest.raises(InvalidRequest) as caught:  # one table for the request's rows: 140 vectors
        tokenizer.tokenize("<x>", "<y>", guidance=True)
    assert caught.value.field == "PROMPT" and f"at most {c.MAX_TOKEN_EMBEDDINGS}" in str(caught.value)


def test_adding_checks_the_token_and_replaces_only_when_asked(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    width = PromptTokenizer.in_folder(repo / "tokenizer" / "1").widths[0]
    save_file({"emb_params": torch.ones(1, width)}, tmp_path / "ok.safetensors")
    embeddings.add(repo, tmp_path / "ok.safetensors", "<t>")
    with pytest.raises(EmbeddingError, match="already in the library"):
        embeddings.add(repo, tmp_path / "ok.safetensors", "<t>")
    assert embeddings.add(repo, tmp_path / "ok.safetensors", "<t>", replace=True).token == "<t>"
    with pytest.raises(EmbeddingError, match="not in the library"):
        embeddings.remove(repo, "<nope>")
    assert [r.token for r in embeddings.listed(repo)] == ["<t>"]
    assert cli(["embeddings", "list", "--repo", str(repo)]) == 0
    assert "| <t> | a1111 | 1 |" in capsys.readouterr().out
    assert cli(["embeddings", "list", "--repo", str(repo), "--json"]) == 0
    assert [r["token"] for r in json.loads(capsys.readouterr().out)] == ["<t>"]
    assert (
        cli(["embeddings", "add", str(tmp_path / "ok.safetensors"), "--token", "<t>", "--repo", str(repo)])
        == 1
    )


def test_a_library_changing_while_read_keeps_what_was_read(repo: Path, tmp_path: Path) -> None:
    """An embedding folder caught half-removed (its record without its vectors): the library keeps the
    embeddings it read before and reads again on the next call, once the change is done."""
    from sd_triton.embeddings import VECTORS, EmbeddingLibrary, folder_name, library_dir

    width = PromptTokenizer.in_folder(repo / "tokenizer" / "1").widths[0]
    save_file({"emb_params": torch.ones(1, width)}, tmp_path / "a.safetensors")
    embeddings.add(repo, tmp_path / "a.safetensors", "<a>")
    library = EmbeddingLibrary(library_dir(repo), ("text_encoder",))
    first, changed = library.current()
    assert changed and [e.record.token for e in first] == ["<a>"]
    embeddings.add(repo, tmp_path / "a.safetensors", "<b>")
    (library_dir(repo) / folder_name("<b>") / VECTORS).unlink()  # caught mid-change
    assert library.current() == (first, False)
    embeddings.add(repo, tmp_path / "a.safetensors", "<b>", replace=True)  # the change done: read again
    read, changed = library.current()
    assert changed and [e.record.token for e in read] == ["<a>", "<b>"]
