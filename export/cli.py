"""`sd-triton export`, `sd-triton train-demo-model` and `sd-triton engine ...`: registered on the
`sd-triton` parser by `add_parser`. Light at import (argparse and the contract): the work is imported
when a command runs, so `sd-triton --help` works without the [export] extra."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd_triton.cliargs import from_args
from sd_triton.contract import ENGINE_KINDS, ENGINE_MODELS, Limits

log = logging.getLogger("sd_triton")


def parse_engines(value: str) -> dict[str, str]:
    """`KIND` for every engine model, or `model=KIND,...` over a default of python-ort."""
    engines = dict.fromkeys(ENGINE_MODELS, "python-ort")
    if "=" not in value:
        return dict.fromkeys(ENGINE_MODELS, value)
    for part in value.split(","):
        model, _, kind = part.partition("=")
        engines[model.strip()] = kind.strip()
    return engines


def _engine_list(args: argparse.Namespace) -> int:
    from sd_triton.export.engines import engine_rows, table

    rows = engine_rows(Path(args.repo), args.triton_http, args.pipeline)
    print(json.dumps(rows, indent=2) if args.json else table(rows))  # the command's output
    return 0


def _engine_set(args: argparse.Namespace) -> int:
    from sd_triton.export.engine_swap import (
        EngineSwapError,
        GateSettings,
        SwapOptions,
        gate_table,
        set_engine,
    )
    from sd_triton.export.parity import ParityGate

    gate = GateSettings(
        steps=args.gate_steps,
        gate=ParityGate(min_psnr_db=args.min_psnr, max_abs=args.max_abs),
    )
    options = SwapOptions(
        component=args.component,
        kind=args.kind,
        precision=args.precision,
        artifact=Path(args.artifact) if args.artifact else None,
        force=args.force,
        gate=gate,
        triton_http=args.triton_http,
        pipeline=args.pipeline or "",
    )
    try:
        result = set_engine(Path(args.repo), options)
    except EngineSwapError as exc:
        log.error("%s", exc)
        return 1
    print(gate_table(result.report, result.failures))  # the command's output: the gate's figures
    if not result.switched:
        return 1
    record = result.record
    assert record is not None
    print(f"{args.component}: version {record.version} live ({record.kind}, {record.precision})")
    return 0


def _engine_rollback(args: argparse.Namespace) -> int:
    from sd_triton.export.engine_swap import EngineSwapError, rollback

    try:
        record = rollback(Path(args.repo), args.component, args.triton_http, args.pipeline or "")
    except EngineSwapError as exc:
        log.error("%s", exc)
        return 1
    print(f"{args.component}: version {record.version} live again ({record.kind}, {record.precision})")
    return 0


def _engine_check(args: argparse.Namespace) -> int:
    from sd_triton.export.engines import tensorrt_problems

    problems = tensorrt_problems(Path(args.repo))
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("Triton cannot serve %s's TensorRT plans on this machine", args.repo)
        return 2
    print(f"{args.repo}: every live engine can run here")
    return 0


def _print_listing(
    rows: list[dict[str, Any]], as_json: bool, columns: dict[str, Callable[[dict[str, Any]], Any]]
) -> None:
    """A library's `list`: JSON, or a markdown table of `columns` (header: the cell of a row)."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell(row)) for cell in columns.values()) + " |")


def _lora(args: argparse.Namespace) -> int:
    from sd_triton.export import lora
    from sd_triton.export.manifest import ManifestError

    repo, pipeline = Path(args.repo), args.pipeline
    try:
        if args.lora_command == "add":
            record = lora.add(repo, Path(args.file), args.name, pipeline, replace=args.replace)
            print(json.dumps(record.summary(), indent=2))  # the command's output
        elif args.lora_command == "list":
            rows = [r.summary() for r in lora.listed(repo, pipeline)]
            _print_listing(rows, args.json, {
                "name": lambda r: r["name"], "format": lambda r: r["format"], "rank": lambda r: r["rank"],
                "targets": lambda r: ", ".join(f"{k} {v}" for k, v in r["components"].items()),
                "sha256": lambda r: r["sha256"][:12], "source": lambda r: r["source"],
            })  # fmt: skip
        else:
            lora.remove(repo, args.name, pipeline)
    except (lora.LoraError, ValueError, ManifestError) as exc:  # a bad name, file or pipeline: said
        log.error("%s", exc)
        return 1
    return 0


