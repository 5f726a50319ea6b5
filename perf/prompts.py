"""`sd-triton perf prompts`: what reading a prompt costs per request (the tokenizer model's work and the
loop's weighting), a long weighted prompt against a short plain one.

On the preset's tokenizer (and its text encoder's width), in this process: `calls` times per prompt, rounds
interleaved, each round's median in ms:

- `plain`: a 20-token prompt, plain syntax (one chunk, diffusers' tokenization);
- `a1111`: a ~300-token prompt in AUTOMATIC1111's syntax (weights, nesting, BREAK): parsing, chunking (4
  chunks) and, beside it, `weighting`: the emphasis applied to its [2, 308, 768] embeddings (SD 1.5's
  width, `width`).
- `embeddings`: the same prompt with two textual-inversion tokens of a 20-embedding library (8 vectors each,
  `sd-triton embeddings add`): the library's check for changes, the learned ids and the request's table.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SHORT = "a watercolor painting of a lighthouse at dawn, soft light"


def long_prompt(parts: int = 78) -> str:
    """About 300 tokens (once read) of weighted, nested, BREAK-separated text."""
    words = [f"(detail {i}:1.{i % 9 + 1})" if i % 4 == 0 else f"[[thing {i}]]" if i % 4 == 1 else f"word {i}"
             for i in range(parts)]  # fmt: skip
    return ", ".join(words[: parts // 2]) + " BREAK " + ", ".join(words[parts // 2 :])


@dataclass(frozen=True)
class PromptBenchSettings:
    preset: str = "tiny"
    calls: int = 50
    rounds: int = 3
    width: int = 768  # the embeddings weighted: SD 1.5's text width (the presets' are smaller)

    def __post_init__(self) -> None:
        for name in ("calls", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


LIBRARY_SIZE, VECTORS = 20, 8


def _library(tokenizer_folder: Path, repo: Path, width: int) -> Path:
    """A tokenizer model folder in `repo` with LIBRARY_SIZE embeddings (`<style-i>`) added as users add them;
    its version folder."""
    from safetensors.numpy import save_file

    from sd_triton.export import embeddings
    from sd_triton.pipeline_config import FILENAME, PipelineConfig

    version = repo / "tokenizer" / "1"
    shutil.copytree(tokenizer_folder, version / "tokenizer")
    config = PipelineConfig(4, 8, 0.18215, {}, text_widths=[width])
    config.save(version / FILENAME)
    rng = np.random.default_rng(0)
    for i in range(LIBRARY_SIZE):
        file = repo / f"style-{i}.safetensors"
        save_file({"emb_params": rng.normal(size=(VECTORS, width)).astype(np.float32)}, str(file))
        embeddings.add(repo, file, f"<style-{i}>")
    return version


def run_prompt_bench(settings: PromptBenchSettings, work_dir: Path) -> dict[str, Any]:
    from sd_triton import prompts
    from sd_triton.export.presets import ensure_preset_checkpoint
    from sd_triton.perf.compare import machine
    from sd_triton.runtime.tokenize import PromptTokenizer

    folder = ensure_preset_checkpoint(settings.preset, work_dir / settings.preset)
    tokenizer = PromptTokenizer(folder / "tokenizer")
    scratch = Path(tempfile.mkdtemp(prefix="perf-prompts-"))
    learned = PromptTokenizer.in_folder(_library(folder / "tokenizer", scratch, settings.width))
    text = long_prompt()
    with_tokens = text.replace("word 2,", "<style-3> word 2,").replace(
        "word 50,", "(<style-17>:1.2) word 50,"
    )
    used = learned.tokenize(with_tokens, "blurry", guidance=True, syntax="a1111", max_chunks=4)
    long = tokenizer.tokenize(text, "blurry", guidance=True, syntax="a1111", max_chunks=4)
    pieces = [piece for piece, weight in prompts.parse(text, "a1111") if weight is not None]
    tokens = sum(len(ids) for ids in tokenizer.tokenizer(pieces, add_special_tokens=False).input_ids)
    embeds = np.random.default_rng(0).normal(size=(*long.input_ids.shape, settings.width)).astype(np.float32)
    work = {
        "plain": lambda: tokenizer.tokenize(SHORT, "", guidance=True),
        "a1111": lambda: tokenizer.tokenize(text, "blurry", guidance=True, syntax="a1111", max_chunks=4),
        "weighting": lambda: prompts.weighted(embeds, long.weights),
        "embeddings": lambda: learned.tokenize(
            with_tokens, "blurry", guidance=True, syntax="a1111", max_chunks=4
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in work}
    for round_index in range(settings.rounds):
        log.info("round %d/%d", round_index + 1, settings.rounds)
        for name, call in work.items():
            samples = []
            for _ in range(settings.calls):
                started = time.perf_counter()
                call()
                samples.append(time.perf_counter() - started)
            times[name].append(1000 * statistics.median(samples))
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "settings": asdict(settings),
        "machine": machine(),
        "long_prompt_tokens": tokens,
        "long_prompt_chunks": long.input_ids.shape[1] // 77,
        "learned_vectors": int(used.vectors[0].shape[1]),
        "ms": {name: [round(t, 3) for t in values] for name, values in times.items()},
    }


def table(document: dict[str, Any]) -> str:
    s = document["settings"]
    lines = [
        f"perf prompts: {s['preset']}'s tokenizer, {s['calls']} calls per prompt, {s['rounds']} rounds; "
        f"the long prompt: {document['long_prompt_tokens']} tokens, {document['long_prompt_chunks']} chunks; "
        f"weighting at width {s['width']}; embeddings: {document.get('learned_vectors', 0)} learned vectors "
        f"of a {LIBRARY_SIZE}-embedding library",
        "| work per request | ms per round (median) |",
        "|---|---|",
        *(f"| {name} | {', '.join(str(v) for v in values)} |" for name, values in document["ms"].items()),
    ]
    return "\n".join(lines)
