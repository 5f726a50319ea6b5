"""Every component is callable alone (what perf_analyzer profiles), and a bad direct call to an
engine model fails alone."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.txt2img_client import infer_input


def infer(client: grpcclient.InferenceServerClient, model: str, arrays: dict[str, np.ndarray]):
    spec = c.MODELS[model]
    inputs = [infer_input(tensor, arrays[tensor.name]) for tensor in spec.inputs if tensor.name in arrays]
    return client.infer(model, inputs)


def unet_inputs(batch: int, hidden: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {
        "sample": rng.standard_normal((batch, 4, 8, 6), dtype=np.float32),
        "timestep": np.full((batch, 1), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, hidden), dtype=np.float32),
    }


def test_unet_alone(client) -> None:
    out = infer(client, "unet", unet_inputs(3)).as_numpy("noise_pred")
    assert out.shape == (3, 4, 8, 6) and np.isfinite(out).all()


def test_text_encoder_and_vae_alone(client) -> None:
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0] = 49406
    skips = np.zeros((2, 1), np.int32)
    vectors = np.zeros((2, 1, 32), np.float32)  # no learned tokens
    feeds = {"input_ids": ids, "clip_skip": skips, "token_embeddings": vectors}
    hidden = infer(client, "text_encoder", feeds).as_numpy("last_hidden_state")
    assert hidden.shape == (2, 77, 32)
    latents = np.zeros((1, 4, 5, 7), np.float32)
    decoded = infer(client, "vae_decoder", {"latent_sample": latents}).as_numpy("sample")
    assert decoded.shape == (1, 3, 40, 56)


def test_bad_direct_call_fails_alone(client) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, "unet", unet_inputs(2, hidden=16))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "encoder_hidden_states" in info.value.message() or "dimension" in info.value.message()
    assert client.is_server_ready()
    test_unet_alone(client)
