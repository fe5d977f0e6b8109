"""``transformer``: VLA Foundry's GPT-style decoder, state-dict compatible (format spec §4).

Reads top to bottom: rotary tables, attention masks, attention, feed-forward, block,
then the model with ``forward`` and ``generate``. Shapes: B batch, T query length,
Tk key length (cache + new), H hidden, nh heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vla_foundry.models.kv_slots import SlotBatch, SlotDecoder, SlotLayer
from vla_foundry.models.norms import build_norm
from vla_foundry.models.registry import register_model
from vla_foundry.models.rotary import KVCache, RotaryEmbedding, apply_rotary, rotary_tables
from vla_foundry.params.transformer import TransformerParams
from vla_foundry.generation import LanguageModelStep, batch_prompt, sample_loop


# ----------------------------------------------------------------------------- masks


def attention_bias(q_len: int, k_len: int, causal: bool, attention_mask: Optional[torch.Tensor],
                   dtype: torch.dtype, device: torch.device) -> tuple[Optional[torch.Tensor], bool]:
    """The additive mask for SDPA (B or 1, 1, T, Tk) or None, and whether SDPA should apply ``is_causal``.

    Follows the reference exactly (spec §4.3 cases A–C), including its quirk that a query
    row whose keys are all masked attends to every key.
    """
    if attention_mask is None:
        if q_len == 1 or not causal:
            return None, False
        if k_len == q_len:
            return None, True
    neg = torch.finfo(dtype).min
    bias = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    if causal:
        # Bottom-right aligned: query q sees keys k <= q + (Tk − Tq).
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(1 + k_len - q_len)
        bias = bias.masked_fill(future, neg)
    bias = bias[None, None]  # (1, 1, T, Tk)
    if attention_mask is not None:
        padded = (attention_mask[:, None, None, -k_len:] == 0)  # (B, 1, 1, Tk)
        bias = bias.masked_fill(padded, neg)
        all_masked = (bias == neg).all(dim=-1, keepdim=True)  # (B, 1, T, 1)
        bias = bias.masked_fill(all_masked, 0.0)
    return bias, False


# ----------------------------------------------------------------------------- layers


class Attention(nn.Module):
    def __init__(self, p: TransformerParams):
        super().__init__()
        if p.hidden_dim % p.n_heads:
            raise ValueError(f"hidden_dim ({p.hidden_dim}) must be divisible by n_heads ({p.n_heads})")
        self.n_heads = p.n_heads
        self.head_dim = p.hidden_dim // p.n_heads
        self.in_proj = nn.Linear(p.hidden_dim, 3 * p.hidden_dim, bias=False)
        self.out_proj = nn.Linear(p.hidden_dim, p.hidden_dim, bias=False)
        if p.positional_embedding_type in ("rotary", "rotary_float32"):
            if self.head_dim % 2:
                raise ValueError(f"rotary embeddings need an even head dim; got {self.head_dim}")
            self.pos_embed = RotaryEmbedding(self.head_dim)
        elif p.positional_embedding_type != "none":
            raise ValueError("positional_embedding_type must be one of rotary, rotary_float32, none; "
                             f"got {p.positional_embedding_type!r}")
        if p.qk_norm:
            self.q_norm = build_norm(p.norm_type, p.hidden_dim, p.norm_eps)
            self.k_norm = build_norm(p.norm_type, p.hidden_dim, p.norm_eps)
        self.qk_norm = p.qk_norm

    def forward(self, x, rope, bias, sdpa_causal, past):
        B, T, H = x.shape
        q, k, v = self.in_proj(x).split(H, dim=-1)  # each (B, T, H)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # over the full width, before splitting heads
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_heads, self.head_dim)
        v = v.view(B, T, self.n_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if isinstance(past, SlotLayer):  # continuous batching: each row at its own position (kv_slots.py)
            k, v = past.update(k, v)  # (B, Tk, nh, hd)
        elif past is not None:
            k = torch.cat([past[0], k], dim=1)  # (B, Tk, nh, hd)
            v = torch.cat([past[1], v], dim=1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, is_causal=sdpa_causal
        )  # (B, nh, T, hd)
        o = o.transpose(1, 2).reshape(B, T, H)
        return self.out_proj(o), [k, v]


def swiglu_width(hidden_dim: int) -> int:
    return 256 * math.ceil((8 * hidden_dim // 3) / 256)


class SwiGLU(nn.Module):
    def __init__(self, hidden_dim: int):
        super().__init__()
        width = swiglu_width(hidden_dim)
        self.w12 = nn.Linear(hidden_dim, 2 * width, bias=False)
        self.w3 = nn.Linear(width, hidden_dim, bias=False)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1)  # first half is the gate
        return self.w3(F.silu(gate) * up)


def build_feed_forward(p: TransformerParams) -> nn.Module:
    if p.ffn_type == "swiglu":
        return SwiGLU(p.hidden_dim)
    if p.ffn_type == "gelu":  # keys feed_forward.0 / feed_forward.2
        return nn.Sequential(nn.Linear(p.hidden_dim, 4 * p.hidden_dim, bias=False), nn.GELU(),
                             nn.Linear(4 * p.hidden_dim, p.hidden_dim, bias=False))
    raise ValueError(f"ffn_type must be 'swiglu' or 'gelu'; got {p.ffn_type!r}")


class Block(nn.Module):
    def __init__(self, p: TransformerParams):
        super().__init__()
        self.attention_norm = build_norm(p.norm_type, p.hidden_dim, p.norm_eps)
        self.attention = Attention(p)
        self.ffn_norm = build_norm(p.norm_type, p.hidden_dim, p.norm_eps)
        self.feed_forward = build_feed_forward(p)

    def forward(self, x, rope, bias, sdpa_causal, past):
        a, present = self.attention(self.attention_norm(x), rope, bias, sdpa_causal, past)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), present


# ----------------------------------------------------------------------------- model


@dataclass
class TransformerOutput:
    logits: torch.Tensor  # (B, T, V)
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[tuple] = None  # per block, (B, T, H), before the final norm


@register_model("transformer")
class Transformer(nn.Module):
    modality = "text"
    supports_cuda_graph = True  # generate(..., cuda_graph=True); see cuda_graph_decode.py

    def __init__(self, params: TransformerParams, load_pretrained: bool = True):
        super().__init__()
        self.params = params
        p = params
        self.embeddings = nn.Embedding(p.vocab_size, p.hidden_dim)
        if p.post_embed_norm:
            self.post_embed_norm = build_norm(p.norm_type, p.hidden_dim, p.norm_eps)
        self.layers = nn.ModuleList(Block(p) for _ in range(p.n_layers))
        self.norm = build_norm(p.norm_type, p.hidden_dim, p.norm_eps)
        self.output = nn.Linear(p.hidden_dim, p.vocab_size, bias=False)
        self._rope_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.apply(self._init_weights)
        if p.weight_tying:
            self.output.weight = self.embeddings.weight

    def _rotary(self, offset: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for positions offset … offset+length−1, from tables kept per device.

        Built once from the formula (never from the loaded ``inv_freq``, spec §2.4) instead of
        on every forward: a decode step then launches no table kernels and copies nothing.
        """
        needed = offset + length
        if self._rope_cache is None or self._rope_cache[0].device != device or self._rope_cache[0].shape[0] < needed:
            size = max(needed, self.params.max_seq_len)
            with torch.inference_mode(False):  # plain tensors, usable by a later training step too
                self._rope_cache = rotary_tables(0, size, self.params.hidden_dim // self.params.n_heads, device)
        cos, sin = self._rope_cache
        return cos[offset:needed], sin[offset:needed]

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the weights invalidates derived tables and captured decode graphs.
        self._rope_cache = None
        self.__dict__.pop("_graph_decoders", None)
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.params.hidden_dim

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)  # (B, T, H)

    @property
    def max_seq_len(self) -> int:
        return self.params.max_seq_len

    def forward(self, input_ids=None, past_key_values=None, use_cache=False, attention_mask=None,
                output_hidden_states=False, is_causal=None, inputs_embeds=None) -> TransformerOutput:
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        if self.params.post_embed_norm:
            x = self.post_embed_norm(x)
        causal = bool(is_causal) or self.params.is_causal  # a call never makes a causal model bidirectional
        if causal and not use_cache:
            attention_mask = None  # the reference ignores padding here (right padding assumed; bug B3)
        B, T, _ = x.shape
        rotary = self.params.positional_embedding_type != "none"
        if isinstance(past_key_values, SlotBatch):  # one new token per row, each at its own position
            slots = past_key_values
            bias, sdpa_causal = slots.bias(x.dtype), False
            # the whole tables, indexed by each row's position (no slicing by a number: a trace stays shape-free)
            rope = slots.rotary(*self._rotary(0, self.params.max_seq_len, x.device)) if rotary else None
            pasts = [slots.layer(i) for i in range(len(self.layers))]
            use_cache = False  # the slots hold the cache
        else:
            offset = past_key_values[0][0].shape[1] if past_key_values else 0
            bias, sdpa_causal = attention_bias(T, offset + T, causal, attention_mask, x.dtype, x.device)
            rope = self._rotary(offset, T, x.device) if rotary else None
            pasts = past_key_values or [None] * len(self.layers)
        presents, hidden = [], []
        for layer, past in zip(self.layers, pasts):
            x, present = layer(x, rope, bias, sdpa_causal, past)
            presents.append(present)
            if output_hidden_states:
                hidden.append(x)
        logits = self.output(self.norm(x))  # (B, T, V)
        if self.params.cast_output_to_float32:
            logits = logits.float()
        return TransformerOutput(logits, presents if use_cache else None,
                                 tuple(hidden) if output_hidden_states else None)

    # ------------------------------------------------------------------ continuous batching (continuous.py)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """One prompt (1, T) as ``generate``'s first step runs it: next-token logits (1, V) and its cache."""
        out = self(input_ids, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def step_alone(self, input_ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One sequence's next token (1, 1) on its own cache, as ``generate``'s later steps run it: logits (1, V) and
        the grown cache (a lone sequence of a continuous batch decodes so, with nothing to gather)."""
        out = self(input_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def slot_bytes(self) -> int:
        """The cache memory of one sequence's slot (its full context)."""
        return SlotDecoder.bytes_per_slot(self)

    def slot_decoder(self, num_slots: int, graphs: bool = False) -> SlotDecoder:
        """Decode steps for ``num_slots`` sequences at once, each at its own position (kv_slots.py); ``graphs``:
        replayed from captured graphs (slot_graphs.py)."""
        return SlotDecoder(self, num_slots, graphs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50,
                 eos_token_id=None, use_cache=True, *, generator: Optional[torch.Generator] = None,
                 stopping: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 cuda_graph: bool = False) -> torch.Tensor:
        """Prompt + new ids, (B, T + n). Sampling as VLA Foundry does it (spec §4.4).

        ``generator`` makes sampling reproducible. ``stopping(new_ids (B, n)) -> (B,) bool``
        marks rows that are done; generation ends once every row is done (the reference
        only stops when all rows emit ``eos_token_id`` at the same step, which still holds).
        ``cuda_graph`` (CUDA, with the cache) replays decode steps from a captured graph.
        """
        input_ids, attention_mask = batch_prompt(input_ids, attention_mask)
        decoder = None
        if cuda_graph and use_cache and input_ids.is_cuda and max_new_tokens > 1:  # else nothing to replay
            from vla_foundry.models.cuda_graph_decode import graph_decoder

            decoder = graph_decoder(self, input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        step = LanguageModelStep(self, use_cache)
        if decoder is not None:
            lm_step = step

            def step(generated, mask):
                if lm_step.past is None:  # prefill eagerly, then hand the cache to the graph
                    logits = lm_step(generated, mask)
                    decoder.prefill(lm_step.past, mask)
                    return logits
                return decoder.step(generated[:, -1:], position=generated.shape[1] - 1)  # (B, V)

        return sample_loop(step, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                           stopping=stopping)
