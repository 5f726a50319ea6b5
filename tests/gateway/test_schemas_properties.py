"""Property tests of request validation: the bodies (gateway/schemas.py, jobs' JobRequest), the error
message the gateway makes of a refusal (gateway.main._validation_message), and the checks against
the served model's limits (Generator.plan).

Valid values are accepted and come back unchanged; a value out of range, of the wrong type or
unknown is refused with an error that names the field (and the limit). Whatever passes both the schema
and `plan` fits the tensor contract's types, so Triton gets exactly what the client asked for.
"""

from __future__ import annotations

import math
import string
from typing import Any

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import assume, example, given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from sd_triton import contract as c
from sd_triton.gateway.api.errors import _validation_message
from sd_triton.gateway.errors import InvalidRequestError
from sd_triton.gateway.jobs.models import JobRequest
from sd_triton.gateway.schemas import (
    MAX_FP32,
    MAX_SEED,
    SIZE,
    BatchRequest,
    GenerateRequest,
    GenerationOptions,
    OpenAIImageRequest,
)
from sd_triton.gateway.service import Generator
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.served_model import ServedModel
from tests.conftest import PROPERTIES

TEXT = st.text(min_size=1, max_size=40)
INT32_MAX = int(np.iinfo(np.int32).max)
FIELDS = set(GenerateRequest.model_fields)

# the valid values of each optional field of a /v1/generate body
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "negative_prompt": st.one_of(st.none(), st.text(max_size=40)),
    "width": st.one_of(st.none(), st.integers(min_value=1, max_value=1 << 40)),
    "height": st.one_of(st.none(), st.integers(min_value=1, max_value=1 << 40)),
    "steps": st.integers(min_value=1, max_value=1 << 40),
    "guidance_scale": st.one_of(
        st.floats(min_value=0.0, max_value=MAX_FP32), st.sampled_from([0.0, 1.0, MAX_FP32])
    ),
    "seed": st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_SEED), st.just(MAX_SEED)),
    "scheduler": st.sampled_from(c.SCHEDULERS),
    "num_images": st.integers(min_value=1, max_value=1 << 40),
    "output_format": st.sampled_from(["png", "jpeg", "webp"]),
    "response_format": st.sampled_from(["base64", "url"]),
}
GENERATE_BODY = st.fixed_dictionaries({"prompt": TEXT}, optional=VALID_FIELDS)

# out-of-range values per numeric field, and the words the error must carry
OUT_OF_RANGE: dict[str, tuple[st.SearchStrategy[Any], str]] = {
    "width": (st.integers(max_value=0), "greater than or equal to 1"),
    "height": (st.integers(max_value=0), "greater than or equal to 1"),
    "steps": (st.integers(max_value=0), "greater than or equal to 1"),
    "num_images": (st.integers(max_value=0), "greater than or equal to 1"),
    "seed": (
        st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_SEED + 1)),
        "than or equal to",
    ),
    "guidance_scale": (
        st.one_of(
            st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False),
            st.floats(min_value=MAX_FP32, exclude_min=True, allow_infinity=False),
        ),
        "than or equal to",
    ),
}
WRONG_TYPE = st.one_of(
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.text(alphabet=string.ascii_letters, min_size=1, max_size=8),
)


