"""CUDA-graph decoding for ``transformer``: one graph replay per generated token.

A small model's eager decode step is bound by kernel launches (about 2 ms on an H200 for
a 4-layer model, whatever the cache), so the KV cache alone buys nothing on a GPU. Here
the decode step runs over a preallocated (static) KV cache and is captured once as a CUDA
graph; each new token then costs one replay. The math is the eager decode step's: keys not
yet written and padding keys are masked out, so the result equals the eager path up to
floating-point summation order. Prefill stays eager (``Transformer.forward``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from vla_foundry.models.rotary import KVCache, apply_rotary

MAX_DECODERS_PER_MODEL = 4  # (batch, length) shapes kept captured per model; least recently used goes
MAX_STATIC_CACHE_BYTES = 1 << 30  # a larger static KV cache is not worth holding: decode eagerly instead


def length_bucket(length: int, max_seq_len: int) -> int:
    """Static cache length for a generation of ``length`` positions: a power of two, at least 64."""
    bucket = 64
    while bucket < length:
        bucket *= 2
    return max(length, min(bucket, max_seq_len))


class GraphDecoder:
    """Static KV cache + captured decode step for one (batch size, cache length)."""

    def __init__(self, model, batch_size: int, cache_len: int):
        p = model.params
        self.model = model
        weight = model.embeddings.weight
        device, dtype = weight.device, weight.dtype
        self.n_heads, self.head_dim, self.hidden = p.n_heads, p.hidden_dim // p.n_heads, p.hidden_dim
        self.cache_len = cache_len
        # Plain tensors (not inference tensors), so a decoder made under inference_mode also
        # serves a later call under no_grad; no autograd is ever recorded.
        with torch.inference_mode(False), torch.no_grad():
            self._allocate_and_capture(model, batch_size, cache_len, device, dtype)

    def _allocate_and_capture(self, model, batch_size, cache_len, device, dtype) -> None:
        p = model.params
        shape = (batch_size, self.n_heads, cache_len, self.head_dim)  # (B, nh, L, hd)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.layers]
        self.valid = torch.zeros(batch_size, cache_len, device=device, dtype=torch.bool)  # (B, L)
        self.token = torch.zeros(batch_size, 1, device=device, dtype=torch.long)  # (B, 1)
        self.position = torch.zeros(1, device=device, dtype=torch.long)
        self.rope = model._rotary(0, cache_len, device) if p.positional_embedding_type != "none" else None
        self.neg = torch.finfo(dtype).min

        self.graph = None
        if device.type == "cuda":  # elsewhere the same static-cache step runs eagerly (tests use that)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: captured on first use while serving; other threads' CUDA calls must not spoil it.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = self._step()  # (B, V), static output

    def _step(self) -> torch.Tensor:
        """The decode step of ``Transformer.forward`` for one token at ``self.position``."""
        model = self.model
        B = self.token.shape[0]
        x = model.embeddings(self.token)  # (B, 1, H)
        if model.params.post_embed_norm:
            x = model.post_embed_norm(x)
        self.valid.index_fill_(1, self.position, True)
        bias = torch.zeros(self.valid.shape, device=x.device, dtype=x.dtype).masked_fill(~self.valid, self.neg)
        bias = bias[:, None, None, :]  # (B, 1, 1, L)
        rope = None
        if self.rope is not None:
            rope = (self.rope[0].index_select(0, self.position), self.rope[1].index_select(0, self.position))
        for layer, k_cache, v_cache in zip(model.layers, self.keys, self.values):
            attn = layer.attention
            q, k, v = attn.in_proj(layer.attention_norm(x)).split(self.hidden, dim=-1)  # each (B, 1, H)
            if attn.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = (t.view(B, 1, self.n_heads, self.head_dim) for t in (q, k, v))  # (B, 1, nh, hd)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            k_cache.index_copy_(2, self.position, k.transpose(1, 2))
            v_cache.index_copy_(2, self.position, v.transpose(1, 2))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache, attn_mask=bias)  # (B, nh, 1, hd)
            h = x + attn.out_proj(o.transpose(1, 2).reshape(B, 1, self.hidden))
            x = h + layer.feed_forward(layer.ffn_norm(h))
        logits = model.output(model.norm(x))[:, -1]  # (B, V)
        return logits.float() if model.params.cast_output_to_float32 else logits

    def prefill(self, past: KVCache, attention_mask) -> None:
        """Load the eager prefill's cache (keys after rotary) and which of its keys are real."""
        length = past[0][0].shape[1]
        for (k, v), k_cache, v_cache in zip(past, self.keys, self.values):
            k_cache[:, :, :length].copy_(k.transpose(1, 2))
            v_cache[:, :, :length].copy_(v.transpose(1, 2))
        # Rows left by an earlier, longer call are masked, but a non-finite leftover would still
        # poison the attention (0 × NaN = NaN): clear them.
        for k_cache, v_cache in zip(self.keys, self.values):
            k_cache[:, :, length:].zero_()
            v_cache[:, :, length:].zero_()
        self.valid.zero_()
        if attention_mask is None:
            self.valid[:, :length] = True
        else:
            self.valid[:, :length] = attention_mask[:, -length:].bool()

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (B, V) for ``token`` (B, 1) at ``position``; valid until the next call."""
        if position >= self.cache_len:
            raise ValueError(f"position {position} is past this decoder's cache of {self.cache_len}")
        self.token.copy_(token)
        self.position.fill_(position)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


def static_cache_bytes(model, batch_size: int, cache_len: int) -> int:
    weight = model.embeddings.weight
    return 2 * len(model.layers) * batch_size * cache_len * model.params.hidden_dim * weight.element_size()


def graph_decoder(model, batch_size: int, total_len: int) -> Optional[GraphDecoder]:
    """A captured decoder for this batch size and length, reused across calls (LRU per model).

    None when its static KV cache would exceed ``MAX_STATIC_CACHE_BYTES``: the caller then
    decodes eagerly, whose cache grows only as long as the generation.
    """
    key = (batch_size, length_bucket(total_len, model.params.max_seq_len))
    if static_cache_bytes(model, *key) > MAX_STATIC_CACHE_BYTES:
        return None
    decoders: OrderedDict = model.__dict__.setdefault("_graph_decoders", OrderedDict())
    if key in decoders:
        decoders.move_to_end(key)
        return decoders[key]
    while len(decoders) >= MAX_DECODERS_PER_MODEL:
        decoders.popitem(last=False)
    decoders[key] = GraphDecoder(model, *key)
    return decoders[key]
