"""The gateway load driver against the real gateway and Triton, and its metrics arithmetic."""

from __future__ import annotations

import asyncio

from sd_triton.gateway.process import GatewayProcess
from sd_triton.perf.loadgen import Load, gateway_split, parse_metrics, run_load, table, triton_split
from sd_triton.triton_server import TritonServer

BODY = {"prompt": "a red circle", "height": 64, "width": 64, "steps": 2, "seed": 5, "scheduler": "ddim"}


def test_a_load_run_reports_latency_errors_and_both_splits(
    gateway: GatewayProcess, triton: TritonServer
) -> None:
    load = Load(gateway.url, {**BODY, "num_images": 2}, concurrency=3, requests=6, stagger_s=0.02)
    result = asyncio.run(run_load(load, triton.metrics_url))
    assert (result.ok, result.errors, result.images) == (6, 0, 12)
    assert result.images_per_s > 0 and 0 < result.percentile(50) <= result.percentile(99)
    assert set(result.gateway_split_ms) == {"queue", "inference", "encode"}
    assert result.gateway_split_ms["inference"] > 0
    assert result.triton_split_ms["txt2img"]["requests"] == 6
    # the session's repository runs the UNet inline in denoise: its own timer, not Triton's unet model
    assert result.triton_split_ms["unet@denoise"]["compute_infer_ms"] > 0
    assert result.triton_split_ms["unet@denoise"]["executions"] >= 6 * BODY["steps"] / 3  # <= 3 share a call
    assert "unet" not in result.triton_split_ms
    assert "images/s" in table([result]) and "unet@denoise" in table([result])


def test_failed_requests_are_counted_with_their_message(gateway: GatewayProcess) -> None:
    result = asyncio.run(run_load(Load(gateway.url, {**BODY, "width": 2000}, concurrency=2, requests=3)))
    assert (result.ok, result.errors) == (0, 3)
    assert result.error_samples[0].startswith("HTTP 422") and "width" in result.error_samples[0]


METRICS_BEFORE = """
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="unet",version="1"} 10
nv_inference_exec_count{model="unet",version="1"} 4
nv_inference_count{model="unet",version="1"} 32
nv_inference_queue_duration_us{model="unet",version="1"} 1000
nv_inference_compute_infer_duration_us{model="unet",version="1"} 50000
sd_triton_inline_unet_calls{model="denoise"} 100
sd_triton_inline_unet_compute_us{model="denoise"} 400000
sd_triton_inline_unet_rows{model="denoise"} 200
# TYPE gateway_stage_seconds histogram
gateway_stage_seconds_count{stage="inference"} 1
gateway_stage_seconds_sum{stage="inference"} 0.5
"""
METRICS_AFTER = """
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="unet",version="1"} 30
nv_inference_exec_count{model="unet",version="1"} 9
nv_inference_count{model="unet",version="1"} 72
nv_inference_queue_duration_us{model="unet",version="1"} 5000
nv_inference_compute_infer_duration_us{model="unet",version="1"} 250000
sd_triton_inline_unet_calls{model="denoise"} 150
sd_triton_inline_unet_compute_us{model="denoise"} 600000
sd_triton_inline_unet_rows{model="denoise"} 360
sd_triton_inline_unet_calls{model="txt2img_stream"} 0
# TYPE gateway_stage_seconds histogram
gateway_stage_seconds_count{stage="inference"} 5
gateway_stage_seconds_sum{stage="inference"} 2.5
"""


def test_splits_are_the_deltas_over_the_run() -> None:
    before, after = parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER)
    split = triton_split(before, after)["unet"]
    assert split["requests"] == 20 and split["queue_ms"] == 0.2 and split["compute_infer_ms"] == 10.0
    assert split["executions"] == 5 and split["inferences"] == 40
    inline = triton_split(before, after)
    assert inline["unet@denoise"] == {"executions": 50, "inferences": 160, "compute_infer_ms": 4.0}
    assert "unet@txt2img_stream" not in inline  # no calls in the run
    assert gateway_split(before, after) == {"inference": 500.0}
