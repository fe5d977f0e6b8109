"""VLA Foundry models: a registry of model types, their params, batch handlers and checkpoint I/O."""

from vla_foundry.checkpoint import load_model, save_experiment
from vla_foundry.models import (
    create_batch_handler,
    create_model,
    is_model_registered,
    list_registered_batch_handlers,
    list_registered_models,
    register_batch_handler,
    register_model,
)

__all__ = [
    "load_model", "save_experiment", "create_batch_handler", "create_model", "is_model_registered",
    "list_registered_batch_handlers", "list_registered_models", "register_batch_handler", "register_model",
]
__version__ = "0.1.0"
