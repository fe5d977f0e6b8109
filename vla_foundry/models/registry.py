"""The model and batch-handler registry (the seed's API).

A model module registers its class with ``@register_model("type")`` and its loss with
``@register_batch_handler("type")``; the key is the config's ``type``. Everything else
(the checkpoint loader, the service's routes) resolves a type through this module, so
adding a model needs no edit anywhere else.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from vla_foundry.keyed_registry import KeyedRegistry

T = TypeVar("T")

MODELS: KeyedRegistry[type] = KeyedRegistry("model type")
BATCH_HANDLERS: KeyedRegistry[type] = KeyedRegistry("batch handler")


def register_model(model_type: str) -> Callable[[T], T]:
    """Class decorator: ``@register_model("transformer")``. The class sets ``modality``."""
    return MODELS.register(model_type)


def register_batch_handler(model_type: str) -> Callable[[T], T]:
    """Class decorator: ``@register_batch_handler("transformer")``."""
    return BATCH_HANDLERS.register(model_type)


def get_model_class(model_type: str) -> type:
    return MODELS.get(model_type)


def create_model(model_params: Any, load_pretrained: bool = True):
    """Build the model for ``model_params`` (its ``type`` selects the class).

    ``load_pretrained`` lets a model pull pretrained sub-weights (an HF directory, say)
    at construction; the checkpoint loader passes False because the checkpoint holds
    every weight.
    """
    cls = MODELS.get(getattr(model_params, "type", None))
    return cls(model_params, load_pretrained=load_pretrained)


def create_batch_handler(model_type: str, **kwargs: Any):
    return BATCH_HANDLERS.get(model_type)(**kwargs)


def list_registered_models() -> list[str]:
    return MODELS.keys()


def list_registered_batch_handlers() -> list[str]:
    return BATCH_HANDLERS.keys()


def is_model_registered(model_type: str) -> bool:
    return model_type in MODELS


def model_modality(model_type: str) -> str:
    """The modality a model type serves (``text``, ``caption``, ``image``, ``action``, ``encoder``)."""
    return MODELS.get(model_type).modality
