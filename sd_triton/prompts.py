"""Prompts as users write them for AUTOMATIC1111's web UI: its emphasis syntax, its long-prompt chunks and
its weighting of the text encoder's output, written here from the web UI's documented behaviour.

- `parse(text, syntax)`: the prompt as (text, weight) pieces. `plain`: the text as it is, weight 1.
  `a1111`: `(words)` multiplies the words' weight by 1.1, `[words]` divides it by 1.1, `(words:1.5)`
  multiplies it by 1.5; brackets nest (their factors multiply); `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are
  the characters themselves; `BREAK` (a word of its own, in capitals) ends the chunk. Lenient as the web
  UI is: a bracket never closed applies to the rest of the prompt, a closing bracket with none open is
  text, and `:` not followed by a number and `)` is text. A weight written as a number that is not one
  (`(a:1.2.3)`) is refused, naming the prompt's field.
- `chunk(pieces, ...)`: token chunks of 75, each wrapped in BOS and EOS and padded to 77 (a chunk that
  fills up moves its words after its last comma, if that comma is among its last 20 tokens, to the next
  chunk, as the web UI's default comma backtrack does, when a next chunk may follow), at most
  `max_chunks` of them (the tokens past them are cut and counted), with each token's weight (1 for BOS,
  EOS and padding). One chunk of a plain prompt is diffusers' tokenization of it.
- `weighted(embeddings, weights)`: each 77-token chunk's text-encoder output multiplied by its tokens'
  weights, then rescaled to the chunk's mean before the weighting (the web UI's "original" emphasis;
  it takes the mean over the prompts it encodes together, here each prompt's chunk alone).

Torch-free: the tokenizer model and the denoising loop use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sd_triton import contract as c

SYNTAXES = ("plain", "a1111")
CHUNK = c.TOKEN_LENGTH - 2  # tokens of text per chunk: BOS and EOS take two of CLIP's 77
COMMA_BACKTRACK = 20  # a full chunk moves the words after its last comma within this many tokens on
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = re.compile(r"\s*\bBREAK\b\s*")
WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")


class PromptSyntaxError(ValueError):
    """A prompt the syntax cannot read; the message says where."""


Pieces = list[tuple[str, float | None]]  # weight None: a BREAK


def parse(text: str, syntax: str = "plain") -> Pieces:
    """The prompt's (text, weight) pieces in order, adjacent pieces of one weight merged."""
    if syntax not in SYNTAXES:
        raise PromptSyntaxError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    if syntax == "plain":
        return [(text, 1.0)]
    pieces: list[list] = []  # [text, weight]; weight None marks a BREAK
    round_open: list[int] = []  # where each open bracket's pieces start
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    def add_text(run: str) -> None:
        for index, part in enumerate(BREAK.split(run)):
            if index:
                pieces.append(["BREAK", None])
            pieces.append([part, 1.0])

    i, literal = 0, ""
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            literal += text[i + 1]
            i += 2
            continue
        if char not in "()[]:":
            literal += char
            i += 1
            continue
        if literal:
            add_text(literal)
            literal = ""
        match = WEIGHT.match(text, i) if char == ":" and round_open else None
        if match is not None:
            try:
                factor = float(match.group(1))
            except ValueError:
                raise PromptSyntaxError(
                    f"the weight {match.group(1)!r} at character {i + 1} is not a number"
                ) from None
            scale(round_open.pop(), factor)
            i = match.end()
            continue
        if char == "(":
            round_open.append(len(pieces))
        elif char == "[":
            square_open.append(len(pieces))
        elif char == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif char == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # a closing bracket with none open, or a colon that is no weight: text
            literal += char
        i += 1
    if literal:
        add_text(literal)
    for start in round_open:  # never closed: to the end
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces:
        if merged and piece[1] is not None and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged] or [("", 1.0)]


