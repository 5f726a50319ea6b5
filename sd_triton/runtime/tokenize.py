"""CLIP tokenization of prompt and negative prompt, truncated the way diffusers truncates."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer


@dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray  # int32 [rows, 77]; rows: [uncond, cond] with guidance, else [cond]
    prompt_truncated_tokens: int
    negative_prompt_truncated_tokens: int
    input_ids_2: np.ndarray | None = None  # SDXL: the second tokenizer's, the same rows

    @property
    def text_encoder_inputs(self) -> tuple[np.ndarray, ...]:
        """The text encoder engine's inputs in contract order (SD: one; SDXL: both tokenizers' ids)."""
        return (self.input_ids,) if self.input_ids_2 is None else (self.input_ids, self.input_ids_2)


SECOND_TOKENIZER = "tokenizer_2"  # SDXL's, beside the first in the tokenizer model's version folder


class PromptTokenizer:
    def __init__(self, folder: str | Path, second: str | Path | None = None) -> None:
        """`folder`: a CLIP tokenizer's files; `second`: SDXL's second tokenizer (its pad token differs)."""
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_length = int(self.tokenizer.model_max_length)
        self.second = None if second is None else PromptTokenizer(second)
        # the fast tokenizer keeps padding/truncation settings between calls: one call at a time
        self._lock = threading.Lock()

    @classmethod
    def in_folder(cls, folder: Path) -> PromptTokenizer:
        """The tokenizers an export copied into `folder` (tokenizer/, and for SDXL tokenizer_2/)."""
        second = folder / SECOND_TOKENIZER
        return cls(folder / "tokenizer", second if second.is_dir() else None)

    def _padded(self, text: str) -> np.ndarray:
        """Token ids padded/truncated to the context length (the caller holds the lock)."""
        ids = self.tokenizer(
            text, padding="max_length", max_length=self.max_length, truncation=True
        ).input_ids
        return np.asarray(ids, dtype=np.int32)

    def encode(self, text: str) -> tuple[np.ndarray, int]:
        """Token ids padded/truncated to the context length, and how many tokens were cut."""
        with self._lock:
            ids = self._padded(text)
            full = self.tokenizer(text).input_ids
        return ids, max(0, len(full) - self.max_length)

    def rows(self, prompt: str, negative_prompt: str, guidance: bool) -> np.ndarray:
        """Padded ids only, [uncond, cond] with guidance, else [cond] (SDXL's second tokenizer: the
        truncation counts are the first's)."""
        with self._lock:
            return np.stack([self._padded(t) for t in ([negative_prompt, prompt] if guidance else [prompt])])

    def tokenize(self, prompt: str, negative_prompt: str, guidance: bool) -> Tokenized:
        cond, cut = self.encode(prompt)
        uncond, negative_cut = self.encode(negative_prompt)
        rows = [uncond, cond] if guidance else [cond]
        second = None if self.second is None else self.second.rows(prompt, negative_prompt, guidance)
        return Tokenized(np.stack(rows), cut, negative_cut if guidance else 0, second)
