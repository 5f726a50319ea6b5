"""`sd-triton perf ...`: perf_analyzer tools, input data, Triton sweeps and gateway load tests.

Each command either targets running servers (`--url`, `--gateway-url`) or starts its own on an
exported repository (`--repo`) and stops them when done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd_triton.cliargs import from_args

log = logging.getLogger("sd_triton.perf")


def _positive_list(value: str, convert: type[int] | type[float], kind: str, rule: str) -> tuple[Any, ...]:
    try:
        numbers = tuple(convert(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {value!r}") from None
    if not numbers or min(numbers) <= 0:
        raise argparse.ArgumentTypeError(f"{rule}, got {value!r}")
    return numbers


def _levels(value: str) -> tuple[int, ...]:
    return _positive_list(value, int, "integers", "levels must be integers >= 1")


def _rates(value: str) -> tuple[float, ...]:
    return _positive_list(value, float, "numbers", "rates must be > 0")


def _request(args: argparse.Namespace) -> Any:
    from sd_triton.perf.inputs import DEFAULT_PROMPTS, Request

    return Request(
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        num_images=args.num_images,
        prompts=tuple(args.prompt) if args.prompt else DEFAULT_PROMPTS,
        init_image=args.init_image or args.strength is not None,
        strength=args.strength,
    )


@contextlib.contextmanager
def _triton(repo: Path, url: str | None) -> Iterator[tuple[str, str]]:
    """(gRPC host:port, metrics URL) of the given server, or of one started on `repo`."""
    if url:
        yield url, ""
        return
    from sd_triton.perf.stack import serving

    with serving(repo, gateway=False) as stack:
        yield stack.triton.grpc_url, stack.triton.metrics_url


def _tools(args: argparse.Namespace) -> int:
    from sd_triton.perf.tools import ensure_perf_analyzer

    print(ensure_perf_analyzer(Path(args.tools_dir)))
    return 0


def _inputs(args: argparse.Namespace) -> int:
    from sd_triton.perf.inputs import COMPONENTS, batch_size_for, write_inputs

    request = _request(args)
    written = write_inputs(Path(args.repo), Path(args.out), request, tuple(args.component or COMPONENTS))
    for component, path in written.items():
        print(f"{component:13s} {path}  (perf_analyzer -b {batch_size_for(component, request)})")
    return 0


def _perf_triton(args: argparse.Namespace) -> int:
    from sd_triton.perf.analyzer import Sweep, rows_as_dicts, run_sweep, table
    from sd_triton.perf.inputs import batch_size_for, write_inputs
    from sd_triton.perf.tools import ensure_perf_analyzer

    # 1. The tool and the input data for the shapes asked for.
    perf_analyzer = ensure_perf_analyzer(Path(args.tools_dir))
    request = _request(args)
    out = Path(args.out)
    data = write_inputs(Path(args.repo), out / "inputs", request, (args.model,))[args.model]
    batch = args.batch_size or batch_size_for(args.model, request)
    # 2. The sweep, against the given server or one started here.
    with _triton(Path(args.repo), args.url) as (url, _):
        sweep = Sweep(
            model=args.model,
            url=url,
            input_data=data,
            batch_size=batch,
            concurrency=args.concurrency if not args.request_rate else (),
            request_rates=args.request_rate or (),
            measurement_ms=args.measurement_ms,
        )
        rows = run_sweep(sweep, perf_analyzer, out)
    # 3. The table and the saved results.
    (out / f"{args.model}.json").write_text(
        json.dumps({"request": vars(request), "batch_size": batch, "rows": rows_as_dicts(rows)}, indent=1)
        + "\n"
    )
    print(f"{args.model}: {request.height}x{request.width}, batch {batch}; CSV {out / (args.model + '.csv')}")
    print(table(rows, batch))
    return 0


def _perf_gateway(args: argparse.Namespace) -> int:
    from sd_triton.perf.loadgen import Load, run_load, table

    body = {
        "prompt": args.prompt[0] if args.prompt else "a red circle on a blue background",
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
        "seed": 1000,
    }
    results = []
    with contextlib.ExitStack() as stack:
        gateway_url, metrics_url = args.gateway_url, args.triton_metrics_url
        if not gateway_url:
            from sd_triton.perf.stack import serving

            served = stack.enter_context(serving(Path(args.repo)))
            gateway_url, metrics_url = served.gateway_url, served.triton.metrics_url
        for concurrency in args.concurrency:
            load = Load(
                url=gateway_url,
                body=body,
                concurrency=concurrency,
                requests=max(args.requests, concurrency * args.rounds),
                stagger_s=args.stagger_ms / 1000.0,
            )
            results.append(asyncio.run(run_load(load, metrics_url or None)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gateway.json").write_text(
        json.dumps({"body": body, "results": [r.summary() for r in results]}, indent=1) + "\n"
    )
    print(table(results))
    return 0 if all(r.errors == 0 for r in results) else 1


def _perf_compare(args: argparse.Namespace) -> int:
    from sd_triton.perf.compare import CompareSettings, run_compare, table

    settings = from_args(CompareSettings, args, systems=tuple(args.systems))
    return _save(run_compare(settings, Path(args.work_dir)), args, "compare", table)


def _load_args(
    parser: argparse.ArgumentParser,
    preset: str,
    rounds: int,
    rounds_help: str = "requests per level: concurrency x rounds",
) -> None:
    """The load both benchmarks share: model, size, steps, levels, rounds."""
    parser.add_argument("--preset", default=preset, help="tiny, small, sd15 (random weights)")
    parser.add_argument("--height", type=int, default=None, help="default: the preset's native size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", type=_levels, default=(1, 4, 8, 16))
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)


def _output_args(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--work-dir", default=".cache/perf")
    parser.add_argument("--out", default=None, help=f"default: perf/results/{kind}-<preset>.json")


def _work_dir(args: argparse.Namespace) -> Path:
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def _save(document: dict[str, Any], args: argparse.Namespace, kind: str, table: Any) -> int:
    from sd_triton.perf.compare import save

    document["command"] = "sd-triton " + " ".join(args.argv)
    out = Path(args.out or f"perf/results/{kind}-{args.preset}.json")
    save(document, out)
    print(table(document))
    print(f"saved {out}")
    return 0


def _perf_batching(args: argparse.Namespace) -> int:
    from sd_triton.perf.batching import BatchingSettings, run_batching, table

    settings = from_args(
        BatchingSettings, args, stagger_s=args.stagger_ms / 1000.0, modes=tuple(args.modes.split(","))
    )
    return _save(run_batching(settings, Path(args.work_dir)), args, "batching", table)


def _perf_overhead(args: argparse.Namespace) -> int:
    from sd_triton.perf.overhead import OverheadSettings, run_overhead, table

    settings = from_args(
        OverheadSettings,
        args,
        stagger_s=args.stagger_ms / 1000.0,
        modes=tuple(args.modes.split(",")),
        unet_paths=tuple(args.unet_paths.split(",")),
    )
    return _save(run_overhead(settings, _work_dir(args)), args, "overhead", table)


def _perf_jobs(args: argparse.Namespace) -> int:
    from sd_triton.perf.jobs import JobsBenchSettings, run_jobs_bench, table

    settings = from_args(JobsBenchSettings, args, preview=not args.no_preview)
    return _save(run_jobs_bench(settings, _work_dir(args)), args, "jobs", table)


def _perf_img2img(args: argparse.Namespace) -> int:
    from sd_triton.perf.img2img import Img2ImgBenchSettings, run_img2img_bench, table

    strengths = tuple(float(s) for s in args.strengths.split(","))
    settings = from_args(Img2ImgBenchSettings, args, strengths=strengths)
    return _save(run_img2img_bench(settings, _work_dir(args)), args, "img2img", table)


def _perf_lora(args: argparse.Namespace) -> int:
    from sd_triton.perf.lora import LoraBenchSettings, run_lora_bench, table

    settings = from_args(LoraBenchSettings, args)
    return _save(run_lora_bench(settings, _work_dir(args)), args, "lora", table)


def _perf_controlnet(args: argparse.Namespace) -> int:
    from sd_triton.perf.controlnet import ControlNetBenchSettings, run_controlnet_bench, table

    settings = from_args(ControlNetBenchSettings, args)
    return _save(run_controlnet_bench(settings, _work_dir(args)), args, "controlnet", table)


def _perf_prompts(args: argparse.Namespace) -> int:
    from sd_triton.perf.prompts import PromptBenchSettings, run_prompt_bench, table

    settings = from_args(PromptBenchSettings, args)
    return _save(run_prompt_bench(settings, _work_dir(args)), args, "prompts", table)


def _perf_int8(args: argparse.Namespace) -> int:
    from sd_triton.perf.int8 import Int8Settings, run_int8, table

    settings = from_args(Int8Settings, args)
    return _save(run_int8(settings, _work_dir(args)), args, "int8", table)


def _perf_soak(args: argparse.Namespace) -> int:
    from sd_triton.perf.soak import SoakSettings, run_soak, table

    settings = from_args(SoakSettings, args)
    document = run_soak(settings, _work_dir(args))
    _save(document, args, "soak", table)
    return 0 if document["passed"] else 1


def _perf_report(args: argparse.Namespace) -> int:
    from sd_triton.perf.report import write_report

    print(write_report([Path(p) for p in args.results], Path(args.out)))
    return 0


def _request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--prompt", action="append", help="repeat for several; default: four shape captions")
    parser.add_argument(
        "--init-image", action="store_true", help="image-to-image: a seeded picture as each request's IMAGE"
    )
    parser.add_argument("--strength", type=float, default=None, help="image-to-image (implies --init-image)")


def add_parser(sub: Any) -> None:
    """Register `perf` and its subcommands on the `sd-triton` parser."""
    from sd_triton import contract

    components = (contract.TXT2IMG.name, *contract.ENGINE_MODELS)  # perf.inputs.COMPONENTS, numpy-free
    perf = sub.add_parser("perf", help="perf_analyzer sweeps, gateway load tests, benchmarks")
    perf.set_defaults(extra="dev")
    commands = perf.add_subparsers(dest="perf_command", required=True)

    tools = commands.add_parser("tools", help="install perf_analyzer into the project tool folder")
    tools.add_argument("--tools-dir", default=".tools")
    tools.set_defaults(run=_tools)

    inputs = commands.add_parser("inputs", help="perf_analyzer --input-data files for the shapes you pick")
    inputs.add_argument("--repo", default="model_repository")
    inputs.add_argument("--out", default=".cache/perf/inputs")
    inputs.add_argument("--component", action="append", choices=components, help="default: all")
    _request_args(inputs)
    inputs.set_defaults(run=_inputs)

    triton = commands.add_parser("triton", help="perf_analyzer sweep on one model of the repository")
    triton.add_argument("--repo", default="model_repository")
    triton.add_argument("--url", default=None, help="a running Triton's gRPC HOST:PORT; default: start one")
    triton.add_argument("--model", default="txt2img", choices=components)
    triton.add_argument("--concurrency", type=_levels, default=(1, 2, 4))
    triton.add_argument("--request-rate", type=_rates, default=None, help="requests/s levels, instead")
    triton.add_argument("--batch-size", type=int, default=None, help="default: one pipeline call's batch")
    triton.add_argument("--measurement-ms", type=int, default=5000)
    triton.add_argument("--tools-dir", default=".tools")
    triton.add_argument("--out", default=".cache/perf/triton")
    _request_args(triton)
    triton.set_defaults(run=_perf_triton)

    gateway = commands.add_parser("gateway", help="HTTP load test of the gateway at set concurrency levels")
    gateway.add_argument("--repo", default="model_repository")
    gateway.add_argument("--gateway-url", default=None, help="a running gateway; default: start Triton + one")
    gateway.add_argument("--triton-metrics-url", default=None, help="with --gateway-url: Triton's /metrics")
    gateway.add_argument("--concurrency", type=_levels, default=(1, 4, 8))
    gateway.add_argument("--requests", type=int, default=8, help="per level (at least concurrency x rounds)")
    gateway.add_argument("--rounds", type=int, default=2)
    gateway.add_argument("--stagger-ms", type=float, default=50.0, help="start offset between workers")
    gateway.add_argument("--out", default=".cache/perf/gateway")
    _request_args(gateway)
    gateway.set_defaults(run=_perf_gateway)

    compare = commands.add_parser("compare", help="diffusers, ONNX Runtime, a naive service and this stack")
    _load_args(compare, preset="small", rounds=3, rounds_help="interleaved rounds: every system, every level")
    compare.add_argument(
        "--min-requests",
        type=int,
        default=None,
        help="per system, level and round (default: 40 tiny, 6 others)",
    )
    compare.add_argument("--systems", default="abcd", help="a subset of abcd")
    compare.add_argument("--batching", default="continuous", choices=["none", "dynamic", "continuous"])
    compare.add_argument("--denoise-instances", type=int, default=8, help="(d): loops in flight at once")
    compare.add_argument("--max-queue-delay-us", type=int, default=2000, help="(d): dynamic batching window")
    _output_args(compare, "compare")
    compare.set_defaults(run=_perf_compare)

    batching = commands.add_parser("batching", help="no batching, Triton's dynamic batching, continuous")
    _load_args(batching, preset="tiny", rounds=4)
    batching.add_argument("--stagger-ms", type=float, default=50.0, help="arrival offset between clients")
    batching.add_argument("--modes", default="none,request,dynamic,continuous")
    batching.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode and level")
    batching.add_argument("--request-slots", type=int, default=2, help="request: loops in flight")
    batching.add_argument("--denoise-instances", type=int, default=8, help="none / dynamic: loops in flight")
    batching.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching window")
    batching.add_argument("--max-batch-rows", type=int, default=16, help="continuous: UNet rows per call")
    batching.add_argument("--max-wait-us", type=int, default=0, help="continuous: wait for arrivals")
    _output_args(batching, "batching")
    batching.set_defaults(run=_perf_batching)

    overhead = commands.add_parser(
        "overhead", help="what serving adds per denoising step, vs the engine floor"
    )
    _load_args(overhead, preset="tiny", rounds=1)
    overhead.set_defaults(concurrency=(1, 8))
    overhead.add_argument("--steps-high", type=int, default=30, help="the second step count of the slope")
    overhead.add_argument("--min-requests", type=int, default=4, help="per run, at least")
    overhead.add_argument("--stagger-ms", type=float, default=50.0, help="arrival offset between clients")
    overhead.add_argument("--modes", default="none,request,dynamic,continuous")
    overhead.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    overhead.add_argument(
        "--unet-paths",
        default="inline,bls",
        help="UNet paths measured (inline only with continuous batching)",
    )
    _output_args(overhead, "overhead")
    overhead.set_defaults(run=_perf_overhead)

    jobs = commands.add_parser("jobs", help="async jobs: time to the first step event, SSE overhead per step")
    jobs.add_argument("--preset", default="tiny", help="tiny, small, sd15 (random weights), demo")
    jobs.add_argument("--steps", type=int, default=20)
    jobs.add_argument("--repeats", type=int, default=10, help="interleaved runs of each path")
    jobs.add_argument("--no-preview", action="store_true", help="step events without preview images")
    _output_args(jobs, "jobs")
    jobs.set_defaults(run=_perf_jobs)

    img2img = commands.add_parser("img2img", help="image-to-image and inpainting against text-to-image")
    img2img.add_argument("--preset", default="small", help="tiny, small, sd15 (random weights), demo")
    img2img.add_argument("--steps", type=int, default=20)
    img2img.add_argument("--strengths", default="0.25,0.5,0.75,1", help="comma-separated, each in (0, 1]")
    img2img.add_argument("--rounds", type=int, default=3)
    img2img.add_argument("--repeats", type=int, default=3, help="requests per mode and round")
    _output_args(img2img, "img2img")
    loras = commands.add_parser(
        "lora", help="four LoRA adapter sets mixed against the base load; a new adapter"
    )
    loras.add_argument("--preset", default="tiny", help="tiny, small, sd15 (random weights), demo")
    loras.add_argument("--steps", type=int, default=10)
    loras.add_argument("--concurrency", type=int, default=8)
    loras.add_argument("--requests", type=int, default=32, help="per load and round")
    loras.add_argument("--rounds", type=int, default=3)
    loras.add_argument("--rank", type=int, default=8)
    _output_args(loras, "lora")
    loras.set_defaults(run=_perf_lora)
    controls = commands.add_parser(
        "controlnet", help="cost per step with one and two ControlNets, and zero residuals, vs none"
    )
    controls.add_argument("--preset", default="tiny", help="tiny, small, sd15 (random weights)")
    controls.add_argument("--calls", type=int, default=5, help="per configuration and round")
    controls.add_argument("--rounds", type=int, default=3)
    _output_args(controls, "controlnet")
    controls.set_defaults(run=_perf_controlnet)
    reading = commands.add_parser(
        "prompts", help="the tokenizer step: a 300-token a1111 prompt vs a short one"
    )
    reading.add_argument("--preset", default="tiny", help="tiny, small, sd15, tiny-xl (random weights)")
    reading.add_argument("--calls", type=int, default=50, help="per prompt and round")
    reading.add_argument("--rounds", type=int, default=3)
    _output_args(reading, "prompts")
    reading.set_defaults(run=_perf_prompts)
    img2img.set_defaults(run=_perf_img2img)

    int8 = commands.add_parser("int8", help="the UNet INT8 (ONNX Runtime) vs FP32: time per call, parity")
    int8.add_argument("--preset", default="small", help="tiny, small, sd15 (random weights), demo")
    int8.add_argument("--steps", type=int, default=20, help="steps of the parity images")
    int8.add_argument("--calls", type=int, default=20, help="timed UNet calls per engine")
    _output_args(int8, "int8")
    int8.set_defaults(run=_perf_int8)

    soak = commands.add_parser("soak", help="steady load for minutes: errors, p99 drift, RSS growth")
    soak.add_argument("--preset", default="small", help="tiny, small, sd15 (random weights), demo")
    soak.add_argument("--minutes", type=float, default=10.0, help="load time, warm-up included")
    soak.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    soak.add_argument("--steps", type=int, default=10)
    soak.add_argument("--height", type=int, default=None, help="default: the preset's native size")
    soak.add_argument("--width", type=int, default=None)
    soak.add_argument("--warmup-fraction", type=float, default=0.2, help="not judged: the first part")
    soak.add_argument("--windows", type=int, default=4, help="windows after the warm-up (>= 2)")
    soak.add_argument("--max-p99-drift-pct", type=float, default=10.0, help="target: last vs first window")
    soak.add_argument("--max-rss-growth-pct", type=float, default=5.0, help="target: per process group")
    soak.add_argument("--cache", action="store_true", help="the gateway's result cache on, as deployed")
    _output_args(soak, "soak")
    soak.set_defaults(run=_perf_soak)

    report = commands.add_parser("report", help="perf/REPORT.md and its chart from saved compare results")
    report.add_argument("results", nargs="+", help="compare result JSON files")
    report.add_argument("--out", default="perf/REPORT.md")
    report.set_defaults(run=_perf_report)
