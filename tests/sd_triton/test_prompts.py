"""AUTOMATIC1111's prompt conventions (sd_triton/prompts.py) against a reference written here, independently,
from the web UI's documented behaviour: the emphasis grammar read character by character (each character's
weight, then runs of one weight), the 75-token chunks with BOS/EOS, BREAK and the comma backtrack, and the
"original" emphasis arithmetic in torch; plus the lenient cases the docs state."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sd_triton import prompts
from sd_triton.requests import InvalidRequest
from sd_triton.runtime.tokenize import PromptTokenizer

# --- the reference ------------------------------------------------------------------------------------


def reference_parse(text: str) -> list[tuple[str, float | None]]:
    """Each character's weight: an open bracket remembers where its characters start; closing it
    multiplies theirs (round 1.1, square 1/1.1, `:w)` w); never closed: at the end, round ones first.
    Escaped brackets and backslashes are characters; a closing bracket with none open is a character; so is
    a colon not followed by `number)` inside an open round bracket. Then runs of one weight, BREAK split
    out."""
    chars: list[list] = []  # [character, weight]
    rounds: list[int] = []
    squares: list[int] = []
    position = 0
    weight_pattern = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
    while position < len(text):
        ch = text[position]
        nxt = text[position + 1] if position + 1 < len(text) else ""
        if ch == "\\" and nxt in ("(", ")", "[", "]", "\\"):
            chars.append([nxt, 1.0])
            position += 2
            continue
        found = weight_pattern.match(text, position) if ch == ":" and rounds else None
        if found:
            start = rounds.pop()
            for item in chars[start:]:
                item[1] *= float(found.group(1))
            position = found.end()
            continue
        if ch == "(":
            rounds.append(len(chars))
        elif ch == "[":
            squares.append(len(chars))
        elif ch == ")" and rounds:
            for item in chars[rounds.pop() :]:
                item[1] *= 1.1
        elif ch == "]" and squares:
            for item in chars[squares.pop() :]:
                item[1] *= 1 / 1.1
        else:
            chars.append([ch, 1.0])
        position += 1
    for start in rounds:
        for item in chars[start:]:
            item[1] *= 1.1
    for start in squares:
        for item in chars[start:]:
            item[1] *= 1 / 1.1
    runs: list[list] = []
    for ch, weight in chars:
        if runs and runs[-1][1] == weight:
            runs[-1][0] += ch
        else:
            runs.append([ch, weight])
    pieces: list[tuple[str, float | None]] = []
    for run, weight in runs or [["", 1.0]]:
        parts = re.split(r"\s*\bBREAK\b\s*", run)
        for index, part in enumerate(parts):
            if index:
                pieces.append(("BREAK", None))
            if pieces and pieces[-1][1] == weight and index == 0:
                pieces[-1] = (pieces[-1][0] + part, weight)
            else:
                pieces.append((part, weight))
    return pieces


def reference_chunks(pieces, tokenizer, max_chunks: int) -> tuple[list[list[int]], list[list[float]], int]:
    """75 text tokens a chunk, BOS + tokens + EOS + padding; BREAK starts a chunk; a full chunk hands the
    tokens after its last comma (within 20 of its end) to the next, while another chunk may follow."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    done: list[tuple[list[int], list[float]]] = []
    current: list[tuple[int, float]] = []
    comma_at = None

    def finish() -> None:
        nonlocal current, comma_at
        tokens = [t for t, _ in current]
        weights = [w for _, w in current]
        fill = 75 - len(tokens)
        done.append(([bos, *tokens, eos] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill))
        current, comma_at = [], None

    for text, weight in pieces:
        if weight is None:
            finish()
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids if text else []:
            if token == comma:
                comma_at = len(current)
            elif (
                len(current) == 75
                and comma_at is not None
                and 75 - comma_at <= 20
                and len(done) + 1 < max_chunks
            ):
                carried = current[comma_at + 1 :]
                current = current[: comma_at + 1]
                finish()
                current = carried
            if len(current) == 75:
                finish()
            current.append((token, weight))
    if current or not done:
        finish()
    cut = sum(sum(1 for t in ids[1:76] if t != pad and t != eos) for ids, _ in done[max_chunks:])
    return [ids for ids, _ in done[:max_chunks]], [w for _, w in done[:max_chunks]], cut