def _embeddings(args: argparse.Namespace) -> int:
    from sd_triton.export import embeddings

    repo, pipeline = Path(args.repo), args.pipeline
    try:
        if args.embeddings_command == "add":
            record = embeddings.add(repo, Path(args.file), args.token, pipeline, replace=args.replace)
            print(json.dumps(record.summary(), indent=2))  # the command's output
        elif args.embeddings_command == "list":
            rows = [r.summary() for r in embeddings.listed(repo, pipeline)]
            _print_listing(rows, args.json, {
                "token": lambda r: r["token"], "format": lambda r: r["format"],
                "vectors": lambda r: r["vectors"], "sha256": lambda r: r["sha256"][:12],
                "source": lambda r: r["source"],
            })  # fmt: skip
        else:
            embeddings.remove(repo, args.token, pipeline)
    except ValueError as exc:  # a bad file, token or pipeline: said
        log.error("%s", exc)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sd_triton.export.controlnet import parse_option
    from sd_triton.export.pipeline import ExportOptions, run_export
    from sd_triton.export.repository import RepositorySettings

    limits = Limits(
        max_steps=args.max_steps,
        max_side=args.max_side,
        max_num_images=args.max_images,
        max_prompt_chunks=args.max_prompt_chunks,
    )
    settings = from_args(
        RepositorySettings,
        args,
        engines=parse_engines(args.engine),
        int8=tuple(name for name in args.int8.split(",") if name),
        fp16=tuple(name for name in args.fp16.split(",") if name),
        pipeline=args.name,
    )
    controlnets = dict(parse_option(text) for text in args.controlnet)
    options = ExportOptions(model=args.model, repo=Path(args.repo), settings=settings, limits=limits)
    run_export(replace(options, controlnets=controlnets))
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from sd_triton.export.train_demo import TrainConfig, refine_decoder, train_demo_model

    config = from_args(TrainConfig, args)
    if args.refine_decoder_of:
        refine_decoder(Path(args.refine_decoder_of), Path(args.out), config)
    else:
        train_demo_model(Path(args.out), config)
    return 0


