"""Importing this package registers every model type and batch handler."""

from vla_foundry.models.registry import (
    create_batch_handler,
    create_model,
    get_model_class,
    is_model_registered,
    list_registered_batch_handlers,
    list_registered_models,
    model_modality,
    register_batch_handler,
    register_model,
)
from vla_foundry.models import transformer  # noqa: F401  (registers "transformer")
from vla_foundry.models import transformer_hf  # noqa: F401  (registers "transformer_hf")
from vla_foundry.models import vlm  # noqa: F401  (registers "vlm")
from vla_foundry.models import vlm_hf  # noqa: F401  (registers "vlm_hf")
from vla_foundry.models import clip_hf  # noqa: F401  (registers "clip_hf")
from vla_foundry.models import clip_openclip  # noqa: F401  (registers "clip_openclip")
from vla_foundry.models import stable_diffusion  # noqa: F401  (registers "stable_diffusion")
from vla_foundry.models import diffusion_policy  # noqa: F401  (registers "diffusion_policy")
from vla_foundry.models import vlm_backbones  # noqa: F401  (registers the policy backbones that run a whole VLM)
from vla_foundry.models import batch_handlers  # noqa: F401  (registers the handlers)

__all__ = [
    "create_batch_handler", "create_model", "get_model_class", "is_model_registered",
    "list_registered_batch_handlers", "list_registered_models", "model_modality",
    "register_batch_handler", "register_model",
]
