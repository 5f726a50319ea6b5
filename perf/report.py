"""`sd-triton perf report`: perf/REPORT.md and a PNG chart, regenerated from saved compare results
(the JSON files `sd-triton perf compare` writes). Nothing is measured here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd_triton.perf.compare import SYSTEMS, ratios_and_targets, verdict


def is_overhead(document: dict[str, Any]) -> bool:
    """A `perf overhead` result (the others are `perf compare` results)."""
    return "serving_adds_ms_per_step" in document


def load(paths: list[Path]) -> list[dict[str, Any]]:
    documents = []
    for path in paths:
        document = json.loads(Path(path).read_text())
        if is_overhead(document):
            documents.append(document)
            continue
        missing = [k for k in ("settings", "rows", "ratios", "targets", "machine") if k not in document]
        if missing:
            raise ValueError(f"{path}: not a compare or overhead result (no {', '.join(missing)})")
        _, today = ratios_and_targets(document["rows"], document["settings"]["preset"])
        document["targets"] = with_rule_changes(document["targets"], today)
        documents.append(document)
    return documents


def with_rule_changes(stored: list[dict[str, Any]], today: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The verdicts stored with the run, as they were; a stored target that today's rules no longer
    have is marked, and today's targets the run did not have are added, marked as judged after it."""
    names = {t["target"] for t in today}
    marked = [t if t["target"] in names else {**t, "changed": "rule changed after the run"} for t in stored]
    stored_names = {t["target"] for t in stored}
    marked += [
        {**t, "changed": "new rule, judged after the run"} for t in today if t["target"] not in stored_names
    ]
    return marked


