"""Malformed tensors sent straight to every Triton model (no gateway in front).

For each model in the repository, cases are generated from the contract (sd_triton/contract.py): each
input a generation needs left out, an unknown input, each input with wrong dtypes, ranks and sizes,
empty (0-size) dimensions, a batch past the config's max_batch_size, NaN and +/-inf floats,
out-of-range ints (0, -1, the type's min and max, just past the model's limits), non-UTF-8, empty and
1 MiB strings. Each case states what must come back: an error (status and the words
its message must name) or, where the model legitimately accepts the input, a well-formed result
(outputs named, typed and shaped as the contract says). After each case the model is still ready; after
all of them the server is live and ready and a normal txt2img request succeeds. The streaming model is
driven through gRPC streaming, as the gateway does, one stream per case.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sd_triton import contract as c
from sd_triton.pipeline_config import FILENAME, PipelineConfig
from sd_triton.triton_server import TritonServer
from sd_triton.txt2img_client import txt2img, txt2img_inputs

log = logging.getLogger(__name__)

INVALID = "StatusCode.INVALID_ARGUMENT"
CASE_TIMEOUT_S = 60.0  # a case that has no answer by then hangs the model: a failure, not a wait
SIDE = 64  # pixels: the tiny model's native size, 8 x 8 latents
STEPS = 2
INT32 = np.iinfo(np.int32)
INT64 = np.iinfo(np.int64)
# CLIP tokenization is linear in the text (3 to 6 s per MiB here): 1 MiB where the prompt enters the
# tokenizer and the ensemble, 64 KiB for the other text inputs
HUGE_TEXT = ("a red fox in the snow " * 50_000)[: 1 << 20].encode()
LARGE_TEXT = HUGE_TEXT[: 64 << 10]
NOT_UTF8 = b"a cat \xff\xfe\xc3\x28"
UNKNOWN_INPUT = "NOT_A_REAL_INPUT"
# a generation may leave them out (SCHEDULER: the checkpoint's own runs)
OPTIONAL_INPUTS = {c.NEGATIVE_PROMPT.name, c.SCHEDULER.name, c.PREVIEW.name}
# for a wrong-dtype case: the wire types to send instead of the one the contract says
WRONG_DTYPES = {
    "TYPE_FP32": ("INT32", "FP64", "FP16", "BYTES"),
    "TYPE_INT32": ("INT64", "UINT32", "FP32", "BYTES"),
    "TYPE_INT64": ("INT32", "UINT64", "FP32"),
    "TYPE_STRING": ("INT32", "UINT8", "FP32"),
    "TYPE_BOOL": ("INT32", "UINT8", "BYTES"),
}
NUMPY_OF_WIRE = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
    "BYTES": np.object_,
}
# what each python model checks about the request's generation inputs (sd_triton/requests.py)
PARAM_LIMIT_WORDS = {
    c.HEIGHT.name: "multiple of 8",
    c.WIDTH.name: "multiple of 8",
    c.STEPS.name: "between 1 and 150",
    c.NUM_IMAGES.name: "between 1 and 4",
    c.SEED.name: "between 0 and",
    c.CLIP_SKIP.name: "must be from 0 to",
}


# -- what must come back ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Error:
    """An error answer whose message names every word, with this gRPC status (a stream's errors carry
    no status: tritonclient makes them from the response's message alone)."""

    words: tuple[str, ...] = ()
    status: str = INVALID


@dataclass(frozen=True)
class Ok:
    """A well-formed result; `check` looks further at its outputs ({name: array})."""

    check: Callable[[dict[str, np.ndarray]], None] | None = None


Expectation = Error | Ok


@dataclass
class Case:
    model: str
    name: str
    tensors: dict[str, np.ndarray | tuple[str, np.ndarray]]  # name -> array (contract dtype) or (wire, array)
    expect: Expectation
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = f"{self.model}:{self.name}"

    def inputs(self) -> list[grpcclient.InferInput]:
        specs = {t.name: t for t in c.MODELS[self.model].inputs}
        inputs = []
        for name, value in self.tensors.items():
            wire, array = value if isinstance(value, tuple) else (specs[name].wire_dtype, value)
            tensor = grpcclient.InferInput(name, list(array.shape), wire)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs


# -- valid requests, one per model --------------------------------------------------------------------


def _scalar(spec: c.TensorSpec, value: Any) -> np.ndarray:
    return np.array([value], dtype=object if spec.dtype == "TYPE_STRING" else spec.numpy_dtype)


def valid_tensors(model: str, config: PipelineConfig) -> dict[str, np.ndarray]:
    """A small request each model answers: 64 x 64 pixels, 8 x 8 latents, 2 steps."""
    rng = np.random.default_rng(0)
    hidden = config.text_hidden_size
    assert hidden is not None, "pipeline.json without text_hidden_size: re-export"
    latent = config.latent_channels, SIDE // config.vae_scale_factor, SIDE // config.vae_scale_factor
    params = {
        c.PROMPT: b"a red fox in the snow",
        c.NEGATIVE_PROMPT: b"blurry",
        c.HEIGHT: SIDE,
        c.WIDTH: SIDE,
        c.STEPS: STEPS,
        c.GUIDANCE_SCALE: 7.5,
        c.SEED: 3,
        c.SCHEDULER: b"euler",
        c.NUM_IMAGES: 1,
        c.PREVIEW: True,
    }
    token_ids = np.full((1, c.TOKEN_LENGTH), 49407, np.int32)
    token_ids[0, :3] = 49406, 320, 1929
    arrays = {
        c.PROMPT_EMBEDS.name: rng.standard_normal((2, c.TOKEN_LENGTH, hidden)).astype(np.float32),
        "input_ids": token_ids,
        "clip_skip": np.zeros((1, 1), np.int32),
        "token_embeddings": np.zeros((1, 1, hidden), np.float32),
        "sample": rng.standard_normal((1, *latent)).astype(np.float32),
        "timestep": np.full((1, 1), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((1, c.TOKEN_LENGTH, hidden)).astype(np.float32),
        "latent_sample": rng.standard_normal((1, *latent)).astype(np.float32),
        c.DECODED.name: rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32),
    }
    if model == c.VAE_ENCODER.name:  # its `sample` is pixels, the UNet's latents
        arrays["sample"] = rng.uniform(-1, 1, (1, 3, SIDE, SIDE)).astype(np.float32)
    by_name = {spec.name: value for spec, value in params.items()}
    tensors = {}
    for spec in c.MODELS[model].inputs:
        if spec.name in by_name:
            tensors[spec.name] = _scalar(spec, by_name[spec.name])
        elif spec.name in arrays:
            tensors[spec.name] = arrays[spec.name]
        else:  # an input of another kind of request (denoise's CANCEL: a control request), left out
            assert spec.optional, f"{model}.{spec.name}: a required input this test has no value for"
    return tensors


def inputs_of(model: str, valid: dict[str, np.ndarray]) -> list[c.TensorSpec]:
    """The model's inputs that a generation request carries (the ones `valid` has)."""
    return [t for t in c.MODELS[model].inputs if t.name in valid]


# -- well-formed results ------------------------------------------------------------------------------


def check_outputs(model: str, outputs: dict[str, np.ndarray], names: list[str]) -> None:
    """`names` came back, each typed and ranked as the contract says, its fixed dims as declared."""
    spec = c.MODELS[model]
    assert set(names) <= set(outputs), f"{model}: outputs {sorted(outputs)} lack some of {names}"
    for name in names:
        tensor, array = spec.output(name), outputs[name]
        expected_dtype = np.dtype(tensor.numpy_dtype)
        assert array.dtype == expected_dtype, f"{model}.{name}: dtype {array.dtype}, contract {tensor.dtype}"
        dims = array.shape[1:] if spec.batching else array.shape
        assert len(dims) == len(tensor.dims), f"{model}.{name}: shape {array.shape}, contract {tensor.dims}"
        for got, want in zip(dims, tensor.dims, strict=True):
            assert want == -1 or got == want, f"{model}.{name}: shape {array.shape}, contract {tensor.dims}"


def images_of(count: int, height: int = SIDE, width: int = SIDE) -> Callable[[dict[str, np.ndarray]], None]:
    def check(outputs: dict[str, np.ndarray]) -> None:
        assert outputs[c.IMAGES.name].shape == (count, height, width, 3), outputs[c.IMAGES.name].shape

    return check


def truncated(field_name: str) -> Callable[[dict[str, np.ndarray]], None]:
    """The long prompt was cut to CLIP's 77 tokens, and the cut is reported."""

    def check(outputs: dict[str, np.ndarray]) -> None:
        assert int(outputs[field_name][0]) > 10_000, outputs[field_name]

    return check


def uint8_extremes(value: int) -> Callable[[dict[str, np.ndarray]], None]:
    def check(outputs: dict[str, np.ndarray]) -> None:
        assert (outputs[c.IMAGES.name] == value).all()

    return check


# -- the cases ----------------------------------------------------------------------------------------


def _cast(array: np.ndarray, wire: str) -> np.ndarray:
    if wire == "BYTES":
        return np.array([str(x).encode() for x in array.reshape(-1)], dtype=object).reshape(array.shape)
    if array.dtype == object:
        return np.ones(array.shape, NUMPY_OF_WIRE[wire])
    return array.astype(NUMPY_OF_WIRE[wire])


def _resized(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.dtype == object:
        return np.full(shape, array.reshape(-1)[0], dtype=object)
    return np.resize(array, shape).astype(array.dtype)


def structural_cases(model: str, valid: dict[str, np.ndarray], max_batch: int) -> Iterator[Case]:
    """What Triton itself refuses before the model runs: each names the input (or the batch)."""
    spec = c.MODELS[model]
    extra = ("INT32", np.ones([1], np.int32))
    yield Case(model, "unknown-input", {**valid, UNKNOWN_INPUT: extra}, Error((UNKNOWN_INPUT,)))
    yield Case(model, "no-inputs", {}, Error(("required",)))
    optional = {t for t in OPTIONAL_INPUTS if t in valid}
    for tensor in inputs_of(model, valid):
        name, array = tensor.name, valid[tensor.name]
        others = {k: v for k, v in valid.items() if k != name}
        if name not in OPTIONAL_INPUTS:
            yield from missing_cases(model, name, others, optional)
        for wire in WRONG_DTYPES[tensor.dtype]:
            bad = {**others, name: (wire, _cast(array, wire))}
            yield Case(model, f"dtype-{name}-{wire}", bad, Error((name, "data-type")))
        shapes = {
            "rank-plus-1": (*array.shape, 1),
            "rank-minus-1": array.shape[:-1],
        }
        full_dims = (-1, *tensor.dims) if spec.batching else tensor.dims
        for axis, dim in enumerate(full_dims):
            if dim > 0:  # a fixed dimension: one more, and none
                shapes[f"axis{axis}-{dim + 1}"] = tuple(
                    dim + 1 if i == axis else s for i, s in enumerate(array.shape)
                )
                shapes[f"axis{axis}-0"] = tuple(0 if i == axis else s for i, s in enumerate(array.shape))
        if spec.batching:
            shapes[f"batch-{max_batch + 1}"] = (max_batch + 1, *array.shape[1:])
            shapes["batch-0"] = (0, *array.shape[1:])
        for label, shape in shapes.items():
            if label.startswith("batch-") and tensor is not spec.inputs[0]:
                continue  # one input carries the batch cases
            if label.startswith("batch-") and shape[0] > max_batch:
                words: tuple[str, ...] = ("batch-size must be <=", str(max_batch))
                bad = {k: _resized(v, (shape[0], *v.shape[1:])) for k, v in valid.items()}
            else:
                words = (name,)
                bad = {**others, name: _resized(array, shape)}
            if label == "batch-0":
                bad = {k: _resized(v, (0, *v.shape[1:])) for k, v in valid.items()}
                words = ()  # Triton names the first input it sizes; any refusal will do
            yield Case(model, f"shape-{name}-{label}-{list(shape)}", bad, Error(words))


def missing_cases(model: str, name: str, others: dict[str, np.ndarray], optional: set[str]) -> Iterator[Case]:
    """An input a generation needs left out, with and without the optional ones. Triton names it
    ("missing required input(s)") where the config makes it required; a python model names it ("is
    required") where the config leaves it optional (denoise: its control requests carry other inputs)."""
    without_optional = {k: v for k, v in others.items() if k not in optional}
    yield Case(model, f"missing-{name}", without_optional, Error((name, "required")))
    if not optional:
        return
    # With an optional input in its place the count of inputs is in range, and Triton (2.51) checks no
    # more: a python model names the input itself; the ensemble finds a step it cannot run and says so
    # without naming the input.
    words = ("unexpected deadlock",) if model == c.TXT2IMG.name else (name, "required")
    yield Case(model, f"missing-{name}-optional-given", others, Error(words))


def zero_size_cases(model: str, valid: dict[str, np.ndarray]) -> Iterator[Case]:
    """0-size values of the dimensions the contract leaves variable (-1): Triton lets them through."""
    spec = c.MODELS[model]
    for tensor in inputs_of(model, valid):
        array = valid[tensor.name]
        dims = (-1, *tensor.dims) if spec.batching else tensor.dims
        for axis, dim in enumerate(dims):
            if dim != -1 or (spec.batching and axis == 0):
                continue
            shape = tuple(0 if i == axis else s for i, s in enumerate(array.shape))
            expect = zero_size_expectation(model, axis, tensor.name)
            yield Case(
                model,
                f"empty-{tensor.name}-axis{axis}",
                {**valid, tensor.name: _resized(array, shape)},
                expect,
            )
    # large but bounded, where no config dimension refuses it first
    if model == c.DENOISE.name:
        embeds = valid[c.PROMPT_EMBEDS.name]
        rows = _resized(embeds, (64, *embeds.shape[1:]))
        expect = Error((c.PROMPT_EMBEDS.name, "64 rows"))
        yield Case(model, "PROMPT_EMBEDS-64-rows", {**valid, c.PROMPT_EMBEDS.name: rows}, expect)
    if model == c.POSTPROCESS.name:
        large = np.zeros((1, 3, 1024, 1024), np.float32)
        yield Case(model, "DECODED-1024x1024", {c.DECODED.name: large}, Ok(images_of(1, 1024, 1024)))


def zero_size_expectation(model: str, axis: int, tensor: str = "") -> Expectation:
    if model == c.POSTPROCESS.name:  # pure arithmetic: an empty batch or image gives an empty one
        return Ok()
    if model == c.UNET.name and tensor == "encoder_hidden_states" and axis == 1:
        # the token axis is variable (77 per prompt chunk): no text, the cross-attention attends to nothing
        # and the engine answers (the denoising loops refuse embeddings without tokens, naming them)
        return Ok()
    if model == c.TEXT_ENCODER.name and tensor == "token_embeddings" and axis == 1:
        return Ok()  # no learned vectors: an id past the vocabulary reads zeros
    if model == c.DENOISE.name:  # the embeddings' rows and width are checked against the export
        return Error((c.PROMPT_EMBEDS.name, "rows" if axis == 0 else "must have shape"))
    return Error()  # the engines refuse a 0-size convolution or embedding width (ONNX Runtime's words)


def value_cases(model: str, valid: dict[str, np.ndarray], ok: Expectation) -> Iterator[Case]:
    """Right names, types and shapes; wrong values."""
    for tensor in inputs_of(model, valid):
        name, array = tensor.name, valid[tensor.name]
        if tensor.dtype == "TYPE_FP32":
            for label, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
                bad = {**valid, name: np.full(array.shape, value, np.float32)}
                yield Case(model, f"{name}-{label}", bad, float_expectation(model, name, label))
        elif tensor.dtype in ("TYPE_INT32", "TYPE_INT64"):
            info = INT32 if tensor.dtype == "TYPE_INT32" else INT64
            values = {"zero": 0, "minus-one": -1, "min": int(info.min), "max": int(info.max)}
            values.update(just_past_limit(name))
            for label, value in values.items():
                bad = {**valid, name: np.full(array.shape, value, array.dtype)}
                yield Case(model, f"{name}-{label}", bad, int_expectation(name, label, ok))
        elif tensor.dtype == "TYPE_STRING":
            huge = HUGE_TEXT if name == c.PROMPT.name and model != c.TXT2IMG_STREAM.name else LARGE_TEXT
            texts = {"not-utf8": NOT_UTF8, "empty": b"", "huge": huge}
            if name == c.SCHEDULER.name:
                texts = {"not-utf8": NOT_UTF8, "empty": b"", "unknown": b"heun" * 256}
            for label, text in texts.items():
                bad = {**valid, name: np.array([text], dtype=object)}
                yield Case(model, f"{name}-{label}", bad, text_expectation(model, name, label, ok))
        elif tensor.dtype == "TYPE_BOOL":
            yield Case(model, f"{name}-false", {**valid, name: np.zeros(array.shape, bool)}, ok)


def just_past_limit(name: str) -> dict[str, int]:
    limits = c.Limits()
    return {
        c.HEIGHT.name: {"past-max": limits.max_side + 8, "not-multiple": SIDE + 1},
        c.WIDTH.name: {"past-max": limits.max_side + 8, "not-multiple": SIDE - 1},
        c.STEPS.name: {"past-max": limits.max_steps + 1},
        c.NUM_IMAGES.name: {"past-max": limits.max_num_images + 1},
    }.get(name, {})


def float_expectation(model: str, name: str, label: str) -> Expectation:
    if name == c.GUIDANCE_SCALE.name:
        return Error((name, "finite"))
    if model == c.POSTPROCESS.name and label != "nan":  # clipped: +inf is white, -inf black
        return Ok(uint8_extremes(255 if label == "inf" else 0))
    # the engines and the scheduler loop compute on whatever numbers they get: well-formed outputs
    return Ok()


def int_expectation(name: str, label: str, ok: Expectation) -> Expectation:
    if name == "input_ids":  # any id reads a row: one past the vocabulary a learned vector (or zeros: none
        return ok  # in the request's table), one below zero the first row

    if name == "clip_skip":  # the engine picks a layer by it (GatherND): past the layers, out of range
        return ok if label == "zero" else Error(("out of",))
    if name == c.CLIP_SKIP.name and label == "zero":
        return ok
    if name == c.SEED.name and label in ("zero", "max"):  # max: one image, so its seed still fits
        return ok
    return Error((name, PARAM_LIMIT_WORDS[name]))


def text_expectation(model: str, name: str, label: str, ok: Expectation) -> Expectation:
    if model == c.DENOISE.name and name == c.NEGATIVE_PROMPT.name:
        return ok  # the loop reads only whether a negative prompt came (SDXL's zeros), never its text
    if label == "not-utf8":
        return Error((name, "UTF-8", "0xff"))
    if name == c.SCHEDULER.name:
        return Error((name, "unknown scheduler"))
    if label == "huge":
        counter = c.PROMPT_TRUNCATED_TOKENS if name == c.PROMPT.name else c.NEGATIVE_PROMPT_TRUNCATED_TOKENS
        return Ok(truncated(counter.name))
    return ok  # an empty prompt is a prompt: the unconditional embedding


def ok_expectation(model: str) -> Expectation:
    # denoise on the inline UNet path (the session's repository) decodes the IMAGES asked for too
    if model in (c.TXT2IMG.name, c.TXT2IMG_STREAM.name, c.DENOISE.name):
        return Ok(images_of(1))
    return Ok()


def token_id_cases(model: str, valid: dict[str, np.ndarray]) -> Iterator[Case]:
    """denoise on the inline UNet path (the session's) also takes the tokenizer's INPUT_IDS instead of
    PROMPT_EMBEDS, runs the text encoder itself and answers IMAGES as well as LATENTS."""
    if model != c.DENOISE.name:
        return
    ids = np.full((2, c.TOKEN_LENGTH), 49407, np.int32)
    ids[:, 0] = 49406
    by_ids = {k: v for k, v in valid.items() if k != c.PROMPT_EMBEDS.name}
    yield Case(model, "INPUT_IDS", {**by_ids, c.INPUT_IDS.name: ids}, Ok(images_of(1)))
    yield Case(
        model, "INPUT_IDS-short", {**by_ids, c.INPUT_IDS.name: ids[:, :10]}, Error((c.INPUT_IDS.name,))
    )
    yield Case(model, "no-embeddings", by_ids, Error((c.PROMPT_EMBEDS.name, c.INPUT_IDS.name, "required")))


def generate_cases(model: str, config: PipelineConfig, max_batch: int) -> list[Case]:
    valid = valid_tensors(model, config)
    ok = ok_expectation(model)
    return [
        Case(model, "valid", valid, ok),
        *structural_cases(model, valid, max_batch),
        *zero_size_cases(model, valid),
        *value_cases(model, valid, ok),
        *token_id_cases(model, valid),
    ]


# -- sending them -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    outputs: dict[str, np.ndarray] | None = None
    error: InferenceServerException | None = None
    steps_streamed: int = 0


def send(client: grpcclient.InferenceServerClient, case: Case) -> Outcome:
    spec = c.MODELS[case.model]
    outputs = [grpcclient.InferRequestedOutput(t.name) for t in spec.outputs]
    try:
        result = client.infer(case.model, case.inputs(), outputs=outputs, client_timeout=CASE_TIMEOUT_S)
    except InferenceServerException as exc:
        return Outcome(error=exc)
    return Outcome(
        outputs={t.name: result.as_numpy(t.name) for t in spec.outputs if result.as_numpy(t.name) is not None}
    )


def send_stream(url: str, case: Case) -> Outcome:
    """One request on its own gRPC stream: its step responses, then the final one or an error."""
    answers: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
    outcome = Outcome()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            client.async_stream_infer(case.model, case.inputs(), enable_empty_final_response=True)
            deadline = time.monotonic() + CASE_TIMEOUT_S
            while True:
                try:
                    result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    pytest.fail(f"{case.id}: no final response within {CASE_TIMEOUT_S:.0f} s")
                if error is not None:
                    outcome.error = error
                    return outcome
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                names = [o.name for o in response.outputs]
                arrays = {name: result.as_numpy(name) for name in names}
                if c.IMAGES.name in arrays:
                    outcome.outputs = arrays
                elif names:
                    assert {c.STEP.name, c.STEPS_TOTAL.name} <= set(names), (
                        f"{case.id}: step response {names}"
                    )
                    outcome.steps_streamed += 1
                if final:
                    return outcome
        finally:
            client.stop_stream()


def judge(case: Case, outcome: Outcome) -> str | None:
    """Why `outcome` is not what `case` expects; None when it is."""
    expect = case.expect
    if isinstance(expect, Error):
        if outcome.error is None:
            return f"expected an error naming {expect.words}, got outputs {sorted(outcome.outputs or {})}"
        message, status = outcome.error.message() or "", outcome.error.status()
        expected_status = None if case.model == c.TXT2IMG_STREAM.name else expect.status
        if status != expected_status:
            return f"expected {expected_status}, got {status}: {message[:300]}"
        missing = [w for w in expect.words if w not in message]
        return f"message lacks {missing}: {message[:300]}" if missing else None
    if outcome.error is not None:
        return f"expected a result, got {outcome.error.status()}: {(outcome.error.message() or '')[:300]}"
    if outcome.outputs is None:
        return "expected a result, got no final response with IMAGES"
    # the session's model is SD: no second tokenizer, no INPUT_IDS_2 or TOKEN_EMBEDDINGS_2
    absent = (c.PREVIEW_IMAGES.name, c.INPUT_IDS_2.name, c.TOKEN_EMBEDDINGS_2.name)
    names = [t.name for t in c.MODELS[case.model].outputs if t.name not in absent]
    try:
        check_outputs(case.model, outcome.outputs, names)
        if case.model == c.TXT2IMG_STREAM.name:
            assert outcome.steps_streamed == STEPS, f"{outcome.steps_streamed} step responses"
        if expect.check is not None:
            expect.check(outcome.outputs)
    except AssertionError as exc:
        return f"malformed result: {exc}"
    return None


# -- fixtures and tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(exported: dict) -> PipelineConfig:
    return PipelineConfig.load(exported["repo"] / c.DENOISE.name / "1" / FILENAME)


@pytest.fixture(scope="module")
def served(client: grpcclient.InferenceServerClient) -> dict[str, int]:
    """Every model of the contract, ready on the server: name -> max_batch_size."""
    index = client.get_model_repository_index(as_json=True)["models"]
    ready = {m["name"] for m in index if m.get("state") == "READY"}
    assert set(c.MODELS) <= ready, f"not ready: {set(c.MODELS) - ready}"
    return {
        name: int(client.get_model_config(name, as_json=True)["config"].get("max_batch_size", 0))
        for name in c.MODELS
    }


def run_cases(client: grpcclient.InferenceServerClient, url: str, cases: list[Case]) -> list[str]:
    failures = []
    started = time.monotonic()
    for case in cases:
        outcome = send_stream(url, case) if case.model == c.TXT2IMG_STREAM.name else send(client, case)
        problem = judge(case, outcome)
        if problem is not None:
            failures.append(f"{case.id}: {problem}")
        if not client.is_model_ready(case.model):
            failures.append(f"{case.id}: model {case.model} not ready after this case")
            break
    log.info(
        "%d cases on %s in %.1f s, %d failed",
        len(cases),
        cases[0].model,
        time.monotonic() - started,
        len(failures),
    )
    return failures


@pytest.mark.parametrize("model", list(c.MODELS))
def test_malformed_tensors(
    client: grpcclient.InferenceServerClient,
    triton: TritonServer,
    pipeline: PipelineConfig,
    served: dict[str, int],
    model: str,
) -> None:
    cases = generate_cases(model, pipeline, served[model])
    assert len({case.id for case in cases}) == len(cases), "case ids repeat"
    failures = run_cases(client, triton.grpc_url, cases)
    assert not failures, "\n".join(failures)


def test_case_count(pipeline: PipelineConfig, served: dict[str, int]) -> None:
    counts = {model: len(generate_cases(model, pipeline, served[model])) for model in c.MODELS}
    log.info("malformed-tensor cases per model: %s; %d in all", counts, sum(counts.values()))
    assert all(n >= 15 for n in counts.values()), counts
    assert sum(counts.values()) >= 400, counts


def test_a_malformed_denoise_request_does_not_fail_the_requests_batched_with_it(
    client: grpcclient.InferenceServerClient, pipeline: PipelineConfig
) -> None:
    """Embeddings of the wrong width (or NaN) sent to denoise directly while txt2img requests of the
    same latent shape run: the bad one is refused (or computes alone), the good ones get their images.
    (Before the fix, the wrong width failed the shared UNet call of every request in the batch.)"""
    good = {"height": SIDE, "width": SIDE, "steps": 60, "scheduler": "euler"}
    alone = [txt2img(client, "a lighthouse", seed=seed, **good).images for seed in range(3)]
    valid = valid_tensors(c.DENOISE.name, pipeline)
    assert pipeline.text_hidden_size is not None
    embeds = valid[c.PROMPT_EMBEDS.name]
    wide = np.zeros((*embeds.shape[:2], pipeline.text_hidden_size + 1), np.float32)
    bad = [
        Case(
            c.DENOISE.name,
            "wide",
            {**valid, c.PROMPT_EMBEDS.name: wide},
            Error((c.PROMPT_EMBEDS.name, "shape")),
        ),
        Case(c.DENOISE.name, "nan", {**valid, c.PROMPT_EMBEDS.name: np.full_like(embeds, np.nan)}, Ok()),
    ]
    done: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
    for seed in range(3):
        inputs = txt2img_inputs("a lighthouse", seed=seed, **good)
        client.async_infer(
            c.TXT2IMG.name,
            inputs,
            callback=lambda result, error, s=seed: done.put((f"good-{s}", result, error)),
        )
    time.sleep(0.2)  # the good ones are in the batch
    for case in bad:
        client.async_infer(
            case.model,
            case.inputs(),
            callback=lambda result, error, n=case.name: done.put((n, result, error)),
        )
    answers = {}
    for _ in range(5):
        name, result, error = done.get(timeout=CASE_TIMEOUT_S)
        answers[name] = (result, error)
    for seed in range(3):
        result, error = answers[f"good-{seed}"]
        assert error is None, f"good request {seed} failed: {error}"
        images = result.as_numpy(c.IMAGES.name)
        assert images.shape == alone[seed].shape  # and the same image it is alone: nothing leaked in
        assert np.abs(images.astype(int) - alone[seed]).max() <= 2, seed
    for case in bad:
        result, error = answers[case.name]
        outputs = None if result is None else {t.name: result.as_numpy(t.name) for t in c.DENOISE.outputs}
        problem = judge(case, Outcome(outputs=outputs, error=error))
        assert problem is None, f"{case.id}: {problem}"


def test_still_serving_after_the_fuzz(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for model in c.MODELS:
        assert client.is_model_ready(model), model
    result = txt2img(client, "a small boat", height=SIDE, width=SIDE, steps=4, seed=1, scheduler="euler_a")
    assert result.images.shape == (1, SIDE, SIDE, 3) and result.images.std() > 0
