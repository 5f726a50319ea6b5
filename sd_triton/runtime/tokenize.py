"""CLIP tokenization of prompt and negative prompt: in 77-token chunks (sd_triton/prompts.py), one chunk of
a plain prompt being diffusers' tokenization of it; textual-inversion tokens (sd_triton/embeddings.py) as
their learned vectors' ids and the request's table of those vectors."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from sd_triton import contract as c
from sd_triton import prompts
from sd_triton.embeddings import LIBRARY, Embedding, EmbeddingLibrary, encoder_folders
from sd_triton.pipeline_config import FILENAME as PIPELINE_FILE
from sd_triton.pipeline_config import PipelineConfig
from sd_triton.requests import InvalidRequest


@dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray  # int32 [rows, 77 x chunks]; rows: [uncond, cond] with guidance, else [cond]
    prompt_truncated_tokens: int
    negative_prompt_truncated_tokens: int
    input_ids_2: np.ndarray | None = None  # SDXL: the second tokenizer's, the same rows
    weights: np.ndarray | None = None  # float32, as input_ids: each token's weight (None: all 1)
    # per text encoder, the learned vectors the ids past the vocabulary read: [rows, E, width]
    vectors: tuple[np.ndarray, ...] = ()

    @property
    def text_encoder_inputs(self) -> tuple[np.ndarray, ...]:
        """The text encoder engine's inputs in contract order for one chunk a row (clip_skip 0): SD's ids,
        clip skip and learned vectors; SDXL's, then the second tokenizer's ids and vectors."""
        ids = [a.reshape(-1, c.TOKEN_LENGTH) for a in (self.input_ids, self.input_ids_2) if a is not None]
        chunks = len(ids[0]) // len(self.input_ids)
        vectors = [np.repeat(v, chunks, axis=0) for v in self.vectors]
        skips = np.zeros((len(ids[0]), 1), np.int32)
        second = [ids[1], vectors[1]] if len(ids) > 1 else []
        return (ids[0], skips, vectors[0], *second)


SECOND_TOKENIZER = "tokenizer_2"  # SDXL's, beside the first in the tokenizer model's version folder


class PromptTokenizer:
    def __init__(
        self,
        folder: str | Path,
        second: str | Path | None = None,
        library: EmbeddingLibrary | None = None,
        widths: tuple[int, ...] = (),
        vocabulary: int | None = None,
    ) -> None:
        """`folder`: a CLIP tokenizer's files; `second`: SDXL's second tokenizer (its pad token differs);
        `library`: the textual-inversion embeddings its prompts may use; `widths`: its text encoders'
        (the learned vectors' tables); `vocabulary`: their token embedding rows (default: the
        tokenizer's size), where learned ids start."""
        self.folder = Path(folder)
        self.tokenizer = self._load()
        self.max_length = int(self.tokenizer.model_max_length)
        self.vocabulary = int(vocabulary or len(self.tokenizer))
        self.second = None if second is None else PromptTokenizer(second, vocabulary=self.vocabulary)
        self.library, self.widths = library, widths
        tokenizer = self.tokenizer
        self.vocab = prompts.Vocabulary(
            bos=int(tokenizer.bos_token_id),
            eos=int(tokenizer.eos_token_id),
            pad=int(tokenizer.pad_token_id),
            comma=tokenizer.get_vocab().get(",</w>"),
        )
        # an added token's id -> its learned vectors' ids (vocabulary + its offset in the library's tables)
        self._learned: dict[int, list[int]] = {}
        self._tables: list[np.ndarray] = [np.zeros((0, width), np.float32) for width in widths]
        # the fast tokenizer keeps padding/truncation settings between calls, and the learned tokens change
        # with the library: one call at a time
        self._lock = threading.RLock()

    def _load(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_pretrained(str(self.folder), local_files_only=True)

    @classmethod
    def in_folder(cls, folder: Path) -> PromptTokenizer:
        """The tokenizers an export copied into `folder` (tokenizer/, and for SDXL tokenizer_2/), with the
        pipeline's embedding library (`folder`'s model folder's `embeddings/`)."""
        second = folder / SECOND_TOKENIZER
        config = PipelineConfig.load(folder / PIPELINE_FILE) if (folder / PIPELINE_FILE).is_file() else None
        if config is None or not config.text_widths:  # an export before textual inversion
            return cls(folder / "tokenizer", second if second.is_dir() else None)
        library = EmbeddingLibrary(folder.parent / LIBRARY, encoder_folders(config.architecture))
        return cls(
            folder / "tokenizer",
            second if second.is_dir() else None,
            library=library,
            widths=tuple(config.text_widths),
            vocabulary=config.vocab_size,
        )

    def learn(self, embeddings: tuple[Embedding, ...]) -> None:
        """The library's tokens, each standing for its vectors (the caller holds the lock)."""
        self.tokenizer = self._load()
        self.tokenizer.add_tokens([e.record.token for e in embeddings])
        self._learned, offset = {}, self.vocabulary
        for embedding in embeddings:
            count = embedding.record.vectors
            self._learned[self.tokenizer.convert_tokens_to_ids(embedding.record.token)] = list(
                range(offset, offset + count)
            )
            offset += count
        self._tables = [
            np.concatenate([np.zeros((0, width), np.float32), *(e.vectors[i] for e in embeddings)])
            for i, width in enumerate(self.widths)
        ]
        if self.second is not None:
            with self.second._lock:
                self.second.learn(embeddings)

    def _refresh(self) -> None:
        """The library's tokens as they are now, learned again if it changed (the caller holds the lock)."""
        if self.library is not None:
            embeddings, changed = self.library.current()
            if changed:
                self.learn(embeddings)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without BOS and EOS, a learned token as its vectors' ids (the caller holds
        the lock)."""
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False).input_ids
        if not self._learned:
            return list(ids)
        return [[i for token in row for i in self._learned.get(token, (token,))] for row in ids]

    def chunked(self, pieces: prompts.Pieces, max_chunks: int) -> prompts.Chunked:
        with self._lock:
            return prompts.chunk(pieces, self._ids, self.vocab, max_chunks)

    def tokenize(
        self, prompt: str, negative_prompt: str, guidance: bool, syntax: str = "plain", max_chunks: int = 1
    ) -> Tokenized:
        """The rows' ids in chunks of 77 (up to `max_chunks`, both rows padded to one count with the empty
        prompt's chunks) and the tokens' weights, read with `syntax` (prompts.parse; PromptSyntaxError).
        One chunk of a plain prompt is diffusers' ids for it (truncated past 75 tokens). InvalidRequest
        naming the field for an unknown syntax, a prompt it cannot read or one using more learned vectors
        than MAX_TOKEN_EMBEDDINGS."""
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
        with self._lock:  # the learned tokens stay as they are through the request
            self._refresh()
            rows = [self.chunked(p, max_chunks) for p in pieces]
            ids, weights = prompts.chunked_rows(rows, self.vocab)
            second = None
            if self.second is not None:  # SDXL: the same pieces, the second tokenizer's ids (its padding)
                second, _ = prompts.chunked_rows(
                    [self.second.chunked(p, max_chunks) for p in pieces], self.second.vocab
                )
            cut, negative_cut = rows[-1].cut, rows[0].cut if guidance else 0
            vectors = self._vectors([ids, *([] if second is None else [second])], len(ids))
            weighting = None if np.all(weights == 1.0) else weights
        return Tokenized(ids, cut, negative_cut, second, weighting, vectors)

    def _vectors(self, ids: list[np.ndarray], rows: int) -> tuple[np.ndarray, ...]:
        """The request's table of learned vectors per text encoder [rows, E, width], the vectors its ids use
        in library order (one zero row when none), its ids (changed in place) pointing into it."""
        learned = ids[0] >= self.vocabulary
        used = np.unique(ids[0][learned])
        if len(used) > c.MAX_TOKEN_EMBEDDINGS:
            raise InvalidRequest(
                c.PROMPT.name,
                f"uses {len(used)} textual-inversion vectors; at most {c.MAX_TOKEN_EMBEDDINGS} per request",
            )
        for array in ids:
            past = array >= self.vocabulary
            array[past] = self.vocabulary + np.searchsorted(used, array[past])
        tables = [
            t[used - self.vocabulary] if len(used) else np.zeros((1, t.shape[1]), np.float32)
            for t in self._tables
        ]
        return tuple(np.repeat(table[None], rows, axis=0) for table in tables)
