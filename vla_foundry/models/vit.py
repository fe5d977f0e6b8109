"""``vit``: VLA Foundry's SigLIP-like vision transformer (format spec §5).

Built inside other models (the ``vlm``), never served alone, so it is not registered.
Shapes: B images, N cameras, P patches, D width, p patch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vla_foundry.params.vision import ViTParams


class PatchEmbedding(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        self.conv = nn.Conv2d(3, p.hidden_dim, kernel_size=p.patch_size, stride=p.patch_size)
        num_patches = (p.img_size // p.patch_size) ** 2
        self.cls_flag = p.cls_flag
        if p.cls_flag:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, p.hidden_dim))
        # Random, not zero, so training from scratch can tell patches apart (checkpoints overwrite it).
        self.position_embedding = nn.Parameter(0.02 * torch.randn(1, num_patches + int(p.cls_flag), p.hidden_dim))

    def forward(self, x):  # (B, 3, H, W)
        x = self.conv(x).flatten(2).transpose(1, 2)  # (B, P, D), row-major patches
        if self.cls_flag:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+P, D)
        return x + self.position_embedding


class SelfAttention(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        if p.hidden_dim % p.n_heads:
            raise ValueError(f"vit hidden_dim ({p.hidden_dim}) must be divisible by n_heads ({p.n_heads})")
        self.n_heads = p.n_heads
        self.qkv_proj = nn.Linear(p.hidden_dim, 3 * p.hidden_dim)
        self.out_proj = nn.Linear(p.hidden_dim, p.hidden_dim)

    def forward(self, x):  # (B, P, D)
        B, P, D = x.shape
        q, k, v = (t.view(B, P, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for t in self.qkv_proj(x).split(D, dim=-1))  # each (B, nh, P, hd)
        o = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        return self.out_proj(o.transpose(1, 2).reshape(B, P, D))


class MLP(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        self.fc1 = nn.Linear(p.hidden_dim, p.inter_dim)
        self.fc2 = nn.Linear(p.inter_dim, p.hidden_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ViTBlock(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        self.ln1 = nn.LayerNorm(p.hidden_dim, eps=p.ln_eps)
        self.attn = SelfAttention(p)
        self.ln2 = nn.LayerNorm(p.hidden_dim, eps=p.ln_eps)
        self.mlp = MLP(p)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, params: ViTParams):
        super().__init__()
        self.params = params
        self.patch_embedding = PatchEmbedding(params)
        self.blocks = nn.ModuleList(ViTBlock(params) for _ in range(params.n_layers))
        self.layer_norm = nn.LayerNorm(params.hidden_dim, eps=params.ln_eps)

    @property
    def patches_per_side(self) -> int:
        return self.params.img_size // self.params.patch_size

    @property
    def image_size(self) -> int:
        return self.params.img_size

    @property
    def tokens(self) -> int:
        """Tokens per image the VLM's projector takes (the patch grid)."""
        return self.patches_per_side ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, P, D); (B, N, 3, H, W) → (B, N, P, D); with cls_flag the cls row (B[, N], D)."""
        cameras = pixel_values.shape[:-3]  # (B,) or (B, N)
        x = self.patch_embedding(pixel_values.reshape(-1, *pixel_values.shape[-3:]))  # (B·N, P, D)
        for block in self.blocks:
            x = block(x)
        out = self.layer_norm(x[:, 0]) if self.params.cls_flag else self.layer_norm(x)
        return out.reshape(*cameras, *out.shape[1:])
