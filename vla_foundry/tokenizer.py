"""Finding the tokenizer of a text checkpoint, and rendering chat through a chat template.

In order: the deployment's override, the experiment's ``tokenizer/`` folder (HF tokenizer
files), ``config.yaml``'s ``data.tokenizer`` (a path relative to the experiment or absolute,
or a hub id that is already in the local HF cache), then the model's own default (an HF
wrapper's directory). A checkpoint without any tokenizer still serves token ids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from vla_foundry.errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)


def _from_pretrained(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def load_tokenizer(experiment_dir: Union[str, Path], override: Optional[str] = None,
                   training_config: Optional[dict] = None,
                   model_default: Optional[str] = None) -> tuple[Any, Optional[str]]:
    """(tokenizer or None, where it came from). An explicit ``override`` that fails is an error.

    ``model_default`` is the model's own last resort (an HF wrapper's directory).
    """
    experiment_dir = Path(experiment_dir)
    if override:
        path = Path(override)
        if not path.is_absolute() and (experiment_dir / path).exists():
            path = experiment_dir / path
        source = str(path) if path.exists() else override
        try:
            return _from_pretrained(source), source
        except Exception as e:
            raise CheckpointError(
                f"tokenizer {override!r} could not be loaded ({type(e).__name__}: {e}). Give a directory with HF "
                "tokenizer files, or a hub id present in the local HF cache.") from e
    bundled = experiment_dir / "tokenizer"
    if bundled.is_dir():
        return _from_pretrained(str(bundled)), str(bundled)
    name = ((training_config or {}).get("data") or {}).get("tokenizer")
    if isinstance(name, str) and name:
        local = experiment_dir / name
        source = str(local) if local.exists() else name
        try:
            return _from_pretrained(source), source
        except Exception as e:  # e.g. "debug", or a hub id that is not cached here
            logger.warning("config names tokenizer %r, which is not available offline (%s)", name, type(e).__name__)
    if model_default:
        try:
            return _from_pretrained(model_default), model_default
        except Exception as e:
            logger.warning("no tokenizer in %s (%s)", model_default, type(e).__name__)
    logger.warning("no tokenizer found for %s; serving token ids only", experiment_dir)
    return None, None


def render_with_template(owner: Any, messages: list[dict]) -> str:
    """``messages`` through ``owner``'s chat template (a tokenizer's or an HF processor's), generation
    prompt added. No template, or one that refuses the conversation, is the caller's error (422)."""
    if owner is None or not getattr(owner, "chat_template", None):
        raise InvalidInputError("this deployment has no chat template; use /v1/completions with a plain prompt",
                                field="messages")
    try:
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # e.g. the template's own raise_exception for a role order it does not take
        raise InvalidInputError(f"the chat template could not render these messages ({e})", field="messages") from e
