"""Gateway overhead: the same txt2img requests sent to Triton directly (gRPC) and through the
gateway (HTTP + JSON + PNG), interleaved, in one run; prints p50/p90 of each and the difference.

    .venv/bin/python perf/gateway_overhead.py --requests 40   # exports tiny, starts both servers
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import httpx
import tritonclient.grpc as grpcclient

from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.perf.stack import serving
from sd_triton.perf.stats import percentile
from sd_triton.txt2img_client import txt2img

log = logging.getLogger("sd_triton.perf.gateway_overhead")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--repo", default=".cache/perf/model_repository")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    # 1. The tiny model, Triton, the gateway.
    run_export(ExportOptions(model="tiny", repo=Path(args.repo)))
    params = {"height": args.size, "width": args.size, "steps": args.steps, "seed": 1, "scheduler": "euler"}
    direct: list[float] = []
    via: list[float] = []
    t0 = time.perf_counter()
    with (
        serving(Path(args.repo)) as stack,
        grpcclient.InferenceServerClient(stack.triton.grpc_url) as grpc,
        httpx.Client(base_url=stack.gateway_url, timeout=120) as http,
    ):
        # 2. Warm-up, then interleaved pairs so drift hits both sides alike.
        txt2img(grpc, "warm up", **params)
        http.post("/v1/generate", json={"prompt": "warm up", **params}).raise_for_status()
        for i in range(args.requests):
            started = time.perf_counter()
            txt2img(grpc, f"a lighthouse {i}", **params)
            direct.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            http.post("/v1/generate", json={"prompt": f"a lighthouse {i}", **params}).raise_for_status()
            via.append((time.perf_counter() - started) * 1000)
            if (i + 1) % 10 == 0:
                log.info("%d/%d pairs (%.0f s)", i + 1, args.requests, time.perf_counter() - t0)

    # 3. Report.
    p50_direct, p50_via = percentile(direct, 50), percentile(via, 50)
    print(
        f"{args.requests} request pairs, {args.size}x{args.size}, {args.steps} steps, tiny model, CPU Triton"
    )
    print(f"direct Triton gRPC : p50 {p50_direct:8.1f} ms   p90 {percentile(direct, 90):8.1f} ms")
    print(f"through the gateway: p50 {p50_via:8.1f} ms   p90 {percentile(via, 90):8.1f} ms")
    print(f"gateway overhead   : p50 {p50_via - p50_direct:8.1f} ms   ratio {p50_via / p50_direct:.3f}")


if __name__ == "__main__":
    main()
