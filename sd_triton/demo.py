"""`make demo`: start Triton on the exported repository (the trained demo model) and the gateway
in front of it, send one prompt through the SDK, write the PNG, print its path, seed and timings,
stop both servers (also when something fails)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sd_triton.gateway.process import GatewayProcess
from sd_triton.sdk import Client
from sd_triton.triton_server import TritonServer

log = logging.getLogger("sd_triton.demo")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default="model_repository")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--out", default="demo.png")
    parser.add_argument("--size", type=int, default=None, help="default: the model's native size")
    # the demo model's sampling settings (models/demo/README.md): DDIM, 25 steps, guidance 5
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--seed", type=int, default=None, help="drawn by the gateway when absent")
    parser.add_argument("--grpc-port", type=int, default=18001)
    parser.add_argument("--http-port", type=int, default=18000)
    parser.add_argument("--metrics-port", type=int, default=18002)
    parser.add_argument("--gateway-port", type=int, default=18080)
    args = parser.parse_args(argv)

    triton = TritonServer(
        Path(args.repo), grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port
    )
    gateway = GatewayProcess(triton.grpc_url, port=args.gateway_port)
    try:
        # 1. Triton on the exported repository, then the gateway in front of it.
        triton.start()
        gateway.start()
        # 2. One prompt through the SDK.
        log.info("generating %s px, %d steps: %r", args.size or "native", args.steps, args.prompt)
        with Client(gateway.url) as client:
            result = client.generate(
                args.prompt,
                width=args.size,
                height=args.size,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                scheduler=args.scheduler,
                seed=args.seed,
            )
        # 3. The PNG, and what it took.
        image = result.images[0]
        out = image.save(Path(args.out))
        print(f"image: {out.resolve()}")
        print(f"size: {image.width}x{image.height}  seed: {image.seed}")
        print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
        return 0
    except Exception:
        log.exception("demo failed; Triton log: %s, gateway log: %s", triton.log_file, gateway.log_file)
        return 1
    finally:
        # 4. Both servers stop, whatever happened.
        gateway.stop()
        triton.stop()


if __name__ == "__main__":
    sys.exit(main())
