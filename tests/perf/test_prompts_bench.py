"""`sd-triton perf prompts`' parts: its long prompt is about 300 tokens once read, fills the export's four
chunks, carries weights (and, in `embeddings`, two learned tokens); a short run measures each kind of
work. No timing is asserted."""

from __future__ import annotations

from sd_triton.perf.prompts import PromptBenchSettings, run_prompt_bench, table
from tests.conftest import WORK_DIR


def test_a_short_run_reads_a_300_token_weighted_prompt() -> None:
    document = run_prompt_bench(PromptBenchSettings(calls=2, rounds=1), WORK_DIR)
    assert 280 <= document["long_prompt_tokens"] <= 320 and document["long_prompt_chunks"] == 4
    assert set(document["ms"]) == {"plain", "a1111", "weighting", "embeddings"}
    assert document["learned_vectors"] == 16  # two of the library's 8-vector embeddings
    assert all(len(v) == 1 and v[0] > 0 for v in document["ms"].values())
    assert "| a1111 |" in table(document)