def refusal(model: type[BaseModel], body: Any) -> tuple[str, str | None]:
    """The gateway's message and blamed field for `body`, which must be refused."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return _validation_message(info.value)


# -- /v1/generate bodies --------------------------------------------------------------------------------


@PROPERTIES
@given(body=GENERATE_BODY)
def test_valid_generate_bodies_are_accepted_and_round_trip(body: dict[str, Any]) -> None:
    request = GenerateRequest.model_validate(body)
    assert request.model_dump(exclude_unset=True) == body
    assert GenerateRequest.model_validate_json(request.model_dump_json()) == request
    # what the gateway sends to Triton unchanged fits the contract's wire types
    assert np.isfinite(np.float32(request.guidance_scale)), request.guidance_scale
    assert request.seed is None or request.seed <= np.iinfo(c.SEED.numpy_dtype).max


@PROPERTIES
@given(data=st.data(), field=st.sampled_from(sorted(OUT_OF_RANGE)))
def test_out_of_range_numbers_are_refused_naming_the_field(data: st.DataObject, field: str) -> None:
    values, words = OUT_OF_RANGE[field]
    value = data.draw(values, label=field)
    message, blamed = refusal(GenerateRequest, {"prompt": "a cat", field: value})
    assert blamed == field and message.startswith(f"{field}: "), message
    assert words in message, message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_guidance_is_refused(value: float) -> None:
    message, blamed = refusal(GenerateRequest, {"prompt": "a cat", "guidance_scale": value})
    assert blamed == "guidance_scale" and "finite" in message, message


@PROPERTIES
@given(
    field=st.sampled_from(["width", "height", "steps", "seed", "num_images", "guidance_scale", "prompt"]),
    value=WRONG_TYPE,
)
def test_wrong_types_are_refused_naming_the_field(field: str, value: Any) -> None:
    assume(not (field == "prompt" and isinstance(value, str)))
    message, blamed = refusal(GenerateRequest, {"prompt": "a cat", field: value})
    assert blamed == field and message.startswith(f"{field}: "), message


@PROPERTIES
@given(key=st.text(min_size=1, max_size=20).filter(lambda k: k not in FIELDS), value=st.integers())
def test_unknown_fields_are_refused_by_name(key: str, value: int) -> None:
    message, blamed = refusal(GenerateRequest, {"prompt": "a cat", key: value})
    assert blamed == key and f"{key}: unknown field" in message, message


@PROPERTIES
@given(
    field=st.sampled_from(["scheduler", "output_format", "response_format"]),
    value=st.text(max_size=12),
)
def test_unknown_choices_are_refused_listing_the_choices(field: str, value: str) -> None:
    choices = {"scheduler": c.SCHEDULERS, "output_format": ("png", "jpeg", "webp")}
    allowed = choices.get(field, ("base64", "url"))
    assume(value not in allowed)
    message, blamed = refusal(GenerateRequest, {"prompt": "a cat", field: value})
    assert blamed == field, message
    assert all(f"'{choice}'" in message for choice in allowed), message


def test_missing_and_empty_prompt_are_refused() -> None:
    assert refusal(GenerateRequest, {"steps": 3})[1] == "prompt"
    message, blamed = refusal(GenerateRequest, {"prompt": ""})
    assert blamed == "prompt" and "at least 1 character" in message, message


def test_unparseable_json_blames_the_body() -> None:
    """The fuzz found the blamed field was "0" (pydantic's location of the JSON error)."""
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate_json(b'{"prompt": "a",')
    message, blamed = _validation_message(info.value)
    assert blamed == "body" and message.startswith("body: invalid JSON"), message
    wrapped = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error", "ctx": {"error": "x"}}]
    )
    assert _validation_message(wrapped) == ("body: invalid JSON: x", "body")


# -- batches, jobs, the OpenAI shape --------------------------------------------------------------------


@PROPERTIES
@given(
    prompts=st.lists(TEXT, min_size=1, max_size=20), extra=st.fixed_dictionaries({}, optional=VALID_FIELDS)
)
def test_valid_batches_keep_their_prompts_in_order(prompts: list[str], extra: dict[str, Any]) -> None:
    request = BatchRequest.model_validate({"prompts": prompts, **extra})
    assert request.prompts == prompts
    assert BatchRequest.model_validate_json(request.model_dump_json()) == request


@PROPERTIES
@given(prompts=st.lists(TEXT, max_size=5), index=st.integers(min_value=0, max_value=5), bad=WRONG_TYPE)
def test_a_bad_prompt_in_a_batch_is_named_by_its_index(prompts: list[str], index: int, bad: Any) -> None:
    assume(not isinstance(bad, str))
    index = min(index, len(prompts))
    body = {"prompts": [*prompts[:index], bad, *prompts[index:]]}
    message, blamed = refusal(BatchRequest, body)
    assert blamed == f"prompts.{index}" and message.startswith(f"prompts.{index}: "), message


