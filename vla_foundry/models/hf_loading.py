"""What the Hugging Face wrappers (``transformer_hf``, ``vlm_hf``) share: building the HF model and positions.

A wrapper keeps the HF model as ``self.model``, so VLA Foundry's state-dict keys are
``model.<HF keys>`` (format spec §1.3) and a checkpoint loads straight into it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vla_foundry.models.hf_slots import HFSlotDecoder, slot_layout
from vla_foundry.models.transformer import TransformerOutput


def build_hf_model(auto_class: type, source: Optional[str], load_pretrained: bool, kind: str) -> nn.Module:
    """``auto_class`` from ``source``: with its weights, or (``load_pretrained=False``) randomly initialised
    from its config because a VLA Foundry checkpoint will overwrite every weight. Always float32 on CPU
    (device and dtype are chosen later, once)."""
    from transformers import AutoConfig

    if not source:
        raise ValueError(f"{kind} needs `hf_pretrained`: a Hugging Face model directory (or a hub id in the local "
                         "HF cache)")
    try:
        if load_pretrained:
            return auto_class.from_pretrained(source, dtype=torch.float32)
        return auto_class.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"{kind}: could not load {source!r} with {auto_class.__name__} ({e}). Give a local "
                         "Hugging Face directory (config.json + weights) of the right kind") from e


def positions_from_mask(attention_mask: Optional[torch.Tensor], new_tokens: int) -> Optional[torch.Tensor]:
    """Position ids of the last ``new_tokens`` columns for left-padded rows: (B, new_tokens), or None.

    HF models number positions 0, 1, … from the first column; with left padding a row's
    first real token must be position 0 instead, or a padded row decodes differently from
    the same prompt alone (HF's own ``generate`` does the same).
    """
    if attention_mask is None:
        return None
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, Tk)
    return positions[:, -new_tokens:]


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` from transformers 5.2x on, ``past_key_values`` before
    (the old name still works there but logs a deprecation on every step)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of an HF model output, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def hf_image_token_id(model_config: Any) -> int:
    """The id of the image placeholder token that a multimodal config's model fills with image features.

    Idefics3 (and most newer families) keep it in ``image_token_id``; LLaVA stores
    ``image_token_index`` (exposed as ``image_token_id`` through its attribute map).
    """
    for attribute in ("image_token_id", "image_token_index"):
        value = getattr(model_config, attribute, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model_config).__name__} has no image_token_id or image_token_index")


def end_token_ids(model: nn.Module) -> list[int]:
    """``generation_config.eos_token_id`` as a list (HF allows an int or a list)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class HFWrapper(nn.Module):
    """Base of the HF wrappers: the HF model as ``self.model`` (so keys are ``model.<HF keys>``), built from
    ``params.hf_pretrained`` with ``AUTO_CLASS``, and one call that runs it with a KV cache under either
    transformers' keyword."""

    AUTO_CLASS = ""  # the transformers auto class, e.g. "AutoModelForCausalLM"
    masks_padding_without_cache = True  # HF applies the mask on every path, so padded rows batch without the cache

    def __init__(self, params, load_pretrained: bool = True):
        super().__init__()
        import transformers

        self.params = params
        self.model = build_hf_model(getattr(transformers, self.AUTO_CLASS), params.hf_pretrained, load_pretrained,
                                    params.type)
        self._cache_keyword = cache_keyword(self.model)

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().out_features

    @property
    def end_token_ids(self) -> list[int]:
        """The ids that end a generation per the model's generation config (e.g. an end-of-turn token)."""
        return end_token_ids(self.model)

    # ------------------------------------------------------------------ continuous batching (continuous.py)

    def prefill(self, input_ids: torch.Tensor, **inputs) -> tuple[torch.Tensor, Any]:
        """One prompt (1, T) and its extra inputs (a caption's images) as ``generate``'s first step runs them:
        next-token logits (1, V) and HF's cache."""
        out = self.run_hf(None, True, input_ids=input_ids, **inputs)
        cached = getattr(out.past_key_values, "get_seq_length", lambda: input_ids.shape[1])()
        if cached != input_ids.shape[1]:  # slots count a sequence's positions by its tokens
            raise ValueError(f"{self.params.type}: {type(self.model).__name__} cached {cached} positions for a prompt "
                             f"of {input_ids.shape[1]} tokens, so its sequences cannot share decode steps; serve it "
                             "with VLA_CONTINUOUS_BATCHING=false")
        return out.logits[:, -1], out.past_key_values

    def step_alone(self, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, Any]:
        """One sequence's next token (1, 1) on its own cache, as ``generate``'s later steps run it (one row: no mask,
        positions follow the cache): logits (1, V) and the grown cache."""
        out = self.run_hf(cache, True, input_ids=input_ids)
        return out.logits[:, -1], out.past_key_values

    def slot_bytes(self) -> Optional[int]:
        """One sequence's slot of cache memory (its full context); None when this model's family cannot decode
        in slots (``hf_slots.slot_layout`` checks it on the model once, on the device it is on now)."""
        if not hasattr(self, "_slot_layout"):
            self._slot_layout = slot_layout(self)
        return None if self._slot_layout is None else self._slot_layout.bytes_per_slot

    def slot_decoder(self, num_slots: int, graphs: bool = False):
        """Decode steps for ``num_slots`` sequences at once, each at its own position (``hf_slots.py``); always eager
        (``graphs`` is for our own transformer's steps, see ``slot_graphs.py``)."""
        if self.slot_bytes() is None:
            raise ValueError(f"{self.params.type}: {type(self.model).__name__} cannot decode in slots")
        return HFSlotDecoder(self, self._slot_layout, num_slots)

    def run_hf(self, past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False, **inputs):
        """The HF model on ``inputs`` → a ``TransformerOutput`` (logits, cache when asked, hidden states)."""
        out = self.model(use_cache=use_cache, output_hidden_states=output_hidden_states, **inputs,
                         **{self._cache_keyword: past_key_values})
        return TransformerOutput(out.logits, output_cache(out) if use_cache else None,
                                 out.hidden_states if output_hidden_states else None)
