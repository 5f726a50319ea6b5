"""How often the demo model's images follow their captions, through the full stack.

Exports `--model demo`, starts Triton and generates two fixed sets of single-object captions with
fixed seeds: held-in (combinations drawn in training) and held-out (colour x shape x position x
background combinations never drawn in training, `demo_data.HELD_OUT`). Each image is checked with
simple statistics (background colour, object colour, object shape, object centroid in the named
region); the negative control checks every image against another prompt's caption and must score
low. Prints the rates against the targets; details go to .cache/demo_quality.json.

    .venv/bin/python perf/demo_quality.py [--count 40 --guidance 5 --steps 25 --grid docs/demo_grid.png]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from sd_triton.export.demo_data import (
    Scene,
    check_scenes,
    held_in_prompts,
    held_out_prompts,
    shuffled,
    success_rates,
)
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.perf.compare import target, verdict
from sd_triton.perf.stack import serving
from sd_triton.txt2img_client import txt2img

log = logging.getLogger("demo_quality")

# all four checks right (background, object colour, shape, position): (limit, higher is better)
TARGETS = {"held-in": (0.9, True), "held-out": (0.7, True), "negative control": (0.15, False)}


def _rates_of(images: list[np.ndarray], scenes: list[Scene]) -> tuple[dict[str, float], list[dict]]:
    checks = check_scenes(images, scenes)
    details = [{"caption": s.caption, "ok": c.ok, **c.__dict__} for s, c in zip(scenes, checks, strict=True)]
    return success_rates(checks), details


def _grid(held_in: list[np.ndarray], held_out: list[np.ndarray], path: str) -> None:
    """Two rows of 5 held-in images over two rows of 5 held-out ones."""
    rows = [
        np.concatenate(block[r * 5 : (r + 1) * 5], axis=1) for block in (held_in, held_out) for r in (0, 1)
    ]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((640, 512), Image.NEAREST).save(path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=".cache/perf/demo_repository")
    parser.add_argument("--count", type=int, default=40, help="captions per set")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--out", default=".cache/demo_quality.json")
    parser.add_argument("--grid", default=None, help="also save 10 held-in over 10 held-out images as a PNG")
    args = parser.parse_args()

    # 1. Export the demo model and serve it.
    run_export(ExportOptions(model="demo", repo=Path(args.repo)))
    params = {"height": 64, "width": 64, "steps": args.steps, "guidance_scale": args.guidance}
    sets = {"held-in": held_in_prompts(args.count), "held-out": held_out_prompts(args.count)}
    images: dict[str, list[np.ndarray]] = {}
    with serving(Path(args.repo), gateway=False) as stack:
        with grpcclient.InferenceServerClient(stack.triton.grpc_url) as client:
            # 2. Both sets of fixed captions and seeds.
            for name, prompts in sets.items():
                log.info("generating %d %s captions", len(prompts), name)
                images[name] = [
                    txt2img(client, s.caption, seed=seed, scheduler=args.scheduler, **params).images[0]
                    for s, seed in prompts
                ]

    # 3. Check each image against its own caption, and against another one (the negative control).
    rates, details = {}, {}
    for name, prompts in sets.items():
        rates[name], details[name] = _rates_of(images[name], [s for s, _ in prompts])
    both = sets["held-in"] + sets["held-out"]
    rates["negative control"], details["negative control"] = _rates_of(
        images["held-in"] + images["held-out"], shuffled(both)
    )

    # 4. Report.
    verdicts = {}
    for name, (limit, higher) in TARGETS.items():
        judged = verdict(target(name, rates[name]["ok"], limit, higher))
        verdicts[name] = f"{judged} ({'>=' if higher else '<='} {limit:.0%})"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "rates": rates, "verdicts": verdicts, "details": details}, indent=1)
        + "\n"
    )
    print(f"{args.count} captions per set, {args.scheduler} {args.steps} steps, guidance {args.guidance}")
    names = ["all four" if k == "ok" else k.removeprefix("ok_") for k in rates["held-in"]]
    print(f"{'':18s}" + "".join(f"{name:>12s}" for name in names))
    for name, values in rates.items():
        print(
            f"{name:18s}" + "".join(f"{v:12.0%}" for v in values.values()) + f"   all four: {verdicts[name]}"
        )
    if args.grid:
        _grid(images["held-in"], images["held-out"], args.grid)
        print(f"grid: {args.grid} (two rows of held-in captions over two rows of held-out ones, in order)")
    print(f"details in {args.out}")


if __name__ == "__main__":
    main()
