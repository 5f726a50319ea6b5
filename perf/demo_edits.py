"""The README's image-input picture: the demo model drawing a scene, recolouring it (image-to-image) and
repainting a masked region (inpainting), through Triton and the gateway as a client calls them.

    .venv/bin/python perf/demo_edits.py --out docs/demo_edits.png   # exports the demo model, starts both
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.perf.stack import serving

log = logging.getLogger("sd_triton.perf.demo_edits")
COMMON = {"steps": 25, "guidance_scale": 5.0, "scheduler": "ddim", "height": 64, "width": 64}
SCENE = ("a red circle on a blue background", 3)
# (caption, extra fields): what the picture shows after the scene
EDITS = [
    ("a red circle on a yellow background", {"strength": 0.7}),
    ("a white circle on a blue background", {"strength": 0.8}),
    ("a green square on a blue background", {"strength": 1.0, "mask": "centre"}),
]


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(response: httpx.Response) -> np.ndarray:
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["base64"]))))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=".cache/perf/demo_repository")
    parser.add_argument("--out", default="docs/demo_edits.png")
    parser.add_argument("--scale", type=int, default=4, help="pixels per image pixel in the picture")
    args = parser.parse_args()

    # 1. The demo model, Triton and the gateway.
    run_export(ExportOptions(model="demo", repo=Path(args.repo)))
    with serving(Path(args.repo)) as stack, httpx.Client(base_url=stack.gateway_url, timeout=120) as http:
        # 2. The scene, then each edit of it.
        caption, seed = SCENE
        scene = _image(http.post("/v1/generate", json={"prompt": caption, "seed": seed, **COMMON}))
        tiles = [scene]
        for caption, extra in EDITS:
            body = {"prompt": caption, "seed": seed + 1, "image": _png(scene), **COMMON, **extra}
            if extra.get("mask") == "centre":  # repaint the middle, where the object is; keep the rest
                mask = np.zeros(scene.shape[:2], dtype=np.uint8)
                h, w = scene.shape[:2]
                mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
                body["mask"] = _png(mask)
            tiles.append(_image(http.post("/v1/generate", json=body)))
            log.info("%s (%s)", caption, {k: v for k, v in extra.items() if k != "mask"})
    # 3. The tiles side by side, scaled up without smoothing.
    strip = np.concatenate(tiles, axis=1)
    size = (strip.shape[1] * args.scale, strip.shape[0] * args.scale)
    Image.fromarray(strip).resize(size, resample=Image.Resampling.NEAREST).save(args.out)
    print(f"{args.out}: {SCENE[0]!r}, then " + "; ".join(f"{c!r} {e}" for c, e in EDITS))


if __name__ == "__main__":
    main()
