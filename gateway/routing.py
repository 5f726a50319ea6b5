"""Which served pipeline answers a request: the one its `model` field (or OpenAI's `model`) names, by its
id (`ServedModel.model`) or an alias (`model_aliases`), else the default (`default_model`, or the pipeline
exported without --name, or the first by name)."""

from __future__ import annotations

from sd_triton.gateway.errors import InvalidRequestError, TritonUnavailableError
from sd_triton.gateway.settings import GatewaySettings
from sd_triton.served_model import ServedModel


def default_model(models: list[ServedModel], settings: GatewaySettings) -> ServedModel:
    """What a request without `model` gets. `models`: as the backend lists them (the unnamed one first)."""
    if settings.default_model:
        for model in models:
            if model.model == settings.default_model:
                return model
        raise TritonUnavailableError(
            f"default_model {settings.default_model!r} (SD_GATEWAY_DEFAULT_MODEL) is not served; "
            f"served: {', '.join(m.model for m in models)}"
        )
    unnamed = [m for m in models if not m.pipeline]
    return (unnamed or models)[0]


def pick(
    models: list[ServedModel], requested: str | None, settings: GatewaySettings, field: str = "model"
) -> ServedModel:
    """The served model a request's `model` (or `field`) names; a 422 naming the field and the served ids
    when none."""
    by_id = {m.model: m for m in models}
    name = requested
    if name is not None and name not in by_id and name in settings.model_aliases:
        name = settings.model_aliases[name] or None
    if name is None:
        return default_model(models, settings)
    if name not in by_id:
        raise InvalidRequestError(
            f"{field}: {requested!r} is not served here; the models are {', '.join(sorted(by_id))} "
            "(GET /v1/models)",
            field=field,
        )
    return by_id[name]


def listed(models: list[ServedModel], settings: GatewaySettings) -> list[ServedModel]:
    """The served models for GET /v1/models: the default first, then the others by id."""
    first = default_model(models, settings)
    return [first, *sorted((m for m in models if m is not first), key=lambda m: m.model)]
