"""Step 1 of txt2img: CLIP tokenization of prompt and negative prompt (SDXL: by both tokenizers), with the
request's textual-inversion vectors.

Only importable inside Triton's python backend; the repository's `tokenizer/1/model.py` imports
`TritonPythonModel` from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sd_triton import contract as c
from sd_triton.model_params import TokenizerParams
from sd_triton.requests import InvalidRequest, check_guidance_scale, uses_guidance
from sd_triton.runtime import triton_io
from sd_triton.runtime.tokenize import PromptTokenizer


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.tokenizer = PromptTokenizer.in_folder(triton_io.version_dir(args))
        params = triton_io.model_params(args, TokenizerParams)
        self.max_chunks, self.max_clip_skip = params.max_prompt_chunks, params.max_clip_skip

    def execute(self, requests: list[Any]) -> list[Any]:
        return triton_io.respond(requests, c.TOKENIZER, self._tokenize)

    def _tokenize(self, request: Any) -> dict[str, np.ndarray]:
        prompt = triton_io.get_text(request, c.PROMPT)
        negative_prompt = triton_io.get_text(request, c.NEGATIVE_PROMPT, default="")
        guidance = uses_guidance(check_guidance_scale(triton_io.get_scalar(request, c.GUIDANCE_SCALE)))
        syntax = triton_io.get_text(request, c.PROMPT_SYNTAX, default="plain")
        clip_skip = triton_io.get_scalar(request, c.CLIP_SKIP) or 0
        if not 0 <= int(clip_skip) <= self.max_clip_skip:
            raise InvalidRequest(
                c.CLIP_SKIP.name,
                f"must be from 0 to {self.max_clip_skip} for this text encoder, got {clip_skip}",
            )
        out = self.tokenizer.tokenize(prompt, negative_prompt, guidance, syntax, self.max_chunks)
        second = {} if out.input_ids_2 is None else {c.INPUT_IDS_2.name: out.input_ids_2}
        tables = dict(zip((c.TOKEN_EMBEDDINGS.name, c.TOKEN_EMBEDDINGS_2.name), out.vectors, strict=False))
        weights = out.weights if out.weights is not None else np.ones(out.input_ids.shape, np.float32)
        return {
            **second,
            **tables,
            c.INPUT_IDS.name: out.input_ids,
            c.TOKEN_WEIGHTS.name: weights,
            c.CLIP_SKIPS.name: np.full((len(out.input_ids), 1), clip_skip, np.int32),
            c.PROMPT_TRUNCATED_TOKENS.name: np.array([out.prompt_truncated_tokens], np.int32),
            c.NEGATIVE_PROMPT_TRUNCATED_TOKENS.name: np.array(
                [out.negative_prompt_truncated_tokens], np.int32
            ),
        }
