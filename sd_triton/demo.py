"""`make demo`: export the tiny model, start Triton, generate an image from a prompt, write the PNG,
stop the server. (The gateway joins this path when it lands.)"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import tritonclient.grpc as grpcclient
from PIL import Image

from sd_triton.triton_server import TritonServer
from sd_triton.txt2img_client import txt2img

log = logging.getLogger("sd_triton.demo")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default="model_repository")
    parser.add_argument("--prompt", default="a watercolor painting of a lighthouse at dawn")
    parser.add_argument("--out", default="out/demo.png")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--grpc-port", type=int, default=18001)
    parser.add_argument("--http-port", type=int, default=18000)
    parser.add_argument("--metrics-port", type=int, default=18002)
    args = parser.parse_args(argv)

    # 1. Start Triton on the exported repository (`make demo` exported it just before).
    server = TritonServer(
        Path(args.repo), grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port
    )
    with server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        # 2. One request through the txt2img ensemble.
        log.info("generating %dx%d, %d steps: %r", args.size, args.size, args.steps, args.prompt)
        result = txt2img(
            client,
            args.prompt,
            height=args.size,
            width=args.size,
            steps=args.steps,
            seed=args.seed,
            scheduler="euler_a",
        )
    # 3. Write the PNG.
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.images[0]).save(out)
    log.info("wrote %s (%dx%d); Triton stopped", out, result.images.shape[2], result.images.shape[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
