"""`sd-triton perf controlnet` on tiny, one call per configuration: every configuration runs through the
loop's code and gives the UNet's output shape, the ControlNet ones differ from the plain step (they steer),
and the document and table carry each configuration's figures. No timing is asserted."""

from __future__ import annotations

from sd_triton.perf.controlnet import CONFIGS, ControlNetBenchSettings, run_controlnet_bench, table
from tests.conftest import WORK_DIR


def test_a_short_run_measures_every_configuration() -> None:
    document = run_controlnet_bench(ControlNetBenchSettings(calls=1, rounds=2), WORK_DIR)
    assert list(document["ms_per_step"]) == list(CONFIGS)
    assert all(len(v) == 2 and min(v) > 0 for v in document["ms_per_step"].values())
    assert set(document["over_none"]) == {"zeros", "one", "two"}
    rendered = table(document)
    assert all(f"| {name} |" in rendered for name in CONFIGS)
    assert document["outputs_differ"] == {"zeros": False, "one": True, "two": True}
