"""How often the demo model's images follow their captions, through the full stack.

Exports `--model demo`, starts Triton, generates the fixed set of 20 held-in captions and seeds,
checks each image with simple statistics (background colour, object colour, object centroid in the
named region) and prints the rates; details go to .cache/demo_quality.json.

    .venv/bin/python perf/demo_quality.py [--guidance 5 --steps 25 --scheduler ddim --grid docs/demo_grid.png]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from sd_triton.export.demo_data import check_image, held_in_prompts, success_rates
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.perf.stack import serving
from sd_triton.txt2img_client import txt2img

TARGET = 0.8


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=".cache/perf/demo_repository")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--out", default=".cache/demo_quality.json")
    parser.add_argument("--grid", default=None, help="also save the 20 images as a 4x5 PNG grid here")
    args = parser.parse_args()

    # 1. Export the demo model and serve it.
    run_export(ExportOptions(model="demo", repo=Path(args.repo)))
    params = {"height": 64, "width": 64, "steps": args.steps, "guidance_scale": args.guidance}
    results, images, checks = [], [], []
    with serving(Path(args.repo), gateway=False) as stack:
        with grpcclient.InferenceServerClient(stack.triton.grpc_url) as client:
            # 2. The fixed prompts and seeds, each image checked.
            for scene, seed in held_in_prompts(20):
                image = txt2img(client, scene.caption, seed=seed, scheduler=args.scheduler, **params).images[
                    0
                ]
                images.append(image)
                check = check_image(image, scene.things[0], scene.background)
                checks.append(check)
                results.append({"caption": scene.caption, "seed": seed, "ok": check.ok, **check.__dict__})

    # 3. Report.
    rates = success_rates(checks)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "rates": rates, "results": results}, indent=1) + "\n"
    )
    print(f"20 held-in captions, {args.scheduler} {args.steps} steps, guidance {args.guidance}")
    for key, rate in rates.items():
        print(f"  {key:14s} {rate:6.0%}")
    if args.grid:
        rows = [np.concatenate(images[r * 5 : (r + 1) * 5], axis=1) for r in range(4)]
        Image.fromarray(np.concatenate(rows, axis=0)).resize((640, 512), Image.NEAREST).save(args.grid)
        print(f"grid of the 20 images (rows of 5, in order): {args.grid}")
    verdict = "meets" if rates["ok"] >= TARGET else "MISSES"
    print(f"all three right: {rates['ok']:.0%} -> {verdict} the {TARGET:.0%} target; details in {args.out}")


if __name__ == "__main__":
    main()
