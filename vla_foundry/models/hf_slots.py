"""Slots for Hugging Face models: continuous batching (``vla_foundry/continuous.py``) for ``transformer_hf`` and
``vlm_hf`` through HF's public cache API.

Our own models read their slots directly (``kv_slots.py``); an HF model only takes a cache object. So each
decode step hands it a ``DynamicCache`` gathered from the slots: sequence b's keys and values at columns
0…Tk−1 (Tk = the longest sequence's cached length; a shorter sequence's columns after its own length are
zeros, masked out by the 2-D ``attention_mask``), its new token at ``position_ids`` = its own position. The
model appends each sequence's new key and value at column Tk; they are copied back into each slot at its own
position. Keys are cached after rotary, so a key's column does not need to equal its position: only the
query's position (``position_ids``) and which columns it may see (the mask) matter. The gather costs one copy
of the step's keys and values per step (and ``DynamicCache`` copies it once more as it takes it, and the
model's attention once more as it appends the new token: transient memory of up to about three times the
step's keys and values, beside the slots), which a model that is not ours cannot avoid without patching its
attention.

Not every HF family can do this. A family qualifies when its positions are one id per token whatever the batch
(not multimodal rotary positions kept on the model, as Qwen2-VL's, nor rotary scaling chosen from the batch's
longest position, as ``dynamic`` and ``longrope``), its prompt's cache is a plain ``DynamicCache`` of
full-attention layers of one shape (not sliding windows, cross-attention or compressed latents), and,
checked on the model itself when the batcher is made, two prompts of different lengths decoded in one step
give the logits each gets alone. Anything else decodes one request at a time, as before, and ``slot_bytes``
says so by returning None.

Shapes: L layers, S slots, nkv key/value heads, M max_len, hd head dim, B sequences in a step, Tk columns.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from vla_foundry.models.kv_slots import packed_span

logger = logging.getLogger(__name__)

# How far a step in slots may be from the same step alone (max |Δlogit| relative to the largest logit) for a
# family to qualify: float32 kernels reorder sums a little when the key length differs; half precision more.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 3e-2


@dataclass(frozen=True)
class SlotLayout:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_len: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_slot(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.max_len * self.head_dim * element


class HFSlotDecoder:
    """Decode steps of an HF wrapper (``HFWrapper``: ``run_hf``) for sequences kept in ``num_slots`` slots."""

    def __init__(self, wrapper, layout: SlotLayout, num_slots: int):
        shape = (layout.n_layers, num_slots, layout.n_kv_heads, layout.max_len, layout.head_dim)
        self.wrapper = wrapper
        self.keys = torch.zeros(shape, dtype=layout.dtype, device=layout.device)  # (L, S, nkv, M, hd)
        self.values = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self.num_slots = num_slots

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    mode = "eager"  # HF models' steps are not captured (their cache objects are rebuilt at every step)

    def warmup(self) -> None:
        """Nothing to capture."""

    def store_prompt(self, slot: int, present) -> None:
        """A prefilled prompt's ``DynamicCache`` (per layer (1, nkv, T, hd)) into columns 0…T−1 of ``slot``; the
        columns after it are zeroed (masked, but 0 × NaN left by a previous sequence would still be NaN)."""
        for layer, cached in enumerate(present.layers):
            length = cached.keys.shape[2]
            self.keys[layer, slot, :, :length] = cached.keys[0]
            self.values[layer, slot, :, :length] = cached.values[0]
            self.keys[layer, slot, :, length:] = 0
            self.values[layer, slot, :, length:] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Columns 0…length−1 of slot ``src`` into slot ``dst``; dst's later columns zeroed (see store_prompt)."""
        for cache in (self.keys, self.values):  # (L, S, nkv, M, hd)
            cache[:, dst, :, :length] = cache[:, src, :, :length]
            cache[:, dst, :, length:] = 0

    def decode(self, last_ids: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per sequence, ``last_ids`` (B,), sequence b in ``slots[b]`` at ``positions[b]`` (= how many
        of its tokens are cached): the next token's logits (B, V)."""
        from transformers import DynamicCache

        device = self.keys.device
        index = torch.tensor(slots, dtype=torch.long, device=device)  # (B,)
        position = torch.tensor(positions, dtype=torch.long, device=device)  # (B,)
        columns = max(positions)  # Tk
        rows = packed_span(slots) or index  # a view when packed (DynamicCache appends to a copy, never in place)
        cache = DynamicCache([(k[rows, :, :columns], v[rows, :, :columns])  # (B, nkv, Tk, hd) per layer
                              for k, v in zip(self.keys, self.values)])
        mask = torch.ones(len(slots), columns + 1, dtype=torch.long, device=device)  # (B, Tk + 1): + the new token
        mask[:, :columns] = torch.arange(columns, device=device)[None, :] < position[:, None]
        out = self.wrapper.run_hf(cache, True, input_ids=last_ids[:, None], attention_mask=mask,
                                  position_ids=position[:, None])
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            appended = out.past_key_values.layers[layer]  # (B, nkv, Tk + 1, hd)
            k[index, :, position] = appended.keys[:, :, columns]
            v[index, :, position] = appended.values[:, :, columns]
        return out.logits[:, -1]


def slot_layout(wrapper, probe_ids: tuple[int, ...] = (1, 2, 3)) -> Optional[SlotLayout]:
    """The slot layout of ``wrapper``'s model, or None (with the reason logged) when its family cannot decode in
    slots (see the module's docstring). Runs the model on a few tokens of ``probe_ids``; never raises."""
    kind = f"{wrapper.params.type} ({type(wrapper.model).__name__})"
    weight = next(wrapper.parameters())
    ids = torch.tensor([list(probe_ids)], dtype=torch.long, device=weight.device)
    layout, reason = None, _position_refusal(wrapper)
    if reason is None:
        try:
            with torch.inference_mode():
                _, present = wrapper.prefill(ids)
                reason = _cache_refusal(present)
                if reason is None:
                    _, n_kv_heads, _, head_dim = present.layers[0].keys.shape
                    layout = SlotLayout(len(present.layers), n_kv_heads, head_dim, wrapper.max_seq_len,
                                        present.layers[0].keys.dtype, weight.device)
                    error = _self_check(wrapper, layout, ids)
                    if error is not None:
                        reason = f"a step in slots differs from the same step alone by {error:.3g} (relative)"
        except Exception as e:  # a family that needs more than token ids, or whose cache does not fit slots
            reason = f"trying it failed ({type(e).__name__}: {e})"
    if reason is not None:
        logger.info("%s decodes one request at a time: %s", kind, reason)
        return None
    return layout


# Rotary variants whose frequencies depend on the longest position in the batch (HF picks them from the batch's
# position_ids), so a sequence's step would depend on its neighbours.
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _position_refusal(wrapper) -> Optional[str]:
    """Why the model's positions cannot be one id per token given per row, or None. Read from its configuration:
    the self-check's short text-only prompts would not show these."""
    config = wrapper.model.config
    for part in (config, getattr(config, "text_config", None)):
        for name in ("rope_parameters", "rope_scaling"):
            rope = getattr(part, name, None)
            if isinstance(rope, dict):
                if rope.get("rope_type", rope.get("type")) in BATCH_DEPENDENT_ROPE:
                    return f"its rotary scaling ({rope.get('rope_type', rope.get('type'))}) depends on the batch"
                if "mrope_section" in rope:
                    return "its positions are multimodal (mrope), not one id per token"
    if any(hasattr(module, "rope_deltas") for module in wrapper.model.modules()):
        return "it keeps position offsets of the last prompt (rope_deltas) on the model"
    return None


def _cache_refusal(present) -> Optional[str]:
    """Why a prompt's cache cannot live in slots, or None: it must be a ``DynamicCache`` of full-attention layers,
    every one filled, with keys and values of one shape (1, nkv, T, hd) throughout."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(present, "layers", ())
    if type(present) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        return f"its cache is {type(present).__name__} of {kinds}, not a DynamicCache of full layers"
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) if getattr(layer, "keys", None) is not None
              and getattr(layer, "values", None) is not None else None for layer in layers}
    if not layers or None in shapes or len(shapes) != 1 or len({*next(iter(shapes))}) != 1:
        return "its layers cache keys and values of different shapes (or none for a text prompt)"
    return None


def _self_check(wrapper, layout: SlotLayout, ids: torch.Tensor) -> Optional[float]:
    """Two prompts of different lengths (``ids`` and its first token) decoded in one step vs each alone: None when
    they agree, else the relative difference."""
    prompts = [ids, ids[:, :1]]
    check = HFSlotDecoder(wrapper, SlotLayout(layout.n_layers, layout.n_kv_heads, layout.head_dim,
                                              ids.shape[1] + 1, layout.dtype, layout.device), num_slots=2)
    alone, last = [], []
    for slot, prompt in enumerate(prompts):
        logits, present = wrapper.prefill(prompt)
        check.store_prompt(slot, present)
        token = logits.argmax(-1)  # (1,)
        alone.append(wrapper.run_hf(copy.deepcopy(present), True, input_ids=token[:, None]).logits[0, -1])
        last.append(token)
    together = check.decode(torch.cat(last), [0, 1], [p.shape[1] for p in prompts])  # (2, V)
    reference = torch.stack(alone)
    error = float((together - reference).abs().max() / reference.abs().max().clamp(min=1.0))
    return None if error <= SELF_CHECK_TOLERANCE.get(layout.dtype, HALF_TOLERANCE) else error