def chart(document: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for system, label in SYSTEMS.items():
        rows = sorted((r for r in document["rows"] if r["system"] == system), key=lambda r: r["concurrency"])
        if not rows:
            continue
        levels = [r["concurrency"] for r in rows]
        line = latency.plot(
            levels, [r["p50_ms"] / 1000 for r in rows], marker="o", label=f"{system}. {label}"
        )
        latency.plot(levels, [r["p95_ms"] / 1000 for r in rows], linestyle="--", color=line[0].get_color())
        throughput.plot(levels, [r["images_per_s"] for r in rows], marker="o", label=f"{system}. {label}")
    latency.set(
        xlabel="concurrency", ylabel="seconds", title="latency: p50 (solid), p95 (dashed)", xscale="log"
    )
    throughput.set(xlabel="concurrency", ylabel="images/s", title="throughput", xscale="log")
    throughput.legend(fontsize=8)
    for axes in (latency, throughput):
        axes.grid(alpha=0.3)
    preset, (height, width) = document["settings"]["preset"], document["size"]
    figure.suptitle(f"{preset} preset, {height}x{width}, {document['settings']['steps']} steps")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def section(document: dict[str, Any], chart_name: str) -> str:
    settings, machine = document["settings"], document["machine"]
    height, width = document["size"]
    lines = [
        f"## `{settings['preset']}` preset: {height}x{width}, {settings['steps']} steps, "
        f"guidance {settings['guidance_scale']}, {settings['scheduler']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu'] or 'none'}; "
        f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}.  ",
        f"Command: `{document.get('command', 'sd-triton perf compare --preset ' + settings['preset'])}`",
        "",
        (
            f"{settings['rounds']} interleaved rounds (every system at every level once per round): medians "
            "with the rounds' [min, max]; each ratio is judged on its per-round values."
            if "ratio_spreads" in document
            else "One pass per system (before interleaved rounds): single measurements, no spread."
        ),
        "",
        f"![latency and throughput]({chart_name})",
        "",
        "| system | concurrency | images/s | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in document["rows"]:
        images, p50 = f"{r['images_per_s']:.3f}", f"{r['p50_ms']:.0f}"
        if "p50_ms_spread" in r:  # interleaved rounds: the median and the rounds' [min, max]
            images += " [{:.3f}, {:.3f}]".format(*r["images_per_s_spread"])
            p50 += " [{:.0f}, {:.0f}]".format(*r["p50_ms_spread"])
        lines.append(
            f"| {r['system']}. {SYSTEMS[r['system']]} | {r['concurrency']} | {images} | "
            f"{p50} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    spreads = document.get("ratio_spreads", {})
    lines += ["", "| ratio | value | per round |", "|---|---:|---|"]
    lines += [
        f"| {name} | {value:.3f} | {', '.join(f'{v:.3f}' for v in spreads.get(name, []))} |"
        for name, value in document["ratios"].items()
    ]
    lines += ["", "| target | measured | verdict |", "|---|---:|---|"]
    for t in document["targets"]:
        changed = f" ({t['changed']})" if t.get("changed") else ""
        lines.append(f"| {t['target']} | {t['value']} | {verdict(t)}{changed} |")
    split = next(
        (r for r in reversed(document["rows"]) if r["system"] == "d" and r.get("triton_split_ms")), None
    )
    if split:
        lines += [
            "",
            f"Where (d)'s time goes at concurrency {split['concurrency']}, measured from the gateway's and "
            "Triton's own metrics during that level (ms per request or per inference):",
            "",
            "| where | requests | queue | compute input | compute infer | compute output |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        gateway = split.get("gateway_split_ms", {})
        lines.append(
            f"| gateway (queue / Triton call / encode) | | {gateway.get('queue', 0):g} | | "
            f"{gateway.get('inference', 0):g} | {gateway.get('encode', 0):g} |"
        )
        for model, stages in split["triton_split_ms"].items():
            # "unet@denoise": the UNet run inline by the loop, timed by it (calls, not Triton requests)
            where = (
                f"`{model.split('@')[0]}` inline in `{model.split('@')[1]}`"
                if "@" in model
                else f"Triton `{model}`"
            )
            count = stages.get("requests", stages.get("executions", 0))
            lines.append(
                f"| {where} | {count:g} | {stages.get('queue_ms', 0):g} | "
                f"{stages.get('compute_input_ms', 0):g} | {stages.get('compute_infer_ms', 0):g} | "
                f"{stages.get('compute_output_ms', 0):g} |"
            )
    notes = document.get("notes")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def overhead_section(document: dict[str, Any]) -> str:
    """A `perf overhead` result: the per-step split per system, what serving adds, its share of a GPU
    step, and the targets with their stored verdicts."""
    from sd_triton.perf.overhead import GPU_UNET_STEP_MS

    settings, machine = document["settings"], document["machine"]
    height, width = document["size"]
    low, high = GPU_UNET_STEP_MS
    lines = [
        f"## Serving overhead per denoising step, `{settings['preset']}` preset: {height}x{width}, "
        f"{settings['steps']} and {settings['steps_high']} steps, {settings['scheduler']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu'] or 'none'}.  ",
        f"Command: `{document.get('command', 'sd-triton perf overhead --preset ' + settings['preset'])}`; "
        f"{settings['repeats']} interleaved rounds, medians with the rounds' [min, max].",
        "",
        "| system | concurrency | ms per step (slope) | UNet ms per call | other ms per step | "
        "other ms per request step | request steps per call |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in document["rows"]:
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['step_ms']:.2f} {r['step_ms_spread']} | "
            f"{r['unet_ms']:.2f} | {r['other_ms']:.2f} {r['other_ms_spread']} | "
            f"{r['other_ms_per_request_step']:.2f} | {r['request_steps_per_call']:.2f} |"
        )
    lines += [
        "",
        f"What serving adds per step over the floor (the stack's figure minus the floor's, per round), and "
        f"its share of an SD 1.5 512x512 UNet step on an H100/A100 with TensorRT ({low:g}-{high:g} ms, the "
        "figure the GPU goals assume):",
        "",
        "| system | slope ms | outside the UNet ms | share of a GPU step (slope) |",
        "|---|---:|---:|---:|",
    ]
    for name, adds in document["serving_adds_ms_per_step"].items():
        slope, other = adds.get("step_ms"), adds.get("other_ms")
        positive = slope is not None and slope > 0
        share = f"{100 * slope / high:.0f}-{100 * slope / low:.0f} %" if positive else "none (not above 0)"
        lines.append(f"| {name} | {slope:+.2f} | {other:+.2f} | {share} |")
    lines += ["", "| target | measured | verdict |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['value']} | {verdict(t)} |" for t in document["targets"]]
    notes = document.get("notes")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def write_report(paths: list[Path], out: Path) -> Path:
    """REPORT.md at `out` with one section (and one chart beside it) per result file."""
    documents = load(paths)
    parts = [
        "# sd-triton performance report",
        "",
        (
            "Generated by `sd-triton perf report` from the results of `sd-triton perf compare` and "
            "`sd-triton perf overhead` (`perf/results/`); rerun them to refresh it. Systems: a. "
            "diffusers' StableDiffusionPipeline in one process; b. the exported ONNX files in one process "
            "with ONNX Runtime (the engine floor, no server); c. the naive service: FastAPI with the "
            "diffusers pipeline in an `async def` handler; d. this stack: the gateway over HTTP in front "
            "of Triton. Same model, prompt and seeds; each system measured alone (the others idle) at each "
            "level, in interleaved rounds; concurrency is closed-loop clients with staggered starts."
        ),
        "",
    ]
    for document in documents:
        if is_overhead(document):
            parts += [overhead_section(document), ""]
            continue
        chart_name = f"results/compare-{document['settings']['preset']}.png"
        chart(document, out.parent / chart_name)
        parts += [section(document, chart_name), ""]
    out.write_text("\n".join(parts))
    return out
