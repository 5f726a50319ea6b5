"""The OpenAPI document with the served model's own limits, so a client can validate before it sends.

The request models carry static bounds only (the gateway starts before it knows the model); the document
served at /openapi.json adds what Triton reports (multiples of the spatial multiple, the largest side,
steps and images) and the gateway's settings (prompt length, prompts per batch). Width x height must
also stay within `max_pixels`, which JSON Schema cannot say: the descriptions do.
"""

from __future__ import annotations

import copy
from typing import Any

from sd_triton.gateway.settings import GatewaySettings
from sd_triton.served_model import ServedModel


def request_components(schema: dict[str, Any]) -> set[str]:
    """The component schemas that are a request body of some operation."""
    names = set()
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            content = (operation.get("requestBody") or {}).get("content", {})
            for media in content.values():
                ref = media.get("schema", {}).get("$ref", "")
                if ref.startswith("#/components/schemas/"):
                    names.add(ref.rsplit("/", 1)[1])
    return names


def _constrain(prop: dict[str, Any], rules: dict[str, Any]) -> None:
    """Add `rules` to a property, or to the non-null branch of an optional one (anyOf [X, null])."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"] or [prop]
    for branch in branches:
        branch.update(rules)


def with_served_limits(
    schema: dict[str, Any], served: ServedModel, settings: GatewaySettings
) -> dict[str, Any]:
    """A copy of `schema` whose request bodies carry the served model's and the settings' limits."""
    doc = copy.deepcopy(schema)
    multiple, limits = served.spatial_multiple, served.limits
    side = {"minimum": multiple, "maximum": limits.max_side, "multipleOf": multiple}
    text = {"maxLength": settings.max_prompt_chars}
    rules: dict[str, dict[str, Any]] = {
        "width": side,
        "height": side,
        "steps": {"maximum": limits.max_steps},
        "num_images": {"maximum": limits.max_num_images},
        "n": {"maximum": limits.max_num_images},
        "prompt": text,
        "negative_prompt": text,
        "prompts": {"maxItems": settings.max_batch_prompts},
    }
    components = doc.get("components", {}).get("schemas", {})
    for name in request_components(doc):
        properties = components.get(name, {}).get("properties", {})
        for field, extra in rules.items():
            if field in properties:
                _constrain(properties[field], extra)
        if "prompts" in properties:
            _constrain(properties["prompts"].setdefault("items", {}), text)
        for field in ("width", "height"):
            if field in properties:
                properties[field]["description"] = (
                    f"{properties[field].get('description', 'pixels')}; a multiple of {multiple} up to "
                    f"{limits.max_side}, width x height at most {settings.max_pixels}"
                )
    return doc
