"""Params classes, one per config ``type``; importing this package registers all of them."""

from vla_foundry.params.model_params import (
    ModelParams,
    get_params_class,
    list_registered_params,
    parse_params,
    register_model_params,
)
from vla_foundry.params import clip, diffusion, transformer, vision  # noqa: F401  (registers)

__all__ = ["ModelParams", "get_params_class", "list_registered_params", "parse_params", "register_model_params"]
