"""The `sd-triton` command: export a checkpoint, run Triton."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

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
    from export.engines import engine_rows, table

    rows = engine_rows(Path(args.repo), args.triton_http)
    print(json.dumps(rows, indent=2) if args.json else table(rows))  # the command's output
    return 0


def _engine_set(args: argparse.Namespace) -> int:
    from export.engine_swap import EngineSwapError, GateSettings, SwapOptions, gate_table, set_engine
    from export.parity import ParityGate

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
    from export.engine_swap import EngineSwapError, rollback

    try:
        record = rollback(Path(args.repo), args.component, args.triton_http)
    except EngineSwapError as exc:
        log.error("%s", exc)
        return 1
    print(f"{args.component}: version {record.version} live again ({record.kind}, {record.precision})")
    return 0


def _engine_check(args: argparse.Namespace) -> int:
    from export.engines import tensorrt_problems

    problems = tensorrt_problems(Path(args.repo))
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("Triton cannot serve %s's TensorRT plans on this machine", args.repo)
        return 2
    print(f"{args.repo}: every live engine can run here")
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.pipeline import ExportOptions, run_export
    from export.repository import RepositorySettings

    limits = Limits(max_steps=args.max_steps, max_side=args.max_side, max_num_images=args.max_images)
    settings = RepositorySettings(
        engines=parse_engines(args.engine),  # type: ignore[arg-type]
        precision=args.precision,
        ort_tensorrt=args.ort_tensorrt,
        denoise_instances=args.denoise_instances,
        batching=args.batching,
        max_batch_rows=args.max_batch_rows,
        max_wait_us=args.max_wait_us,
        max_queue_delay_us=args.max_queue_delay_us,
        int8=tuple(name for name in args.int8.split(",") if name),
        fp16=tuple(name for name in args.fp16.split(",") if name),
    )
    run_export(ExportOptions(model=args.model, repo=Path(args.repo), settings=settings, limits=limits))
    return 0


def _triton(args: argparse.Namespace) -> int:
    from export.engines import tensorrt_problems
    from sd_triton.triton_server import TritonServer

    problems = tensorrt_problems(Path(args.repo))
    if problems:
        for problem in problems:
            log.error("%s", problem)
        log.error("not starting Triton: its TensorRT plans cannot run on this machine")
        return 2

    server = TritonServer(
        Path(args.repo),
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_file=Path(args.log_file) if args.log_file else None,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("serving %s; Ctrl-C or SIGTERM drains in-flight requests and stops", args.repo)
    while not stop.wait(1.0):
        if server.process is not None and server.process.poll() is not None:
            log.error("Triton exited with %s:\n%s", server.process.returncode, server.log_tail())
            return 1
    log.info("stopping Triton (draining in-flight requests)")
    code = server.stop()
    log.info("Triton stopped with exit code %s", code)
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from export.train_demo import TrainConfig, refine_decoder, train_demo_model

    config = TrainConfig(
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        unet_lr=args.unet_lr,
        seed=args.seed,
        vae_from=args.vae_from,
        decoder_steps=args.decoder_steps,
    )
    if args.refine_decoder_of:
        refine_decoder(Path(args.refine_decoder_of), Path(args.out), config)
    else:
        train_demo_model(Path(args.out), config)
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from gateway.main import serve
    from gateway.settings import GatewaySettings

    overrides = {
        k: v for k, v in (("triton_url", args.triton_url), ("host", args.host), ("port", args.port)) if v
    }
    settings = GatewaySettings(**overrides)
    serve(settings)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from gateway.keys import create_key, read_key_file, revoke_key

    if args.keys_file:
        path = Path(args.keys_file)
    else:
        from gateway.settings import GatewaySettings

        path = Path(GatewaySettings().keys_file)  # SD_GATEWAY_KEYS_FILE, or the default
    if args.keys_command == "create":
        created = create_key(
            path,
            args.name,
            rate_limit_per_min=args.rate_limit,
            images_per_day=args.images_per_day,
            max_concurrency=args.concurrency,
            block_words=args.block_word,
            block_regexes=args.block_regex,
        )
        key = created.key
        # the command's output: shown this once, the file keeps only the token's hash
        print(f"id: {key.id}")
        print(f"name: {key.name}")
        print(f"token: {created.token}")
        print(f"webhook_secret: {key.webhook_secret}")
        log.info("created key %s in %s; the token is not shown again", key.id, path)
    elif args.keys_command == "list":
        keys = read_key_file(path).keys
        print("id            name                 created_at                 revoked_at                 "
              "rate/min  images/day  concurrency  rules")  # fmt: skip
        for key in keys:
            limits = [str(v) if v is not None else "-" for v in
                      (key.rate_limit_per_min, key.images_per_day, key.max_concurrency)]  # fmt: skip
            rules = len(key.block_words) + len(key.block_regexes)
            print(
                f"{key.id:<13} {key.name[:20]:<20} {key.created_at:<26} {key.revoked_at or '-':<26} "
                f"{limits[0]:>8}  {limits[1]:>10}  {limits[2]:>11}  {rules}"
            )
        log.info("%d key(s) in %s", len(keys), path)
    else:
        key = revoke_key(path, args.id)
        log.info("key %s (%s) revoked at %s", key.id, key.name, key.revoked_at)
    return 0


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _generate(args: argparse.Namespace) -> int:
    from sd_triton.sdk import Client, SDTritonError

    params = {
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
    }
    out = Path(args.output)
    try:
        with Client(args.gateway_url, api_key=args.api_key) as client:
            result = client.generate(args.prompt, **params)
    except SDTritonError as exc:
        log.error("%s", exc.message)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        log.info("wrote %s (%dx%d, seed %d)", path, image.width, image.height, image.seed)
    log.info("timings (ms): %s", result.timings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="diffusers checkpoint -> ONNX/TensorRT -> Triton model repository")
    ex.add_argument(
        "--model",
        required=True,
        help="a diffusers checkpoint folder, a preset with random weights (tiny, small, sd15) or 'demo'",
    )
    ex.add_argument(
        "--engine",
        default="python-ort",
        help=f"engine kind for every component ({'|'.join(ENGINE_KINDS)}), or per component: "
        "unet=tensorrt,text_encoder=onnxruntime (others python-ort)",
    )
    ex.add_argument("--repo", default="model_repository")
    ex.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ex.add_argument("--ort-tensorrt", action="store_true", help="onnxruntime kind: TensorRT accelerator")
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
    ex.add_argument("--max-queue-delay-us", type=int, default=2000, help="Triton's dynamic batching window")
    defaults = Limits()
    ex.add_argument("--max-steps", type=int, default=defaults.max_steps)
    ex.add_argument("--max-side", type=int, default=defaults.max_side)
    ex.add_argument("--max-images", type=int, default=defaults.max_num_images)
    ex.set_defaults(run=_export)

    tr = sub.add_parser("triton", help="run the CPU Triton server bundled with nvidia-pytriton")
    tr.add_argument("--repo", default="model_repository")
    tr.add_argument("--grpc-port", type=int, default=8001)
    tr.add_argument("--http-port", type=int, default=8000)
    tr.add_argument("--metrics-port", type=int, default=8002)
    tr.add_argument("--log-file", default=None, help="default: .cache/sd-triton/triton-<grpc port>.log")
    tr.set_defaults(run=_triton)

    train = sub.add_parser("train-demo-model", help="train the small demo model on synthetic shapes (CPU)")
    train.add_argument("--out", default="models/demo")
    train.add_argument("--vae-steps", type=int, default=600)
    train.add_argument("--unet-steps", type=int, default=4000)
    train.add_argument("--unet-lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-from", default=None, help="reuse the VAE of a folder this command saved")
    train.add_argument("--decoder-steps", type=int, default=600)
    train.add_argument(
        "--refine-decoder-of", default=None, help="a folder this command saved: only its decoder stage"
    )
    train.set_defaults(run=_train_demo)

    gw = sub.add_parser("gateway", help="run the HTTP gateway (settings also from SD_GATEWAY_* variables)")
    gw.add_argument("--triton-url", default=None, help="Triton gRPC HOST:PORT (default localhost:8001)")
    gw.add_argument("--host", default=None, help="default 127.0.0.1")
    gw.add_argument("--port", type=int, default=None, help="default 8080")
    gw.set_defaults(run=_gateway)

    keys = sub.add_parser("keys", help="the gateway's API keys: create, list, revoke (docs/access.md)")
    keys.add_argument("--keys-file", default=None, help="default: SD_GATEWAY_KEYS_FILE or the gateway's")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="a new key; prints its token and webhook secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--rate-limit", type=_positive_int, default=None, help="requests per minute")
    create.add_argument("--images-per-day", type=_positive_int, default=None, help="images per UTC day")
    create.add_argument("--concurrency", type=_positive_int, default=None, help="requests at once")
    create.add_argument("--block-word", action="extend", nargs="+", default=[], help="refused words")
    create.add_argument("--block-regex", action="extend", nargs="+", default=[], help="refused regexes")
    keys_sub.add_parser("list", help="every key with its limits (no secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key (the running gateway notices within 1 s)")
    revoke.add_argument("id")
    for parser_ in (create, keys_sub.choices["list"], revoke):
        parser_.add_argument("--keys-file", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    keys.set_defaults(run=_keys)

    engine = sub.add_parser("engine", help="the repository's engines (docs: README, Export)")
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
    for parser_ in (setting, back):
        parser_.add_argument("--repo", default="model_repository")
        parser_.add_argument(
            "--triton-http",
            default=None,
            help="the running Triton's HTTP HOST:PORT to load the version into (several: comma-separated)",
        )

    gen = sub.add_parser("generate", help="one image from a running gateway")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    gen.add_argument("--api-key", default=None)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--scheduler", default=None)
    gen.add_argument("--num-images", type=int, default=None)
    gen.set_defaults(run=_generate)

    from perf.cli import add_parser as add_perf_parser

    add_perf_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