def add_parser(sub: Any) -> None:
    """Register `export`, `train-demo-model` and `engine` (list, set, check, rollback)."""
    ex = sub.add_parser("export", help="diffusers checkpoint -> ONNX/TensorRT -> Triton model repository")
    ex.add_argument(
        "--model",
        required=True,
        help="a diffusers checkpoint folder, a preset with random weights (tiny, tiny-inpaint, small, sd15, "
        "tiny-xl, tiny-xl-refiner, sdxl) or 'demo'",
    )
    ex.add_argument(
        "--engine",
        default="python-ort",
        help=f"engine kind for every component ({'|'.join(ENGINE_KINDS)}), or per component: "
        "unet=tensorrt,text_encoder=onnxruntime (others python-ort)",
    )
    ex.add_argument("--repo", default="model_repository")
    ex.add_argument(
        "--name",
        default="",
        help="export as a named pipeline beside the repository's others: its models are NAME_<model> "
        "(xl_txt2img, ...), its manifest manifest.NAME.json; one Triton serves them all",
    )
    ex.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ex.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a ControlNet served with the pipeline: a diffusers ControlNetModel folder, or random:SEED (one "
        "built from the pipeline's UNet, for tests and demos); repeatable",
    )
    ex.add_argument("--ort-tensorrt", action="store_true", help="onnxruntime kind: TensorRT accelerator")
    ex.add_argument(
        "--tensorrt-refit",
        action="store_true",
        help="tensorrt kind: build the UNet's and text encoder's plans refittable, for LoRA adapters",
    )
    ex.add_argument(
        "--int8",
        default="",
        help="components served INT8-quantized on ONNX Runtime (CPU): unet, text_encoder (comma-separated)",
    )
    ex.add_argument(
        "--fp16",
        default="",
        help="components served FP16 on TensorRT while the rest stay FP32, e.g. unet (comma-separated)",
    )
    ex.add_argument(
        "--batching",
        choices=["none", "dynamic", "continuous"],
        default="continuous",
        help="how requests share UNet calls (docs/batching.md)",
    )
    ex.add_argument("--max-batch-rows", type=int, default=16, help="continuous: UNet rows per call")
    ex.add_argument("--max-wait-us", type=int, default=0, help="continuous: wait for arrivals before a step")
    ex.add_argument("--denoise-instances", type=int, default=2, help="none / dynamic: loops in flight")
    ex.add_argument(
        "--unet-path",
        choices=["auto", "inline", "bls"],
        default="auto",
        help="how the denoising loop runs the UNet: in its own process (inline) or by a BLS call per step "
        "(bls); auto: inline with continuous batching (docs/engines.md)",
    )
    ex.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
        help="dynamic: Triton's batching window on the engines (continuous: 0 on the text encoder and VAE)",
    )
    defaults = Limits()
    ex.add_argument("--max-steps", type=int, default=defaults.max_steps)
    ex.add_argument("--max-side", type=int, default=defaults.max_side)
    ex.add_argument("--max-images", type=int, default=defaults.max_num_images)
    ex.add_argument(
        "--max-prompt-chunks",
        type=int,
        default=defaults.max_prompt_chunks,
        help="a prompt's 77-token chunks (75 words' tokens each) at most; past them it is cut (inline path)",
    )
    ex.set_defaults(run=_export, extra="export")

    train = sub.add_parser("train-demo-model", help="train the small demo model on synthetic shapes (CPU)")
    train.add_argument("--out", default="models/demo")
    train.add_argument("--vae-steps", type=int, default=1500)
    train.add_argument("--unet-steps", type=int, default=3500)
    train.add_argument("--unet-lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-from", default=None, help="reuse the VAE of a folder this command saved")
    train.add_argument("--decoder-steps", type=int, default=600)
    train.add_argument(
        "--refine-decoder-of", default=None, help="a folder this command saved: only its decoder stage"
    )
    train.set_defaults(run=_train_demo, extra="export")

    engine = sub.add_parser("engine", help="the repository's engines (docs: README, Export)")
    engine.set_defaults(extra="export")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    listing = engine_sub.add_parser(
        "list", help="per component: engine kind, precision, artifact hash, loaded"
    )
    listing.add_argument("--repo", default="model_repository")
    listing.add_argument(
        "--triton-http", default=None, help="a running Triton's HTTP HOST:PORT: loaded versions"
    )
    listing.add_argument("--json", action="store_true", help="rows as JSON")
    listing.set_defaults(run=_engine_list)
    setting = engine_sub.add_parser(
        "set", help="switch a component's engine: build or reuse, parity gate, new version, Triton load"
    )
    setting.add_argument("component", choices=list(ENGINE_MODELS))
    setting.add_argument("kind", choices=list(ENGINE_KINDS))
    setting.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None)
    setting.add_argument(
        "--artifact", default=None, help="your own ONNX graph or plan instead of a built one"
    )
    setting.add_argument("--force", action="store_true", help="switch even when the parity gate fails")
    setting.add_argument("--min-psnr", type=float, default=25.0, help="gate: PSNR floor in dB (0-255 scale)")
    setting.add_argument("--max-abs", type=int, default=None, help="gate: largest pixel difference allowed")
    setting.add_argument("--gate-steps", type=int, default=8, help="gate: denoising steps per golden image")
    setting.set_defaults(run=_engine_set)
    check = engine_sub.add_parser(
        "check", help="exit 2 when a live TensorRT plan was built for another GPU/TensorRT (or never built)"
    )
    check.add_argument("--repo", default="model_repository")
    check.set_defaults(run=_engine_check)
    back = engine_sub.add_parser("rollback", help="make the version live before the current one live again")
    back.add_argument("component", choices=list(ENGINE_MODELS))
    back.set_defaults(run=_engine_rollback)
    listing.add_argument(
        "--pipeline",
        default=None,
        help="one pipeline's engines (its --name at export); default: every pipeline",
    )
    loras = sub.add_parser("lora", help="a pipeline's LoRA adapter library (docs: README, LoRA)")
    loras.set_defaults(extra="export", run=_lora)
    lora_sub = loras.add_subparsers(dest="lora_command", required=True)
    adding = lora_sub.add_parser("add", help="check a LoRA file against the pipeline's base and add it")
    adding.add_argument("file", help="a .safetensors LoRA (diffusers/PEFT or kohya keys)")
    adding.add_argument("--name", required=True, help="what requests call it")
    adding.add_argument("--replace", action="store_true", help="replace an adapter of that name")
    lora_listing = lora_sub.add_parser("list", help="the pipeline's adapters")
    lora_listing.add_argument("--json", action="store_true")
    removing = lora_sub.add_parser("remove", help="take an adapter out of the library")
    removing.add_argument("name")
    embeddings = sub.add_parser(
        "embeddings", help="a pipeline's textual-inversion embeddings (docs: README, Prompts)"
    )
    embeddings.set_defaults(extra="export", run=_embeddings)
    embeddings_sub = embeddings.add_subparsers(dest="embeddings_command", required=True)
    learning = embeddings_sub.add_parser("add", help="check an embedding file and add it under a token")
    learning.add_argument(
        "file",
        help="an AUTOMATIC1111 .pt/.safetensors, diffusers learned_embeds or SDXL (clip_l, clip_g) file",
    )
    learning.add_argument(
        "--token", default=None, help="what prompts write; default: the name the file gives"
    )
    learning.add_argument("--replace", action="store_true", help="replace the embedding of that token")
    embeddings_listing = embeddings_sub.add_parser("list", help="the pipeline's embeddings")
    embeddings_listing.add_argument("--json", action="store_true")
    forgetting = embeddings_sub.add_parser("remove", help="take an embedding out of the library")
    forgetting.add_argument("--token", required=True)
    for parser_ in (setting, back, adding, lora_listing, removing, learning, embeddings_listing, forgetting):
        parser_.add_argument(
            "--pipeline", default="", help="the pipeline's name (--name at export); default: the unnamed one"
        )
        parser_.add_argument("--repo", default="model_repository")
    for parser_ in (setting, back):
        parser_.add_argument(
            "--triton-http",
            default=None,
            help="the running Triton's HTTP HOST:PORT to load the version into (several: comma-separated)",
        )
