from __future__ import annotations

import pytest
from google.protobuf.json_format import MessageToDict

from sd_triton.contract import ENGINE_MODELS, Limits
from sd_triton.export.repository import CONFIG_FILE, parse
from sd_triton.served_model import EngineInfo, ServedModel, engine_info


def test_read_back_from_exported_configs(exported: dict) -> None:
    configs = {
        name: MessageToDict(
            parse((exported["repo"] / name / CONFIG_FILE).read_text()), preserving_proto_field_name=True
        )
        for name in ("txt2img", *ENGINE_MODELS)
    }
    served = ServedModel.from_configs(configs)
    assert served.model == "tiny"
    assert (served.native_height, served.native_width, served.spatial_multiple) == (64, 64, 8)
    assert served.limits == Limits()
    manifest = exported["manifest"]["components"]
    for name in ENGINE_MODELS:  # version 1 serves, with the hash of its exported graph
        sha = manifest[name]["onnx"]["artifacts"][f"{name}/1/model.onnx"]
        assert served.engines[name] == EngineInfo("python-ort", "fp32", version=1, sha256=sha)


def test_round_trip_and_kinds() -> None:
    served = ServedModel("sd15", 512, 512, 8, Limits(max_side=768))
    params = {k: {"string_value": v} for k, v in served.to_parameters().items()}
    back = ServedModel.from_configs({"txt2img": {"parameters": params}})
    assert back == served
    assert engine_info(
        {"platform": "tensorrt_plan", "parameters": {"precision": {"string_value": "fp16"}}}
    ) == (EngineInfo("tensorrt", "fp16"))
    assert engine_info({"platform": "onnxruntime_onnx"}).kind == "onnxruntime"
    with pytest.raises(ValueError, match="re-export"):
        ServedModel.from_configs({"txt2img": {"parameters": {}}})
