"""Pipelines: what a served model of one modality does beyond ``forward``.

One pipeline class per modality (text, caption, image, action), keyed like the model
registry; every model type declares its modality, so a new model of an existing
modality is served with no new code here or in the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from vla_foundry.continuous import DEFAULT_PREFILL_TOKENS
from vla_foundry.keyed_registry import KeyedRegistry

PIPELINES: KeyedRegistry[type] = KeyedRegistry("modality", key_attribute="modality")


def register_pipeline(modality: str):
    return PIPELINES.register(modality)


def get_pipeline_class(modality: str) -> type["Pipeline"]:
    return PIPELINES.get(modality)


class Pipeline:
    modality: str = ""
    decodes_continuously: bool = False  # its generations can share a ContinuousBatcher (text models with slots)

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, *, training_config: Optional[dict] = None,
                        **options: Any) -> "Pipeline":
        return cls(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def checkpoint_info(self) -> dict[str, Any]:
        """Which weights are loaded (experiment path, file, training step), shown in ``GET /models``."""
        return self.model.checkpoint.to_dict()

    def io(self) -> dict[str, Any]:
        """What a client needs to build a request (shown in ``GET /models``)."""
        return {}

    def warmup(self, max_batch_size: int = 1) -> None:
        """One small call so the first request does not pay for lazy initialisation; a pipeline that captures
        graphs per batch size captures them up to ``max_batch_size`` (the deployment's batching limit)."""

    def serving(self) -> None:
        """A server's requests come from now on (after its warm-up, or without one): nothing this pipeline does may
        hold a request up for preparation any more (a policy then captures graphs only in the background)."""

    def close(self) -> None:
        """The server is done with this pipeline (unloaded, or replaced by a reload): background work it started is
        dropped, so nothing keeps its model alive."""

    def continuous_batcher(self, max_sequences: int, max_cache_bytes: Optional[int] = None,
                           prefill_tokens: int = DEFAULT_PREFILL_TOKENS):
        """A ``vla_foundry.continuous.ContinuousBatcher`` for this pipeline's generations, or None: this pipeline
        does not generate text, or its model cannot join a running batch (text pipelines override this)."""
        return None
