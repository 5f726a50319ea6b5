"""The python models' config parameters (sd_triton/model_params.py): what the export writes is what the
model reads back, defaults in one place, a bad value named."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from sd_triton import contract as c
from sd_triton.export.repository import RepositorySettings, all_configs, render
from sd_triton.model_params import (
    BatchingParams,
    DenoiseParams,
    EngineParams,
    pbtxt_max_batch_size,
    pbtxt_parameters,
)
from sd_triton.served_model import ServedModel


def as_triton_json(config) -> dict:
    """A config as Triton hands it to a python model (`args["model_config"]`)."""
    return json.loads(json_format.MessageToJson(config, preserving_proto_field_name=True))


def test_round_trip_and_defaults() -> None:
    params = DenoiseParams(batching="dynamic", max_batch=8, max_wait_us=250)
    written = params.to_parameters()
    assert written == {
        "unet_model": "unet",
        "unet_path": "bls",
        "max_batch": "8",
        "max_wait_us": "250",
        "batching": "dynamic",
    }
    assert DenoiseParams.from_parameters(written) == params
    assert DenoiseParams.from_parameters({}) == DenoiseParams()  # absent: the default
    engine = EngineParams(allow_spinning=True, torch_compile=False)
    assert engine.to_parameters()["allow_spinning"] == "1" and engine.to_parameters()["torch_compile"] == "0"
    assert EngineParams.from_parameters(engine.to_parameters()) == engine


@pytest.mark.parametrize(
    ("params", "message"),
    [({"max_batch": "many"}, "parameters.max_batch: expected an integer"),
     ({"allow_spinning": "yes"}, "parameters.allow_spinning: expected 0 or 1")],
)  # fmt: skip
def test_a_bad_value_is_named(params: dict[str, str], message: str) -> None:
    kind = EngineParams if "allow_spinning" in params else BatchingParams
    with pytest.raises(ValueError, match=message):
        kind.from_parameters(params)


@pytest.mark.parametrize("batching", ["none", "dynamic", "continuous"])
def test_what_the_export_writes_is_what_the_models_read(batching: str) -> None:
    settings = RepositorySettings(
        engines={
            "text_encoder": "python-ort",
            "unet": "python-torch",
            "vae_decoder": "python-ort",
            "vae_encoder": "python-ort",
        },  # fmt: skip
        batching=batching,  # type: ignore[arg-type]
        max_batch_rows=12,
        max_wait_us=300,
        int8=("text_encoder",),
    )
    configs = all_configs(settings, ServedModel("m", 64, 64, 8))
    denoise = DenoiseParams.from_model_config(as_triton_json(configs[c.DENOISE.name]))
    assert (denoise.batching, denoise.max_batch, denoise.max_wait_us) == (batching, 12, 300)
    stream = BatchingParams.from_model_config(as_triton_json(configs[c.TXT2IMG_STREAM.name]))
    assert (stream.max_batch, stream.max_wait_us, stream.unet_model) == (12, 300, c.UNET.name)
    encoder = EngineParams.from_model_config(as_triton_json(configs[c.TEXT_ENCODER.name]))
    assert (encoder.engine, encoder.precision) == ("python-ort", "int8")
    assert encoder.model_file == "model.int8.onnx"
    assert not encoder.allow_spinning
    unet = EngineParams.from_model_config(as_triton_json(configs[c.UNET.name]))
    assert (unet.engine, unet.model_file, unet.torch_compile) == ("python-torch", "unet", True)


def test_the_parameters_of_a_config_text_without_protobuf() -> None:
    """The inline UNet path reads the UNet's config.pbtxt in the Triton image, which has no tritonclient:
    the text the export writes, and the same by hand with other spacing, give the same parameters."""
    settings = RepositorySettings(engines={**dict.fromkeys(c.ENGINE_MODELS, "python-ort")}, int8=("unet",))
    unet = all_configs(settings, ServedModel("m", 64, 64, 8))[c.UNET.name]
    expected = {k: v.string_value for k, v in unet.parameters.items()}
    assert pbtxt_parameters(render(unet)) == expected and expected["model_file"] == "model.int8.onnx"
    by_hand = 'parameters: { key: "engine" value: { string_value: "python-torch" } }\n'
    assert pbtxt_parameters(by_hand) == {"engine": "python-torch"}
    assert pbtxt_parameters(by_hand.replace(": {", " {")) == {"engine": "python-torch"}
    assert EngineParams.from_parameters(pbtxt_parameters(render(unet))).model_file == "model.int8.onnx"
    # the max batch the inline VAE decoder splits its shared calls at
    vae = all_configs(settings, ServedModel("m", 64, 64, 8))[c.VAE_DECODER.name]
    assert vae.max_batch_size > 0 and pbtxt_max_batch_size(render(vae)) == vae.max_batch_size
    assert pbtxt_max_batch_size('name: "postprocess"\n') == 0
