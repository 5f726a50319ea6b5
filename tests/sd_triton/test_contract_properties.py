"""Property tests of the tensor contract (sd_triton/contract.py) and the txt2img client built on it
(sd_triton/txt2img_client.py): the requests it builds for any parameters are named, typed and shaped as
the contract says and carry exactly the values given (or are refused, never silently changed); the
results it parses give back exactly what the server sent; and every request `validate_params` accepts
can be encoded.

tests/export/test_contract.py checks the configs and ONNX graphs against the contract; this file checks
the code that speaks it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from sd_triton import contract as c
from sd_triton.requests import InvalidRequest, validate_params
from sd_triton.txt2img_client import (
    Progress,
    Txt2ImgResult,
    parse_result,
    parse_stream_response,
    txt2img_inputs,
)
from tests.conftest import PROPERTIES

INT32 = np.iinfo(np.int32)
INT64 = np.iinfo(np.int64)
FP32_MAX = float(np.finfo(np.float32).max)
PARAM_SPECS = {
    "height": c.HEIGHT,
    "width": c.WIDTH,
    "steps": c.STEPS,
    "guidance_scale": c.GUIDANCE_SCALE,
    "seed": c.SEED,
    "scheduler": c.SCHEDULER,
    "num_images": c.NUM_IMAGES,
}

TEXT = st.one_of(st.text(max_size=60), st.binary(max_size=60))
PARAMS = st.fixed_dictionaries(
    {
        "prompt": TEXT,
        "height": st.integers(INT32.min, INT32.max),
        "width": st.integers(INT32.min, INT32.max),
        "steps": st.integers(INT32.min, INT32.max),
        "guidance_scale": st.one_of(
            st.floats(-FP32_MAX, FP32_MAX), st.sampled_from([math.nan, math.inf, -math.inf, FP32_MAX])
        ),
        "seed": st.integers(INT64.min, INT64.max),
        "scheduler": st.one_of(st.sampled_from(c.SCHEDULERS), st.text(max_size=20)),
        "num_images": st.integers(INT32.min, INT32.max),
    },
    optional={"negative_prompt": st.one_of(st.none(), TEXT)},
)


def decoded(tensor: Any) -> np.ndarray:
    """The values an InferInput carries on the wire, as numpy."""
    raw = tensor._get_content()
    if tensor.datatype() == "BYTES":
        array = deserialize_bytes_tensor(raw)
    else:
        array = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype()))
    return array.reshape(tensor.shape())


def same_value(spec: c.TensorSpec, got: Any, given: Any) -> bool:
    if spec.dtype == "TYPE_STRING":
        return bool(got == (given if isinstance(given, bytes) else given.encode("utf-8")))
    if spec.dtype == "TYPE_FP32":
        return bool(np.float32(given) == got or (math.isnan(given) and np.isnan(got)))
    return bool(int(got) == given)


# -- requests --------------------------------------------------------------------------------------------


@PROPERTIES
@given(params=PARAMS)
def test_inputs_match_the_contract_and_carry_the_values(params: dict[str, Any]) -> None:
    prompt = params.pop("prompt")
    inputs = txt2img_inputs(prompt, **params)
    given_values = {
        c.PROMPT.name: prompt,
        **{PARAM_SPECS[k].name: v for k, v in params.items() if k in PARAM_SPECS},
    }
    if params.get("negative_prompt") is not None:
        given_values[c.NEGATIVE_PROMPT.name] = params["negative_prompt"]
    expected = [spec for spec in c.TXT2IMG.inputs if spec.name in given_values]
    assert [t.name() for t in inputs] == [spec.name for spec in expected]  # the contract's order
    assert {s.name for s in c.TXT2IMG.inputs} - {t.name() for t in inputs} <= {
        s.name for s in c.TXT2IMG.inputs if s.optional
    }
    for tensor, spec in zip(inputs, expected, strict=True):
        assert tensor.datatype() == spec.wire_dtype, spec.name
        assert tuple(tensor.shape()) == spec.dims, spec.name  # the ensemble does not batch: dims as declared
        values = decoded(tensor)
        assert values.shape == spec.dims
        assert same_value(spec, values.reshape(-1)[0], given_values[spec.name]), (spec.name, values)


@PROPERTIES
@given(
    name=st.sampled_from(["height", "width", "steps", "num_images", "seed"]),
    offset=st.integers(min_value=1, max_value=1 << 70),
    below=st.booleans(),
)
def test_integers_the_wire_type_cannot_hold_are_refused(name: str, offset: int, below: bool) -> None:
    """numpy would wrap them (2**32 + 5 steps sent as 5): the builder refuses them, naming the input."""
    spec = PARAM_SPECS[name]
    info = np.iinfo(spec.numpy_dtype)
    value = info.min - offset if below else info.max + offset
    with pytest.raises(ValueError, match=rf"^{spec.name}: must be an integer from {info.min} to {info.max}"):
        txt2img_inputs("a cat", **{name: value})


@PROPERTIES
@given(
    name=st.sampled_from(["height", "width", "steps", "num_images", "seed"]),
    value=st.floats(-1e6, 1e6).filter(lambda v: not v.is_integer()),
)
def test_fractions_for_integer_inputs_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{PARAM_SPECS[name].name}: must be an integer"):
        txt2img_inputs("a cat", **{name: value})


@PROPERTIES
@given(value=st.floats(min_value=FP32_MAX, exclude_min=True, allow_infinity=False), negative=st.booleans())
def test_finite_guidance_past_fp32_is_refused(value: float, negative: bool) -> None:
    """It would round to inf, and Triton would answer about an inf the client never sent."""
    with pytest.raises(ValueError, match=r"^GUIDANCE_SCALE: must be within"):
        txt2img_inputs("a cat", guidance_scale=-value if negative else value)


# -- results ---------------------------------------------------------------------------------------------


def infer_result(outputs: dict[str, np.ndarray]) -> InferResult:
    """A ModelInferResponse as Triton sends it (raw contents), wrapped as tritonclient does."""
    response = service_pb2.ModelInferResponse(model_name=c.TXT2IMG.name)
    for name, array in outputs.items():
        wire = next(t for m in (c.TXT2IMG, c.TXT2IMG_STREAM) for t in m.outputs if t.name == name).wire_dtype
        response.outputs.add(name=name, datatype=wire, shape=list(array.shape))
        if wire == "BYTES":
            response.raw_output_contents.append(serialize_byte_tensor(array).item())
        else:
            response.raw_output_contents.append(array.tobytes())
    return InferResult(response)


ENGINE = st.fixed_dictionaries(
    {
        "component": st.just("unet"),
        "version": st.integers(1, 99),
        "engine": st.sampled_from(c.ENGINE_KINDS),
        "precision": st.sampled_from(["fp32", "fp16", "int8"]),
        "sha256": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    }
)
IMAGES = hnp.arrays(
    np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 16), st.integers(1, 16), st.just(3))
)


@PROPERTIES
@given(
    images=IMAGES,
    cut=st.integers(0, INT32.max),
    negative_cut=st.integers(0, INT32.max),
    engines=st.lists(ENGINE, max_size=2),
)
def test_results_parse_back_to_what_the_server_sent(
    images: np.ndarray, cut: int, negative_cut: int, engines: list[dict[str, Any]]
) -> None:
    outputs = {
        c.IMAGES.name: images,
        c.PROMPT_TRUNCATED_TOKENS.name: np.array([cut], np.int32),
        c.NEGATIVE_PROMPT_TRUNCATED_TOKENS.name: np.array([negative_cut], np.int32),
        c.ENGINES.name: np.array([json.dumps(engines).encode()], dtype=object),
    }
    for parse in (parse_result, parse_stream_response):
        result = parse(infer_result(outputs))
        assert isinstance(result, Txt2ImgResult)
        assert result.images.dtype == np.uint8 and np.array_equal(result.images, images)
        assert (result.prompt_truncated_tokens, result.negative_prompt_truncated_tokens) == (
            cut,
            negative_cut,
        )
        assert result.engines == engines


@PROPERTIES
@given(steps=st.integers(1, 150), data=st.data(), previews=st.one_of(st.none(), IMAGES))
def test_step_responses_parse_as_progress(
    steps: int, data: st.DataObject, previews: np.ndarray | None
) -> None:
    step = data.draw(st.integers(1, steps), label="step")
    outputs = {c.STEP.name: np.array([step], np.int32), c.STEPS_TOTAL.name: np.array([steps], np.int32)}
    if previews is not None:
        outputs[c.PREVIEW_IMAGES.name] = previews
    progress = parse_stream_response(infer_result(outputs))
    assert isinstance(progress, Progress) and (progress.step, progress.steps) == (step, steps)
    assert (progress.previews is None) == (previews is None)
    if previews is not None:
        assert np.array_equal(progress.previews, previews)


def test_a_response_with_neither_images_nor_step_is_refused() -> None:
    with pytest.raises(ValueError, match="neither IMAGES nor STEP"):
        parse_stream_response(infer_result({c.STEPS_TOTAL.name: np.array([3], np.int32)}))


# -- the contract and the limits -------------------------------------------------------------------------

LIMIT_FIELDS = ("max_steps", "max_side", "max_num_images")


@PROPERTIES
@given(
    max_steps=st.integers(1, INT32.max),
    max_side=st.integers(1, INT32.max),
    max_num_images=st.integers(1, INT32.max // 2),
)
def test_positive_limits_are_accepted(max_steps: int, max_side: int, max_num_images: int) -> None:
    limits = c.Limits(max_steps=max_steps, max_side=max_side, max_num_images=max_num_images)
    assert (limits.max_steps, limits.max_side, limits.max_num_images) == (max_steps, max_side, max_num_images)
    assert limits.max_unet_batch == 2 * max_num_images


@PROPERTIES
@given(
    field=st.sampled_from(LIMIT_FIELDS),
    value=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=4), st.none()),
)
def test_other_limits_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^Limits\.{field} must be a positive integer, got "):
        c.Limits(**{field: value})


LIMITS = st.builds(
    c.Limits,
    max_steps=st.integers(1, 1000),
    max_side=st.integers(1, 1 << 16),
    max_num_images=st.integers(1, 64),
    max_seed=st.one_of(st.integers(0, INT64.max), st.just(INT64.max)),
)


@PROPERTIES
@given(
    limits=LIMITS,
    multiple=st.sampled_from([1, 4, 8, 16]),
    params=PARAMS,
)
def test_what_validation_accepts_can_be_encoded(
    limits: c.Limits, multiple: int, params: dict[str, Any]
) -> None:
    """Within INT32 limits (the wire type of HEIGHT, WIDTH, STEPS, NUM_IMAGES), every request
    `validate_params` accepts is encoded exactly, the last image's seed included; every one it refuses
    names one of the request's inputs."""
    prompt = params.pop("prompt")
    params.pop("negative_prompt", None)
    try:
        checked = validate_params(**params, limits=limits, spatial_multiple=multiple)
    except InvalidRequest as exc:
        assert exc.field in {spec.name for spec in PARAM_SPECS.values()}, exc
        assert str(exc).startswith(f"{exc.field}: ")
        return
    assert checked.seed + checked.num_images - 1 <= min(limits.max_seed, INT64.max)
    inputs = txt2img_inputs(prompt, **vars(checked))
    carried = {t.name(): decoded(t).reshape(-1)[0] for t in inputs}
    for name, spec in PARAM_SPECS.items():
        assert same_value(spec, carried[spec.name], getattr(checked, name)), name


def test_every_model_names_its_tensors_once_with_known_types() -> None:
    for model in c.MODELS.values():
        for tensors, lookup in ((model.inputs, model.input), (model.outputs, model.output)):
            names = [t.name for t in tensors]
            assert len(names) == len(set(names)), model.name
            for tensor in tensors:
                assert lookup(tensor.name) is tensor
                assert tensor.dtype in c.NUMPY_DTYPES and tensor.dtype in c.WIRE_DTYPES, tensor
                assert all(d == -1 or d > 0 for d in tensor.dims), tensor
                assert not tensor.optional or tensors is model.inputs, f"{model.name}: optional output"
    # the streaming model takes the ensemble's inputs and answers its outputs, and then some
    assert set(c.TXT2IMG.inputs) < set(c.TXT2IMG_STREAM.inputs)
    assert set(c.TXT2IMG.outputs) < set(c.TXT2IMG_STREAM.outputs)
