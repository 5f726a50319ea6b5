"""The `sd-triton` command: export a checkpoint, run Triton."""

from __future__ import annotations

import argparse
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


def _export(args: argparse.Namespace) -> int:
    from export.pipeline import ExportOptions, run_export
    from export.repository import RepositorySettings

    limits = Limits(max_steps=args.max_steps, max_side=args.max_side, max_num_images=args.max_images)
    settings = RepositorySettings(
        engines=parse_engines(args.engine),  # type: ignore[arg-type]
        precision=args.precision,
        ort_tensorrt=args.ort_tensorrt,
        denoise_instances=args.denoise_instances,
    )
    run_export(ExportOptions(model=args.model, repo=Path(args.repo), settings=settings, limits=limits))
    return 0


def _triton(args: argparse.Namespace) -> int:
    from sd_triton.triton_server import TritonServer

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="diffusers checkpoint -> ONNX/TensorRT -> Triton model repository")
    ex.add_argument("--model", required=True, help="a diffusers checkpoint folder, or 'tiny'")
    ex.add_argument(
        "--engine",
        default="python-ort",
        help=f"engine kind for every component ({'|'.join(ENGINE_KINDS)}), or per component: "
        "unet=tensorrt,text_encoder=onnxruntime (others python-ort)",
    )
    ex.add_argument("--repo", default="model_repository")
    ex.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ex.add_argument("--ort-tensorrt", action="store_true", help="onnxruntime kind: TensorRT accelerator")
    ex.add_argument("--denoise-instances", type=int, default=2)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
