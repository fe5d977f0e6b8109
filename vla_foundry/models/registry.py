"""The model and batch-handler registry (the seed's API).

A model module registers its class with ``@register_model("type")`` and its loss with
``@register_batch_handler("type")``; the key is the config's ``type``. Everything else
(the checkpoint loader, the service's routes) resolves a type through this module, so
adding a model needs no edit anywhere else.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from vla_foundry.errors import unknown_key_error

T = TypeVar("T")

_MODELS: dict[str, type] = {}
_BATCH_HANDLERS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, key: str) -> Callable[[T], T]:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{kind} key must be a non-empty string; got {key!r}")

    def decorator(cls: T) -> T:
        if key in table:
            raise ValueError(
                f"{kind} {key!r} is already registered (by {table[key].__module__}.{table[key].__qualname__}); "
                "each type key may be registered once"
            )
        table[key] = cls  # type: ignore[assignment]
        return cls

    return decorator


def register_model(model_type: str) -> Callable[[T], T]:
    """Class decorator: ``@register_model("transformer")``."""
    return _register(_MODELS, "model type", model_type)


def register_batch_handler(model_type: str) -> Callable[[T], T]:
    """Class decorator: ``@register_batch_handler("transformer")``."""
    return _register(_BATCH_HANDLERS, "batch handler", model_type)


def get_model_class(model_type: str) -> type:
    if model_type not in _MODELS:
        raise unknown_key_error("model type", model_type, list(_MODELS))
    return _MODELS[model_type]


def create_model(model_params: Any, load_pretrained: bool = True):
    """Build the model for ``model_params`` (its ``type`` selects the class).

    ``load_pretrained`` lets a model pull pretrained sub-weights (an HF directory, say)
    at construction; the checkpoint loader passes False because the checkpoint holds
    every weight.
    """
    model_type = getattr(model_params, "type", None)
    cls = get_model_class(model_type)
    return cls(model_params, load_pretrained=load_pretrained)


def create_batch_handler(model_type: str, **kwargs: Any):
    if model_type not in _BATCH_HANDLERS:
        raise unknown_key_error("batch handler", model_type, list(_BATCH_HANDLERS))
    return _BATCH_HANDLERS[model_type](**kwargs)


def list_registered_models() -> list[str]:
    return sorted(_MODELS)


def list_registered_batch_handlers() -> list[str]:
    return sorted(_BATCH_HANDLERS)


def is_model_registered(model_type: str) -> bool:
    return model_type in _MODELS


def model_modality(model_type: str) -> str:
    """The modality a model type serves (``text``, ``caption``, ``image``, ``action``, ``encoder``)."""
    return getattr(get_model_class(model_type), "modality")
