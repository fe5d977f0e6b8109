"""A KV cache of fixed slots, for decoding many sequences of different lengths in one step.

Continuous batching (``vla_foundry/continuous.py``) keeps each running sequence in a slot: a
row of a preallocated cache of ``num_slots`` × ``max_len`` positions per layer. A sequence's
prompt is prefilled on its own (exactly as a solo run prefills it) and its keys and values are
copied into its slot; each decode step then feeds one new token per sequence, each at its own
position. Nothing is padded on the left and nothing is copied to grow the cache: a step writes
one position per sequence and attends to each sequence's own positions only.

Why slots and not blocks (vLLM's paged cache): our sequences are bounded by the model's
``max_seq_len`` (hundreds to a few thousand tokens) and a deployment runs tens of them, so a
slot per sequence wastes at most one context per idle slot, and the attention stays one plain
SDPA call over a gathered (B, Tk) key range with a mask: no custom kernel. The cache's memory
is fixed when it is built (``bytes_per_slot`` × slots) and never grows.

A model that decodes in slots offers ``prefill``, ``slot_bytes()`` and ``slot_decoder(num_slots)``;
:class:`SlotDecoder` is that decoder for our own transformer (``transformer``, and ``vlm``'s language
model); ``models/hf_slots.py`` is the one for Hugging Face models. The batcher keeps its sequences in
the lowest slots, and a step over such packed slots is :class:`PackedSlotStep`, a module of its own so
that ``models/slot_graphs.py`` can replay it from a captured graph.

Shapes: L layers, S slots, M max_len, nh heads, hd head dim, B sequences in a step, Tk keys.
"""

from __future__ import annotations

from typing import Optional

import torch


