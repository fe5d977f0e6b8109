"""Serving pipelines, one per modality. ``load_pipeline`` loads a checkpoint and wraps it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from vla_foundry.checkpoint import load_model
from vla_foundry.config_files import read_training_config
from vla_foundry.models.registry import model_modality
from vla_foundry.pipelines.base import Pipeline, get_pipeline_class, register_pipeline
from vla_foundry.pipelines import text  # noqa: F401  (registers "text")
from vla_foundry.pipelines import caption  # noqa: F401  (registers "caption")
from vla_foundry.pipelines import encoder  # noqa: F401  (registers "encoder")
from vla_foundry.pipelines import image  # noqa: F401  (registers "image")
from vla_foundry.pipelines import action  # noqa: F401  (registers "action")


def load_pipeline(path: Union[str, Path], *, checkpoint: Union[None, int, str] = None, use_ema: Optional[bool] = None,
                  device: Union[str, torch.device] = "cpu", dtype: Union[None, str, torch.dtype] = None,
                  **options: Any) -> Pipeline:
    """Load an experiment directory and wrap it in its modality's pipeline.

    ``options`` go to the pipeline (e.g. ``tokenizer=`` to override a text model's).
    """
    model = load_model(path, checkpoint=checkpoint, use_ema=use_ema, device=device, dtype=dtype)
    experiment_dir = model.checkpoint.experiment_dir
    cls = get_pipeline_class(model_modality(model.params.type))
    return cls.from_experiment(model, experiment_dir, training_config=read_training_config(experiment_dir), **options)


__all__ = ["Pipeline", "get_pipeline_class", "load_pipeline", "register_pipeline"]
