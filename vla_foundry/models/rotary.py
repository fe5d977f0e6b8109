"""Rotary position embeddings (format spec §4.3) and the per-layer KV cache layout, shared by the transformer
and its CUDA-graph decoder (``cuda_graph_decode.py``), so neither imports the other's module for them."""

from __future__ import annotations

import torch
from torch import nn

KVCache = list  # per layer: [K, V], each (B, Tk, nh, hd), keys after rotary


# ----------------------------------------------------------------------------- rotary


def rotary_inv_freq(head_dim: int) -> torch.Tensor:
    """``1 / 10000^(2j/hd)``, float32 (spec §4.3)."""
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` only so checkpoints load strictly.

    The loaded value is never used: VLA Foundry builds its tables from the formula, and a
    bf16 checkpoint's rounded buffer would give different outputs (spec §2.4, bug B4).
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim))


def rotary_tables(offset: int, length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for absolute positions offset … offset+length−1, each (length, hd), float32."""
    positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, rotary_inv_freq(head_dim).to(device))  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)  half-split, not interleaved
    return angles.cos(), angles.sin()


def apply_rotary(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """u (B, T, nh, hd) rotated GPT-NeoX style; cos/sin (T, hd), or (B, T, hd) when each row has its own
    positions (continuous batching)."""
    half = u.shape[-1] // 2
    rotated = torch.cat([-u[..., half:], u[..., :half]], dim=-1)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return (u.float() * cos + rotated.float() * sin).to(u.dtype)