class SlotDecoder:
    """Decode steps of our transformer ``lm`` for sequences kept in the slots of a :class:`SlotKVCache`: what a
    ``ContinuousBatcher`` drives (``store_prompt`` after a prefill, then ``decode`` once per step). With ``graphs``,
    steps over packed slots replay from captured graphs (``models/slot_graphs.py``) where the device allows."""

    def __init__(self, lm, num_slots: int, graphs: bool = False):
        p, weight = lm.params, next(lm.parameters())
        self.lm = lm
        self.cache = SlotKVCache(p.n_layers, num_slots, lm.max_seq_len, p.n_heads, p.hidden_dim // p.n_heads,
                                 weight.dtype, weight.device)
        self.step = PackedSlotStep(lm)
        self.graphs = None
        if graphs:
            from vla_foundry.models.slot_graphs import SlotGraphs  # (it builds on this module)

            self.graphs = SlotGraphs(self.step, self.cache)

    @staticmethod
    def bytes_per_slot(lm) -> int:
        p = lm.params
        return SlotKVCache.bytes_per_slot(p.n_layers, lm.max_seq_len, p.hidden_dim, next(lm.parameters()).dtype)

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    @property
    def mode(self) -> str:
        """How packed decode steps run: ``eager``, ``traced`` (CPU) or ``cuda_graph``."""
        return self.graphs.mode if self.graphs is not None else "eager"

    def warmup(self) -> None:
        """Capture every graph a step may need now (at load), instead of at a step's first use of its shape."""
        if self.graphs is not None:
            self.graphs.capture_all()

    def store_prompt(self, slot: int, present: list) -> None:
        self.cache.store_prompt(slot, present)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def decode(self, last_ids: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per sequence, ``last_ids`` (B,), sequence b in ``slots[b]`` at ``positions[b]``: the next
        token's logits (B, V)."""
        span = packed_span(slots)
        if span is None:  # slots apart (the batcher packs its sequences, so only other callers): gathered
            return self.lm(last_ids[:, None], past_key_values=self.cache.batch(slots, positions)).logits[:, -1]
        if self.graphs is not None:
            logits = self.graphs.decode(last_ids, span, positions)
            if logits is not None:
                return logits
        return self.step(last_ids, *self.cache.packed_rows(span, positions))


class PackedSlotStep(torch.nn.Module):
    """One decode step of sequences in packed slots: ``forward(ids (B,), positions (B,), keys, values)``, where keys
    and values are the step's rows of the cache, views (L, B, Tk, nh, hd) with Tk > every position; writes each
    row's new key and value at its position and returns the next token's logits (B, V).

    Every shape is read from the inputs, never fixed by Python numbers, so one TorchScript trace of it serves every
    B and Tk (``slot_graphs.py``) and runs exactly the ops of the eager call."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        # The rotary tables, built now: a trace or graph captured later reads them as they are (and not a
        # recomputation of them), and this reference keeps them alive for as long as a graph reads their memory.
        self.rope_tables = lm._rotary(0, lm.max_seq_len, next(lm.parameters()).device)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(ids.shape[0], device=ids.device)  # (B,): row b of the views is sequence b
        batch = SlotBatch(keys, values, rows, positions, length=keys.shape[2], span=slice(None))
        return self.lm(ids[:, None], past_key_values=batch).logits[:, -1]


def packed_span(slots: list[int]) -> Optional[slice]:
    """Slots a, a+1, …, a+B−1 in order (the batcher packs its sequences at the low slots) as a slice, which reads a
    view of the cache instead of gathering a copy of every sequence's keys and values; None otherwise."""
    packed = list(slots) == list(range(slots[0], slots[0] + len(slots)))
    return slice(slots[0], slots[0] + len(slots)) if packed else None


class SlotKVCache:
    def __init__(self, n_layers: int, num_slots: int, max_len: int, n_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, num_slots, max_len, n_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, S, M, nh, hd), after rotary
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len

    @staticmethod
    def bytes_per_slot(n_layers: int, max_len: int, hidden_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * max_len * hidden_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def store_prompt(self, slot: int, present: list) -> None:
        """A prefilled prompt's cache (per layer [K, V], each (1, T, nh, hd)) into positions 0…T−1 of ``slot``; the
        positions after it are zeroed, so what a previous sequence left there (masked, but 0 × NaN is NaN) can
        never reach this one."""
        for layer, (k, v) in enumerate(present):
            length = k.shape[1]
            self.keys[layer, slot, :length] = k[0]
            self.values[layer, slot, :length] = v[0]
            self.keys[layer, slot, length:] = 0
            self.values[layer, slot, length:] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Positions 0…length−1 of slot ``src`` into slot ``dst``; dst's later positions zeroed (see store_prompt)."""
        for cache in (self.keys, self.values):  # (L, S, M, nh, hd)
            cache[:, dst, :length] = cache[:, src, :length]
            cache[:, dst, length:] = 0

    def packed_rows(self, span: slice, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``PackedSlotStep``'s inputs after the ids, for the sequences in slots ``span`` at ``positions``: the
        positions (B,), and their keys and values up to the furthest position, views (L, B, Tk, nh, hd)."""
        length = max(positions) + 1
        return (torch.tensor(positions, dtype=torch.long, device=self.keys.device), self.keys[:, span, :length],
                self.values[:, span, :length])

    def batch(self, slots: list[int], positions: list[int]) -> "SlotBatch":
        """A decode step's view: sequence b (in ``slots[b]``) gets its new token at ``positions[b]``."""
        device = self.keys.device
        return SlotBatch(self.keys, self.values, torch.tensor(slots, dtype=torch.long, device=device),
                         torch.tensor(positions, dtype=torch.long, device=device), length=max(positions) + 1,
                         span=packed_span(slots))


class SlotBatch:
    """What a decode step passes as ``past_key_values``: per layer, where each sequence's new key and value go
    and which keys each sequence may attend to (its own positions 0…position).

    ``keys``/``values`` (L, S, M, nh, hd) hold the sequences in rows ``slots`` (B,); ``span``, when those rows are a
    run, reads them as a view instead of a gather. ``length`` (Tk): the keys a step reads, more than every
    position."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 length: int, span: Optional[slice] = None):
        self.keys, self.values = keys, values
        self.slots, self.positions = slots, positions  # (B,), (B,)
        self.length = length
        self._span = span
        self._visible: Optional[torch.Tensor] = None

    def layer(self, index: int) -> "SlotLayer":
        return SlotLayer(self, index)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's k, v (B, 1, nh, hd) at each sequence's position; its keys and values (B, Tk, nh, hd)."""
        keys, values = self.keys[layer], self.values[layer]  # (S, M, nh, hd)
        keys[self.slots, self.positions] = k[:, 0]
        values[self.slots, self.positions] = v[:, 0]
        rows = self.slots if self._span is None else self._span
        return keys[rows, :self.length], values[rows, :self.length]

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, Tk) additive mask: 0 on each sequence's own positions, the dtype's minimum after them
        (as the solo path masks padding: a softmax weight of exactly 0)."""
        if self._visible is None:
            keys = torch.arange(self.length, device=self.positions.device)
            self._visible = keys[None, :] <= self.positions[:, None]  # (B, Tk)
        bias = torch.zeros(self._visible.shape, dtype=dtype, device=self._visible.device)
        return bias.masked_fill(~self._visible, torch.finfo(dtype).min)[:, None, None, :]

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's rows of cos/sin tables (M, hd) that cover every position: (B, 1, hd), one new token each."""
        return cos[self.positions][:, None], sin[self.positions][:, None]


class SlotLayer:
    """One layer's part of a :class:`SlotBatch`: what an attention layer gets as its ``past``."""

    def __init__(self, batch: SlotBatch, index: int):
        self.batch, self.index = batch, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch.update(self.index, k, v)