def test_an_empty_batch_is_refused() -> None:
    message, blamed = refusal(BatchRequest, {"prompts": []})
    assert blamed == "prompts" and "at least 1 item" in message, message


@PROPERTIES
@given(
    width=st.integers(min_value=0, max_value=99_999),
    height=st.integers(min_value=0, max_value=99_999),
    n=st.integers(min_value=1, max_value=1 << 40),
    response_format=st.sampled_from(["b64_json", "url"]),
)
def test_openai_sizes_parse_back_to_their_numbers(
    width: int, height: int, n: int, response_format: str
) -> None:
    body = {"prompt": "a cat", "size": f"{width}x{height}", "n": n, "response_format": response_format}
    request = OpenAIImageRequest.model_validate(body)
    assert request.model_dump(exclude_unset=True) == body
    match = SIZE.match(request.size or "")
    assert match is not None and (int(match.group(1)), int(match.group(2))) == (width, height)


@PROPERTIES
@given(size=st.text(max_size=14))
def test_openai_sizes_not_w_x_h_are_refused_naming_size(size: str) -> None:
    assume(SIZE.match(size) is None)
    message, blamed = refusal(OpenAIImageRequest, {"prompt": "a cat", "size": size})
    assert blamed == "size" and '"512x512"' in message, message


@PROPERTIES
@given(n=st.integers(max_value=0))
def test_openai_n_below_one_is_refused(n: int) -> None:
    message, blamed = refusal(OpenAIImageRequest, {"prompt": "a cat", "n": n})
    assert blamed == "n" and "greater than or equal to 1" in message, message


URL_TAIL = st.text(
    alphabet=st.characters(codec="ascii", exclude_categories=["Cc", "Zs"]), min_size=1, max_size=60
)


@PROPERTIES
@given(scheme=st.sampled_from(["http", "https"]), tail=URL_TAIL, preview=st.booleans())
def test_job_webhook_urls_and_preview(scheme: str, tail: str, preview: bool) -> None:
    body = {"prompt": "a cat", "webhook_url": f"{scheme}://{tail}", "preview": preview}
    request = JobRequest.model_validate(body)
    assert request.model_dump(exclude_unset=True) == body


@PROPERTIES
@given(
    url=st.one_of(
        st.text(max_size=30).filter(lambda u: not u.startswith(("http://", "https://"))),
        st.builds(lambda head, tail: f"https://{head} {tail}", URL_TAIL, URL_TAIL),
        st.just("https://" + "a" * 2048),
    )
)
def test_bad_webhook_urls_are_refused_naming_the_field(url: str) -> None:
    message, blamed = refusal(JobRequest, {"prompt": "a cat", "webhook_url": url})
    assert blamed == "webhook_url" and message.startswith("webhook_url: "), message


# -- the served model's limits (Generator.plan) ---------------------------------------------------------

SETTINGS = GatewaySettings(
    triton_url="localhost:8001", max_prompt_chars=50, max_pixels=192 * 192, max_batch_prompts=4
)
SERVED = ServedModel(
    "tiny", 64, 64, 8, c.Limits(max_steps=50, max_side=256, max_num_images=4, max_seed=MAX_SEED)
)
NEAR_LIMITS = {
    "width": st.one_of(st.none(), st.integers(1, 300), st.sampled_from([8, 192, 256, 264])),
    "height": st.one_of(st.none(), st.integers(1, 300), st.sampled_from([8, 192, 256, 264])),
    "steps": st.integers(1, 60),
    "num_images": st.integers(1, 6),
    "seed": st.one_of(st.none(), st.integers(0, 1000), st.integers(MAX_SEED - 20, MAX_SEED)),
    "negative_prompt": st.one_of(st.none(), st.integers(0, 60).map(lambda n: "n" * n)),
    "guidance_scale": VALID_FIELDS["guidance_scale"],
    "scheduler": VALID_FIELDS["scheduler"],
}


