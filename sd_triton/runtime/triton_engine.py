"""The python engine kinds as a Triton python model, dynamically batched: `python-ort` (any ONNX graph
with ONNX Runtime; the default) or `python-torch` (the component's PyTorch module from its diffusers
weights), as the config's `engine` parameter says. Only importable inside Triton's python backend.
"""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils

from sd_triton.contract import ENGINE_MODELS
from sd_triton.model_params import EngineParams
from sd_triton.runtime import triton_io
from sd_triton.runtime.engine_runner import load_runner
from sd_triton.runtime.ort_runner import BatchRunner


def make_runner(args: dict[str, Any]) -> BatchRunner:
    params = triton_io.model_params(args, EngineParams)
    name = json.loads(args["model_config"])["name"]  # in a named pipeline NAME_<component>
    component = next(m for m in ENGINE_MODELS if name == m or name.endswith(f"_{m}"))
    return load_runner(component, triton_io.version_dir(args), params.engine, params.model_file, params)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.runner = make_runner(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.input_names}
            feeds.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})
        responses = []
        for out in self.runner.run_batch(feeds):
            if isinstance(out, Exception):
                responses.append(triton_io.error_response(str(out)))
                continue
            tensors = [pb_utils.Tensor(name, out[name]) for name in self.output_names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