@dataclass(frozen=True)
class Chunked:
    """A prompt's token chunks: ids and weights [chunks, 77], and the text tokens cut past the last."""

    ids: np.ndarray
    weights: np.ndarray
    cut: int

    @property
    def chunks(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Vocabulary:
    """The token ids chunking needs."""

    bos: int
    eos: int
    pad: int
    comma: int | None


def chunk(
    pieces: Pieces, tokenize: Callable[[list[str]], list[list[int]]], vocab: Vocabulary, max_chunks: int
) -> Chunked:
    """The pieces' tokens (`tokenize`: texts -> their ids, without BOS and EOS) in chunks of 77."""
    texts = [text for text, weight in pieces if weight is not None]
    tokens = iter(tokenize(texts))
    chunks: list[tuple[list[int], list[float], int]] = []  # ids, weights, text tokens
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        padding = CHUNK - len(ids)
        wrapped = [vocab.bos, *ids, vocab.eos, *[vocab.pad] * padding]
        chunks.append((wrapped, [1.0, *weights, *[1.0] * (padding + 1)], len(ids)))
        ids, weights, last_comma = [], [], -1

    for _, weight in pieces:
        if weight is None:
            close()
            continue
        for token in next(tokens):
            if token == vocab.comma:
                last_comma = len(ids)
            elif (
                len(ids) == CHUNK
                and last_comma >= 0
                and CHUNK - last_comma <= COMMA_BACKTRACK
                and len(chunks) + 1 < max_chunks  # a chunk may follow: else the words would be cut
            ):
                keep = last_comma + 1
                moved = ids[keep:], weights[keep:]
                ids, weights = ids[:keep], weights[:keep]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    kept = chunks[:max_chunks]
    return Chunked(
        np.array([ids for ids, _, _ in kept], dtype=np.int32),
        np.array([w for _, w, _ in kept], dtype=np.float32),
        sum(count for _, _, count in chunks[max_chunks:]),
    )


def padded(chunked: Chunked, chunks: int, vocab: Vocabulary) -> Chunked:
    """`chunked` with empty chunks (the empty prompt's: BOS, EOS, padding) after it, to `chunks`."""
    missing = chunks - chunked.chunks
    if missing <= 0:
        return chunked
    empty = np.array([vocab.bos, vocab.eos, *[vocab.pad] * CHUNK], dtype=np.int32)
    ids = np.concatenate([chunked.ids, np.tile(empty, (missing, 1))])
    weights = np.concatenate([chunked.weights, np.ones((missing, c.TOKEN_LENGTH), np.float32)])
    return Chunked(ids, weights, chunked.cut)


def weighted(embeddings: np.ndarray, weights: np.ndarray | None, widths: Sequence[int] = ()) -> np.ndarray:
    """[rows, 77 x k, D] text-encoder outputs with [rows, 77 x k] weights applied chunk by chunk (a chunk
    whose weights are all 1 is left exactly as it is). `widths`: the encoders' parts of D side by side
    (SDXL's two), each weighted on its own as the web UI weights each encoder's output."""
    if weights is None or np.all(weights == 1.0):
        return embeddings
    out = np.array(embeddings, dtype=np.float32)
    rows, length, width = out.shape
    edges = np.cumsum([0, *widths]) if sum(widths) == width else np.array([0, width])
    for row in range(rows):
        for start in range(0, length, c.TOKEN_LENGTH):
            w = weights[row, start : start + c.TOKEN_LENGTH]
            if np.all(w == 1.0):
                continue
            for low, high in zip(edges[:-1], edges[1:], strict=True):
                z = out[row, start : start + c.TOKEN_LENGTH, low:high]
                before = z.mean()
                z = z * w[:, None]
                after = z.mean()
                out[row, start : start + c.TOKEN_LENGTH, low:high] = z * (before / after) if after else z
    return out


def chunked_rows(rows: Sequence[Chunked], vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Several prompts' chunks (a request's negative and positive) padded to one chunk count: ids and
    weights [rows, 77 x k]."""
    count = max(r.chunks for r in rows)
    same = [padded(r, count, vocab) for r in rows]
    return (
        np.stack([r.ids.reshape(-1) for r in same]),
        np.stack([r.weights.reshape(-1) for r in same]),
    )