def first_violation(prompts: list[str], request: GenerationOptions, seed: int) -> tuple[str, str] | None:
    """The field the gateway must refuse first and the limit its message must state (None: accept)."""
    limits, multiple = SERVED.limits, SERVED.spatial_multiple
    if len(prompts) > SETTINGS.max_batch_prompts:
        return "prompts", str(SETTINGS.max_batch_prompts)
    field = "prompt" if len(prompts) == 1 else "prompts"
    for name, text in [(field, p) for p in prompts] + [("negative_prompt", request.negative_prompt or "")]:
        if len(text) > SETTINGS.max_prompt_chars:
            return name, str(SETTINGS.max_prompt_chars)
    height, width = request.height or SERVED.native_height, request.width or SERVED.native_width
    if height * width > SETTINGS.max_pixels:
        return "width", str(SETTINGS.max_pixels)
    for index in range(len(prompts)):
        for name, side in (("height", height), ("width", width)):
            if not multiple <= side <= limits.max_side or side % multiple:
                return name, str(limits.max_side)
        if request.steps > limits.max_steps:
            return "steps", str(limits.max_steps)
        if request.num_images > limits.max_num_images:
            return "num_images", str(limits.max_num_images)
        if seed + index * request.num_images > limits.max_seed - (request.num_images - 1):
            return "seed", str(limits.max_seed - (request.num_images - 1))
    return None


def _at(prompts: int = 1, chars: int = 5, **fields: Any) -> Any:
    """An explicit example: `prompts` prompts of `chars` characters, and `fields`."""
    return example(prompts=["p" * chars] * prompts, fields=fields)


@PROPERTIES
@given(
    prompts=st.lists(st.integers(1, 60).map(lambda n: "p" * n), min_size=1, max_size=6),
    fields=st.fixed_dictionaries({}, optional=NEAR_LIMITS),
)
# each limit exactly, and one past it
@_at(width=192, height=192)
@_at(width=200, height=192)
@_at(width=256, height=136)
@_at(width=264, height=8)
@_at(height=256, width=8)
@_at(height=7, width=8)
@_at(steps=50)
@_at(steps=51)
@_at(num_images=4, seed=MAX_SEED - 3)
@_at(num_images=4, seed=MAX_SEED - 2)
@_at(num_images=5)
@_at(prompts=2, num_images=2, seed=MAX_SEED - 3)
@_at(prompts=2, num_images=2, seed=MAX_SEED - 4)
@_at(chars=50)
@_at(chars=51)
@_at(prompts=4, chars=50)
@_at(prompts=5)
@_at(negative_prompt="n" * 50)
@_at(negative_prompt="n" * 51)
def test_plan_accepts_exactly_the_requests_within_the_limits(
    prompts: list[str], fields: dict[str, Any]
) -> None:
    request = GenerationOptions.model_validate(fields)
    generator = Generator(None, None, SETTINGS, None)  # type: ignore[arg-type] - plan needs the settings alone
    expected = first_violation(prompts, request, request.seed or 0)  # a drawn seed is below 2**32
    try:
        jobs = generator.plan(prompts, request, SERVED)
    except InvalidRequestError as exc:
        assert expected is not None, f"refused a request within the limits: {exc.message}"
        field, limit = expected
        assert exc.field == field, (exc.field, exc.message, expected)
        assert field in exc.message and limit in exc.message, exc.message
        return
    assert expected is None, f"accepted a request past the {expected[0]} limit ({expected[1]})"
    assert [job.prompt for job in jobs] == prompts
    first = jobs[0].params.seed
    for index, job in enumerate(jobs):
        params = job.params
        assert params.seed == first + index * request.num_images
        # everything fits the tensor contract's types
        for value in (params.height, params.width, params.steps, params.num_images):
            assert 1 <= value <= INT32_MAX
        assert 0 <= params.seed + params.num_images - 1 <= np.iinfo(c.SEED.numpy_dtype).max
        assert np.isfinite(np.float32(params.guidance_scale))
