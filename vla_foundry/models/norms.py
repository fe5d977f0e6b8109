"""Normalization layers selected by a config's ``norm_type`` (format spec §3)."""

from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = ("default_layer_norm", "lp_layer_norm", "gain_only_layer_norm", "gain_only_lp_layer_norm",
              "no_wb_layer_norm", "rms_norm")


class RMSNorm(nn.Module):
    """``x · rsqrt(mean(x²) + eps)`` computed in float32, cast back, then scaled (key ``weight`` only)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    if norm_type in ("default_layer_norm", "lp_layer_norm"):
        return nn.LayerNorm(dim, eps=eps)
    if norm_type in ("gain_only_layer_norm", "gain_only_lp_layer_norm"):
        return nn.LayerNorm(dim, eps=eps, bias=False)
    if norm_type == "no_wb_layer_norm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}; got {norm_type!r}")
