"""/openapi.json carries the served model's limits (gateway/openapi.py): the published bounds are the
ones validation applies, so a client that validates against the document is not refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sd_triton.contract import Limits
from sd_triton.gateway.errors import TritonUnavailableError
from tests.gateway.inprocess import FakeTriton, fake_served_model, gateway_client


def prop(document: dict[str, Any], component: str, name: str) -> dict[str, Any]:
    """A request property's constraints (the non-null branch of an optional one)."""
    schema = document["components"]["schemas"][component]["properties"][name]
    return next((b for b in schema.get("anyOf", []) if b.get("type") != "null"), schema)


def test_the_document_publishes_the_served_limits() -> None:
    served = dataclasses.replace(
        fake_served_model(), spatial_multiple=16, limits=Limits(max_steps=40, max_side=512, max_num_images=3)
    )
    with gateway_client(FakeTriton(served=served), max_prompt_chars=300, max_batch_prompts=5) as http:
        document = http.get("/openapi.json").json()
    for component in ("GenerateRequest", "BatchRequest", "JobRequest"):
        for side in ("width", "height"):
            assert prop(document, component, side) | {"type": "integer"} == prop(document, component, side)
            rules = {k: prop(document, component, side)[k] for k in ("minimum", "maximum", "multipleOf")}
            assert rules == {"minimum": 16, "maximum": 512, "multipleOf": 16}, (component, side)
        assert prop(document, component, "steps")["maximum"] == 40
        assert prop(document, component, "num_images")["maximum"] == 3
        assert prop(document, component, "negative_prompt")["maxLength"] == 300
    assert prop(document, "GenerateRequest", "prompt")["maxLength"] == 300
    batch = prop(document, "BatchRequest", "prompts")
    assert batch["maxItems"] == 5 and batch["items"]["maxLength"] == 300
    assert prop(document, "OpenAIImageRequest", "n")["maximum"] == 3
    assert "multipleOf" not in prop(document, "Image", "width")  # responses are not requests


def test_without_triton_the_static_document() -> None:
    with gateway_client(FakeTriton(error=TritonUnavailableError("Triton is away"))) as http:
        response = http.get("/openapi.json")
    assert response.status_code == 200
    assert "multipleOf" not in prop(response.json(), "GenerateRequest", "width")


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        ({"width": 8}, True),  # minimum
        ({"width": 1024, "height": 8}, True),  # maximum
        ({"width": 1032}, False),
        ({"width": 68}, False),  # not a multiple
        ({"steps": 150}, True),
        ({"steps": 151}, False),
        ({"num_images": 4}, True),
        ({"num_images": 5}, False),
        ({"prompt": "x" * 2000}, True),
        ({"prompt": "x" * 2001}, False),
    ],
)
def test_the_published_bounds_are_the_validated_ones(change: dict[str, Any], accepted: bool) -> None:
    with gateway_client() as http:
        document = http.get("/openapi.json").json()
        for name, value in change.items():
            rules = prop(document, "GenerateRequest", name)
            inside = (
                rules.get("minimum", value) <= value <= rules.get("maximum", value)
                and value % rules.get("multipleOf", 1) == 0
                if isinstance(value, int)
                else len(value) <= rules["maxLength"]
            )
            assert inside == accepted, (name, value, rules)
        body = {"prompt": "a fox", "steps": 1, "width": 8, "height": 8, **change}
        response = http.post("/v1/generate", json=body)
    assert (response.status_code == 200) == accepted, response.text
    if not accepted:
        assert response.status_code == 422