def reference_weighting(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The web UI's "original" emphasis on one chunk [77, D]: scale each token, keep the chunk's mean."""
    mean = z.mean()
    scaled = z * weights.unsqueeze(-1)
    return scaled * (mean / scaled.mean())


# --- the tests -----------------------------------------------------------------------------------------

CASES = [
    "a cat",
    "a (cat) on a [mat]",
    "((very)) important, [[faint]]",
    "(cat:1.5) and (dog:0.5)",
    "((nested:1.3) outer)",
    "an (unclosed bracket and [another",
    "a stray ) and ] here",
    r"literal \(brackets\) and \[these\] and a \\ backslash",
    "colon: not a weight (a:b) (c: 2 )",
    "first BREAK second BREAKfast (third BREAK fourth)",
    "",
    "(a:-0.5) (b:+1.25)",
]


@pytest.mark.parametrize("text", CASES)
def test_the_grammar_is_the_documented_one(text: str) -> None:
    assert prompts.parse(text, "a1111") == reference_parse(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab ()[]:1.5\\,BREAK", max_size=40))
def test_the_grammar_on_any_text(text: str) -> None:
    """Any text reads as the reference reads it; a weight that is no number (`(a:.)`, `(a:1.5.5)`) is
    refused by both."""
    try:
        expected = reference_parse(text)
    except ValueError:
        with pytest.raises(prompts.PromptSyntaxError, match="is not a number"):
            prompts.parse(text, "a1111")
        return
    assert prompts.parse(text, "a1111") == expected


def test_plain_is_the_text_and_a_bad_weight_is_refused() -> None:
    assert prompts.parse("(a:1.5) BREAK [b]", "plain") == [("(a:1.5) BREAK [b]", 1.0)]
    with pytest.raises(prompts.PromptSyntaxError, match="'1.2.3' at character 3 is not a number"):
        prompts.parse("(a:1.2.3)", "a1111")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> PromptTokenizer:
    return PromptTokenizer(tiny_checkpoint / "tokenizer")


LONG = ", ".join(f"(word{i}:1.{i % 9})" if i % 3 == 0 else f"thing {i}" for i in range(90))


@pytest.mark.parametrize("max_chunks", [1, 2, 4])
@pytest.mark.parametrize("text", [LONG, "short (prompt:1.2)", "one BREAK two BREAK three", "x " * 160, ""])
def test_chunks_are_the_documented_ones(tokenizer: PromptTokenizer, text: str, max_chunks: int) -> None:
    pieces = prompts.parse(text, "a1111")
    ours = tokenizer.chunked(pieces, max_chunks)
    ids, weights, cut = reference_chunks(reference_parse(text), tokenizer.tokenizer, max_chunks)
    assert ours.ids.tolist() == ids and np.allclose(ours.weights, weights) and ours.cut == cut
    assert ours.ids.shape[1] == 77 and ours.chunks <= max_chunks


def test_the_negative_prompt_is_padded_to_the_prompts_chunks(tokenizer: PromptTokenizer) -> None:
    out = tokenizer.tokenize(LONG, "blurry", guidance=True, syntax="a1111", max_chunks=4)
    chunks = out.input_ids.shape[1] // 77
    assert chunks > 1 and out.input_ids.shape == (2, 77 * chunks) and out.weights is not None
    empty = tokenizer.tokenize("", "", guidance=False).input_ids[0]
    assert all(np.array_equal(out.input_ids[0, 77 * k : 77 * (k + 1)], empty) for k in range(1, chunks))
    assert np.all(out.weights[0] == 1.0)  # "blurry" has no emphasis
    with pytest.raises(InvalidRequest) as caught:
        tokenizer.tokenize("ok", "(bad:1..2)", guidance=True, syntax="a1111")
    assert caught.value.field == "NEGATIVE_PROMPT"
    with pytest.raises(InvalidRequest) as caught:
        tokenizer.tokenize("ok", "", guidance=True, syntax="comfy")
    assert caught.value.field == "PROMPT_SYNTAX"


def test_the_weighting_is_the_documented_arithmetic() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 77 * 3, 16)).astype(np.float32)
    weights = np.ones((2, 77 * 3), np.float32)
    weights[0, 5:9] = 1.3
    weights[0, 80:90] = 0.7
    weights[1, 160:170] = 1.21
    ours = prompts.weighted(z, weights)
    for row in range(2):
        for k in range(3):
            chunk = slice(77 * k, 77 * (k + 1))
            if np.all(weights[row, chunk] == 1):
                assert np.array_equal(ours[row, chunk], z[row, chunk])  # untouched, bit for bit
                continue
            expected = reference_weighting(
                torch.from_numpy(z[row, chunk]), torch.from_numpy(weights[row, chunk])
            )
            assert np.abs(ours[row, chunk] - expected.numpy()).max() <= 1e-5
    assert prompts.weighted(z, None) is z and prompts.weighted(z, np.ones((2, 231), np.float32)) is z


def test_sdxl_weighting_keeps_each_encoders_mean() -> None:
    """SDXL's two encoders' outputs side by side (widths 6 and 10): each part weighted on its own, as the
    web UI weights each encoder's output before it joins them."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(1, 77, 16)).astype(np.float32) + np.linspace(-1, 2, 16, dtype=np.float32)
    weights = np.ones((1, 77), np.float32)
    weights[0, 3:7] = 1.4
    ours = prompts.weighted(z, weights, (6, 10))
    for part in (slice(0, 6), slice(6, 16)):
        expected = reference_weighting(torch.from_numpy(z[0, :, part]), torch.from_numpy(weights[0]))
        assert np.abs(ours[0, :, part] - expected.numpy()).max() <= 1e-5
    assert np.abs(ours - prompts.weighted(z, weights)).max() > 1e-3  # not the whole width's mean
