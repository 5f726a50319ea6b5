"""GPU benchmark of the `sd15` preset (SD 1.5's architecture, random weights; 512x512, 25 steps) or,
with `--preset sdxl`, SDXL base's architecture (both text encoders, the UNet's added conditioning;
1024x1024, 30 steps): per-component and per-step times and the end-to-end latency, with whatever engines
the machine has. Written for one NVIDIA GPU and under 8 minutes; it also runs where only PyTorch with CUDA is
installed (diffusers and open-clip-torch carried as wheels, see perf/gpu/README.md), and stops at
once, naming the package, when one it needs is missing.

    python3 perf/gpu/bench.py --out result.json [--preset sdxl]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sd_triton.perf.gpu")
NEEDED = {
    "torch": "PyTorch with CUDA",
    "diffusers": "diffusers (a small wheel: pip download --no-deps diffusers)",
    "transformers": "transformers",
    "open_clip": "open-clip-torch (only its CLIP vocabulary file is used; pip download --no-deps)",
}
OPTIONAL = {"onnxruntime": "ONNX Runtime (CUDA execution provider)", "tensorrt": "TensorRT"}


def check_packages() -> dict[str, bool]:
    missing = [f"{name}: {what}" for name, what in NEEDED.items() if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit("perf/gpu/bench.py: missing packages:\n  " + "\n  ".join(missing))
    import torch

    if not torch.cuda.is_available():
        sys.exit("perf/gpu/bench.py: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}


def cuda_ms(fn: Any, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Milliseconds per call (CUDA events), median and min over `repeats` calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}


def step_split(pipe: Any, steps: int, size: int, dtype: Any, device: str = "cuda") -> dict[str, Any]:
    """The serving split `sd-triton perf overhead` measures on a CPU, here on the GPU: the denoising loop
    the `denoise` model runs (sd_triton.runtime.denoise.DenoiseJob: scheduler, guidance, inputs) around
    the UNet as the inline python-torch path calls it (NumPy in, NumPy out), per step: the UNet call
    (wall clock, synchronized) and everything else."""
    import numpy as np
    import torch

    from sd_triton.pipeline_config import PipelineConfig
    from sd_triton.requests import GenerationParams
    from sd_triton.runtime.denoise import AddedConditioning, DenoiseJob, time_ids

    width = int(pipe.unet.config.cross_attention_dim)  # the text states' width (SDXL: both encoders')
    xl = pipe.unet.config.addition_embed_type == "text_time"
    config = PipelineConfig(
        latent_channels=int(pipe.unet.config.in_channels),
        vae_scale_factor=int(pipe.vae_scale_factor),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        scheduler_config=dict(pipe.scheduler.config),
        text_hidden_size=width,
    )
    params = GenerationParams(size, size, steps, 7.5, 1, "ddim", 1)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, 77, width)).astype(np.float32)
    added = None
    if xl:  # the pooled embeddings and the size time ids, as the loop passes them
        pooled = rng.standard_normal((2, int(pipe.text_encoder_2.config.projection_dim))).astype(np.float32)
        added = AddedConditioning(
            pooled, np.array([time_ids((size, size), (0, 0), (size, size))] * 2, np.float32)
        )
    unet_s: list[float] = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def unet(sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray, *extra: np.ndarray) -> np.ndarray:
        sync()
        t0 = time.perf_counter()
        args = [torch.from_numpy(a).to(device, dtype) for a in (sample, hidden, *extra)]
        kwargs = {"added_cond_kwargs": {"text_embeds": args[2], "time_ids": args[3]}} if extra else {}
        out = pipe.unet(args[0], torch.from_numpy(timestep.reshape(-1)).to(device), args[1], **kwargs).sample
        noise = out.float().cpu().numpy()
        unet_s.append(time.perf_counter() - t0)
        return noise

    totals = []
    with torch.inference_mode():
        for _ in range(3):  # the first is a warm-up
            unet_s.clear()
            job = DenoiseJob(embeds, params, config, added=added)
            t0 = time.perf_counter()
            while not job.done:
                job.advance(unet(*job.unet_inputs()))
            totals.append((time.perf_counter() - t0, sum(unet_s)))
    wall, in_unet = min(totals[1:])
    return {
        "step_ms": round(1000 * wall / steps, 3),
        "unet_call_ms": round(1000 * in_unet / steps, 3),  # host-device copies included
        "other_ms": round(1000 * (wall - in_unet) / steps, 3),  # scheduler, guidance, inputs
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="gpu-result.json")
    parser.add_argument("--preset", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--steps", type=int, default=None, help="default: 25 (sd15), 30 (sdxl)")
    parser.add_argument("--size", type=int, default=None, help="default: 512 (sd15), 1024 (sdxl)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--runs", type=int, default=5, help="end-to-end runs (after one warm-up)")
    args = parser.parse_args()
    xl = args.preset == "sdxl"
    args.steps = args.steps or (30 if xl else 25)
    args.size = args.size or (1024 if xl else 512)
    optional = check_packages()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this repository's packages

    import torch
    from diffusers import DDIMScheduler

    from sd_triton.export.presets import build_sd15_pipeline, build_sdxl_pipeline

    started = time.monotonic()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "preset": args.preset,
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "engines": {},
    }
    # 1. The preset, built from its config with random weights, on the GPU.
    log.info("[1/4] building the %s preset (random weights)", args.preset)
    pipe = (build_sdxl_pipeline if xl else build_sd15_pipeline)().to("cuda", dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result["build_s"] = round(time.monotonic() - started, 1)
    latent = args.size // 8
    ids = torch.randint(0, 49407, (2, 77), device="cuda")
    hidden = torch.randn(2, 77, int(pipe.unet.config.cross_attention_dim), device="cuda", dtype=dtype)
    sample = torch.randn(2, 4, latent, latent, device="cuda", dtype=dtype)
    timestep = torch.tensor([500.0, 500.0], device="cuda")
    added: dict[str, Any] = {}  # SDXL's added conditioning: pooled text embeddings and the size time ids
    if xl:
        pooled = torch.randn(2, int(pipe.text_encoder_2.config.projection_dim), device="cuda", dtype=dtype)
        sizes = torch.tensor(
            [[args.size, args.size, 0, 0, args.size, args.size]] * 2, device="cuda", dtype=dtype
        )
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes}}

    def text_encoders() -> None:
        pipe.text_encoder(ids, output_hidden_states=xl)
        if xl:
            pipe.text_encoder_2(ids, output_hidden_states=True)

    def unet_rows(rows: int) -> None:
        repeat = rows // 2
        extra = {}
        if added:
            extra = {
                "added_cond_kwargs": {k: v.repeat(repeat, 1) for k, v in added["added_cond_kwargs"].items()}
            }
        pipe.unet(
            sample.repeat(repeat, 1, 1, 1), timestep.repeat(repeat), hidden.repeat(repeat, 1, 1), **extra
        )

    vae = pipe.vae
    if xl and vae.config.force_upcast:  # as the stack serves it (and diffusers runs it): FP32, a copy
        vae = copy.deepcopy(pipe.vae).to(torch.float32)  # (the pipeline upcasts its own around decode)
    latents = torch.randn(1, 4, latent, latent, device="cuda", dtype=dtype)
    pixels = torch.rand(1, 3, args.size, args.size, device="cuda", dtype=dtype) * 2 - 1  # an init image

    # 2. Each component alone, PyTorch eager (batch 2 = one step with guidance).
    log.info("[2/4] components, PyTorch %s", args.dtype)
    with torch.inference_mode():
        vae_dtype = next(vae.parameters()).dtype
        result["engines"]["pytorch"] = {
            "text_encoder_b2": cuda_ms(text_encoders, 20),
            "unet_step_b2": cuda_ms(lambda: unet_rows(2), 20),
            "vae_decode_b1": cuda_ms(
                lambda: vae.decode((latents / vae.config.scaling_factor).to(vae_dtype)), 10
            ),
            # image-to-image and inpainting: one encode per request (two for an inpainting UNet)
            "vae_encode_b1": cuda_ms(lambda: vae.encode(pixels.to(vae_dtype)), 10),
            "vae_dtype": str(vae_dtype).removeprefix("torch."),
        }
        # The headroom continuous batching has on this GPU: one UNet call at growing batch sizes
        # (rows = 2 per request with guidance), as image-steps per second.
        scaling = {}
        for rows in (2, 4, 8, 16, 32):
            timing = cuda_ms(lambda rows=rows: unet_rows(rows), 10)
            scaling[str(rows)] = {
                **timing,
                "image_steps_per_s": round(rows / 2 / timing["median_ms"] * 1000, 1),
            }
        result["engines"]["pytorch"]["unet_step_by_rows"] = scaling
        # 3. End to end through diffusers' pipeline.
        log.info("[3/4] end to end: %d steps at %dx%d", args.steps, args.size, args.size)

        def generate() -> None:
            pipe(
                "a red circle on a blue background",
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                output_type="np",
            )

        generate()  # warm-up
        runs = []
        for _ in range(args.runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate()
            torch.cuda.synchronize()
            runs.append(1000 * (time.perf_counter() - t0))
    step = result["engines"]["pytorch"]["unet_step_b2"]["median_ms"]
    result["engines"]["pytorch"]["end_to_end_ms"] = {
        "median": round(statistics.median(runs), 1),
        "min": round(min(runs), 1),
        "runs": [round(r, 1) for r in runs],
    }
    result["engines"]["pytorch"]["unet_share_of_end_to_end"] = round(
        args.steps * step / statistics.median(runs), 3
    )

    result["engines"]["pytorch"]["step_split"] = step_split(pipe, args.steps, args.size, dtype)

    # 4. The other engines, where this machine has them.
    log.info("[4/4] other engines")
    result["skipped"] = {}
    ort_cuda = False
    if optional["onnxruntime"]:
        import onnxruntime

        ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    result["skipped"]["onnxruntime-cuda"] = (
        f"available, not measured: the {args.preset} ONNX export does not fit this script's 8-minute budget"
        if ort_cuda
        else "no onnxruntime with the CUDA execution provider here"
    )
    result["skipped"]["tensorrt"] = (
        "available, not measured: a TensorRT build needs the ONNX export first"
        if optional["tensorrt"]
        else "tensorrt is not installed here"
    )
    result["skipped"]["triton"] = "no Triton server binary on this machine; PyTorch path measured in-process"
    result["seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log.info("wrote %s in %.0f s", args.out, result["seconds"])


if __name__ == "__main__":
    main()
