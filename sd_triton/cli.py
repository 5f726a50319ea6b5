"""The `sd-triton` command. Assembled here, the one module (with the demo) that may import every room:
each room registers its own commands (`add_parser` in sd_triton.export.cli, sd_triton.gateway.cli,
sd_triton.perf.cli); `triton` and `generate` live here. A command whose extra is not installed says
which one to install (sd_triton.extras)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from sd_triton.export.cli import add_parser as add_export_parser
from sd_triton.extras import missing_extra
from sd_triton.gateway.cli import add_parser as add_gateway_parser
from sd_triton.perf.cli import add_parser as add_perf_parser

log = logging.getLogger("sd_triton")


def _triton(args: argparse.Namespace) -> int:
    from sd_triton.export.engines import tensorrt_problems
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


SIZE_ARGS = tuple(
    f"{side}{name}"
    for side in ("", "negative_")
    for name in ("original_size", "crops_coords_top_left", "target_size")
)


def _generate(args: argparse.Namespace) -> int:
    from sd_triton.sdk import Client, SDTritonError

    params = {
        "model": args.model,
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
        "image": args.image,
        "mask": args.mask,
        "strength": args.strength,
        **{name: getattr(args, name) for name in SIZE_ARGS},
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
    add_export_parser(sub)

    tr = sub.add_parser("triton", help="run the CPU Triton server bundled with nvidia-pytriton")
    tr.add_argument("--repo", default="model_repository")
    tr.add_argument("--grpc-port", type=int, default=8001)
    tr.add_argument("--http-port", type=int, default=8000)
    tr.add_argument("--metrics-port", type=int, default=8002)
    tr.add_argument(
        "--log-file",
        default=None,
        help="default: logs/triton-<grpc port>.log in the state directory (SD_TRITON_STATE_DIR)",
    )
    tr.set_defaults(run=_triton, extra="serve")

    add_gateway_parser(sub)

    gen = sub.add_parser("generate", help="one image from a running gateway")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    gen.add_argument("--api-key", default=None)
    gen.add_argument(
        "--model", default=None, help="a served model's id (GET /v1/models); default: the gateway's"
    )
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--scheduler", default=None)
    gen.add_argument("--num-images", type=int, default=None)
    gen.add_argument(
        "--image", type=Path, default=None, help="image-to-image: the init image (PNG, JPEG, WebP)"
    )
    gen.add_argument("--mask", type=Path, default=None, help="inpainting, with --image: white is repainted")
    gen.add_argument("--strength", type=float, default=None, help="image-to-image: 0 < s <= 1 (default 0.8)")
    for name in SIZE_ARGS:  # SDXL's size conditioning, diffusers' parameter names
        gen.add_argument(
            f"--{name.replace('_', '-')}", type=int, nargs=2, default=None, metavar=("A", "B"),
            help=f"SDXL models only: {name} (height width, or top left for a crop)",
        )  # fmt: skip
    gen.set_defaults(run=_generate, extra=None)

    add_perf_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.run(args))
    except ModuleNotFoundError as exc:
        error = missing_extra(exc, args.command, args.extra)
        if error is None:
            raise
        log.error("%s", error)
        return 3
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
