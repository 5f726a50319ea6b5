"""CLIP tokenization of prompt and negative prompt: in 77-token chunks (sd_triton/prompts.py), one chunk of
a plain prompt being diffusers' tokenization of it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from sd_triton import contract as c
from sd_triton import prompts
from sd_triton.requests import InvalidRequest


@dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray  # int32 [rows, 77 x chunks]; rows: [uncond, cond] with guidance, else [cond]
    prompt_truncated_tokens: int
    negative_prompt_truncated_tokens: int
    input_ids_2: np.ndarray | None = None  # SDXL: the second tokenizer's, the same rows
    weights: np.ndarray | None = None  # float32, as input_ids: each token's weight (None: all 1)

    @property
    def text_encoder_inputs(self) -> tuple[np.ndarray, ...]:
        """The text encoder engine's inputs in contract order for one chunk a row (clip_skip 0): SD's ids and
        clip skip; SDXL's, then the second tokenizer's ids."""
        ids = [a.reshape(-1, c.TOKEN_LENGTH) for a in (self.input_ids, self.input_ids_2) if a is not None]
        skips = np.zeros((len(ids[0]), 1), np.int32)
        return (ids[0], skips, *ids[1:])


SECOND_TOKENIZER = "tokenizer_2"  # SDXL's, beside the first in the tokenizer model's version folder


class PromptTokenizer:
    def __init__(self, folder: str | Path, second: str | Path | None = None) -> None:
        """`folder`: a CLIP tokenizer's files; `second`: SDXL's second tokenizer (its pad token differs)."""
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_length = int(self.tokenizer.model_max_length)
        self.second = None if second is None else PromptTokenizer(second)
        tokenizer = self.tokenizer
        self.vocab = prompts.Vocabulary(
            bos=int(tokenizer.bos_token_id),
            eos=int(tokenizer.eos_token_id),
            pad=int(tokenizer.pad_token_id),
            comma=tokenizer.get_vocab().get(",</w>"),
        )
        # the fast tokenizer keeps padding/truncation settings between calls: one call at a time
        self._lock = threading.Lock()

    @classmethod
    def in_folder(cls, folder: Path) -> PromptTokenizer:
        """The tokenizers an export copied into `folder` (tokenizer/, and for SDXL tokenizer_2/)."""
        second = folder / SECOND_TOKENIZER
        return cls(folder / "tokenizer", second if second.is_dir() else None)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without BOS and EOS (the caller holds the lock)."""
        return list(self.tokenizer(texts, add_special_tokens=False).input_ids) if texts else []

    def chunked(self, pieces: prompts.Pieces, max_chunks: int) -> prompts.Chunked:
        with self._lock:
            return prompts.chunk(pieces, self._ids, self.vocab, max_chunks)

    def tokenize(
        self, prompt: str, negative_prompt: str, guidance: bool, syntax: str = "plain", max_chunks: int = 1
    ) -> Tokenized:
        """The rows' ids in chunks of 77 (up to `max_chunks`, both rows padded to one count with the empty
        prompt's chunks) and the tokens' weights, read with `syntax` (prompts.parse; PromptSyntaxError).
        One chunk of a plain prompt is diffusers' ids for it (truncated past 75 tokens). InvalidRequest
        naming the field for an unknown syntax or a prompt it cannot read."""
        if syntax not in prompts.SYNTAXES:
            raise InvalidRequest(
                c.PROMPT_SYNTAX.name, f"must be one of {', '.join(prompts.SYNTAXES)}, got {syntax!r}"
            )
        texts = (
            {c.NEGATIVE_PROMPT.name: negative_prompt, c.PROMPT.name: prompt}
            if guidance
            else {c.PROMPT.name: prompt}
        )
        pieces = []
        for field, text in texts.items():
            try:
                pieces.append(prompts.parse(text, syntax))
            except prompts.PromptSyntaxError as exc:
                raise InvalidRequest(field, str(exc)) from None
        rows = [self.chunked(p, max_chunks) for p in pieces]
        ids, weights = prompts.chunked_rows(rows, self.vocab)
        second = None
        if self.second is not None:  # SDXL: the same pieces, the second tokenizer's ids (its padding)
            second, _ = prompts.chunked_rows(
                [self.second.chunked(p, max_chunks) for p in pieces], self.second.vocab
            )
        cut, negative_cut = rows[-1].cut, rows[0].cut if guidance else 0
        return Tokenized(ids, cut, negative_cut, second, None if np.all(weights == 1.0) else weights)
