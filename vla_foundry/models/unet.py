"""``unet``: VLA Foundry's pixel-space UNet with time and (optional) text conditioning (format spec §11.2).

Reads top to bottom: timestep embedding, resnet block, self- and cross-attention, the
block container, then the UNet. Built inside ``stable_diffusion``, never served alone.
Shapes: B batch, C channels, H×W pixels, E = 4·time_emb_dim, S text tokens, Dt text width.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vla_foundry.models.precision import Float32Buffers
from vla_foundry.params.diffusion import UNetParams

GROUPS = 8


class SinusoidalEmbedding(Float32Buffers):
    """t (B,) → (B, dim): concat(sin(t·f), cos(t·f)), f_j = exp(−j·ln(10000)/(half − 1)); ``emb`` is used as loaded."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"time_emb_dim must be even and >= 4; got {dim}")
        half = dim // 2
        frequencies = torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1))
        self.register_buffer("emb", torch.exp(frequencies))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        e = t.float()[:, None] * self.emb.float()[None, :]  # (B, half)
        return torch.cat([e.sin(), e.cos()], dim=-1)  # sin first


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_dim: int, text_dim: int):
        super().__init__()
        self.time_mlp = nn.Linear(time_dim, c_out)
        if text_dim > 0:
            self.text_mlp = nn.Linear(text_dim, c_out)
        self.block1 = nn.Sequential(nn.GroupNorm(GROUPS, c_in), nn.SiLU(), conv3x3(c_in, c_out))
        self.block2 = nn.Sequential(nn.GroupNorm(GROUPS, c_out), nn.SiLU(), conv3x3(c_out, c_out))
        if c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, temb, pooled_text=None):  # x (B, C_in, H, W), temb (B, E), pooled_text (B, Dt)
        h = self.block1(x) + self.time_mlp(temb)[:, :, None, None]  # no activation before the time MLP
        if pooled_text is not None and hasattr(self, "text_mlp"):
            h = h + self.text_mlp(pooled_text)[:, :, None, None]
        h = self.block2(h)
        return h + (self.shortcut(x) if hasattr(self, "shortcut") else x)


class SelfAttention(nn.Module):
    """Single-head attention over the pixels (row-major), residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, H·W, C)
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        return x + self.proj_out(o.transpose(1, 2).reshape(B, C, H, W))


class CrossAttention(nn.Module):
    """Pixels attend to the text tokens (no text padding mask, as in VLA Foundry), residual."""

    def __init__(self, c: int, text_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Linear(text_dim, c)
        self.v = nn.Linear(text_dim, c)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x, context):  # x (B, C, H, W), context (B, S, Dt)
        B, C, H, W = x.shape
        q = self.q(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H·W, C)
        o = F.scaled_dot_product_attention(q, self.k(context), self.v(context))  # (B, H·W, C)
        return x + self.proj_out(o.transpose(1, 2).reshape(B, C, H, W))


class UNetLevel(nn.ModuleDict):
    """Keys ``0``/``1`` (resnet blocks), ``2`` (self-attention) and ``3`` (cross-attention) when present."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, text_dim: int, self_attention: bool,
                 cross_attention: bool):
        super().__init__()
        self["0"] = ResnetBlock(c_in, c_out, time_dim, text_dim)
        self["1"] = ResnetBlock(c_out, c_out, time_dim, text_dim)
        if self_attention:
            self["2"] = SelfAttention(c_out)
        if cross_attention:
            self["3"] = CrossAttention(c_out, text_dim)

    def forward(self, x, temb, context=None, pooled=None):
        x = self["1"](self["0"](x, temb, pooled), temb, pooled)
        if "2" in self:
            x = self["2"](x)
        if "3" in self and context is not None:
            x = self["3"](x, context)
        return x


class UNet(nn.Module):
    def __init__(self, params: UNetParams):
        super().__init__()
        self.params = params
        channels = list(params.channels)
        if not channels:
            raise ValueError("unet.channels must be given, e.g. [64, 128, 256]")
        bad = [c for c in channels if c % GROUPS]
        if bad:
            raise ValueError(f"every unet channel count must be divisible by {GROUPS} (GroupNorm); got {bad}")
        d, t = params.time_emb_dim, params.text_emb_dim
        E = 4 * d
        L = len(channels)
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, E), nn.SiLU(), nn.Linear(E, E))
        self.init_conv = conv3x3(params.in_channels, channels[0])
        self.down_blocks = nn.ModuleList(
            UNetLevel(channels[max(i - 1, 0)], channels[i], E, t, i >= 2, i >= 1 and t > 0) for i in range(L))
        self.down_samples = nn.ModuleList(conv3x3(channels[i], channels[i], stride=2) for i in range(L - 1))
        c = channels[-1]
        self.mid_block1 = ResnetBlock(c, c, E, t)
        self.mid_attn = SelfAttention(c)
        if t > 0:
            self.mid_cross_attn = CrossAttention(c, t)
        self.mid_block2 = ResnetBlock(c, c, E, t)
        up = [channels[L - 1 - j] for j in range(L)]  # u_j
        self.up_blocks = nn.ModuleList(
            UNetLevel(up[j] if j == 0 else up[j] + channels[L - j], up[j], E, t, L - 1 - j >= 2,
                      L - 1 - j >= 1 and t > 0) for j in range(L))
        self.up_samples = nn.ModuleList(nn.ConvTranspose2d(up[j], up[j], 4, stride=2, padding=1) for j in range(L - 1))
        self.final_conv = nn.Sequential(nn.GroupNorm(GROUPS, channels[0]), nn.SiLU(),
                                        conv3x3(channels[0], params.out_channels))

    def forward(self, x: torch.Tensor, timesteps, text_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W), timesteps: int, 0-d or (B,) tensor; text_embeddings (B, S, Dt) or None → (B, C_out, H, W)."""
        B = x.shape[0]
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.full((B,), timesteps, dtype=torch.long, device=x.device)
        elif timesteps.dim() == 0:
            timesteps = timesteps.expand(B)
        emb = self.time_mlp[0](timesteps.to(x.device))  # (B, d) float32, from float32 frequencies
        temb = self.time_mlp[1:](emb.to(self.time_mlp[1].weight.dtype)).to(x.dtype)  # (B, E)
        context = text_embeddings.to(x.dtype) if text_embeddings is not None else None
        pooled = context.max(dim=1).values if context is not None else None  # (B, Dt)
        x = self.init_conv(x)
        skips = []
        for i, level in enumerate(self.down_blocks):
            x = level(x, temb, context, pooled)
            if i < len(self.down_samples):
                skips.append(x)
                x = self.down_samples[i](x)
        x = self.mid_block1(x, temb, pooled)
        x = self.mid_attn(x)
        if context is not None and hasattr(self, "mid_cross_attn"):
            x = self.mid_cross_attn(x, context)
        x = self.mid_block2(x, temb, pooled)
        for j, level in enumerate(self.up_blocks):
            if j > 0:
                x = torch.cat([x, skips.pop()], dim=1)  # current features first, then the skip
            x = level(x, temb, context, pooled)
            if j < len(self.up_samples):
                x = self.up_samples[j](x)
        return self.final_conv(x)


class DiffusersUNet(nn.Module):
    """``use_diffusers_unet``: diffusers' ``UNet2DModel`` as VLA Foundry fixes it (6 levels, 128…512 channels),
    keys ``unet.model.*``, no text input (spec §11.2).

    That is what it builds, CLIP or not: it is what VLA Foundry trains and saves. Checkpoints written
    by earlier versions of this server for a text-conditioned model carry one extra projection,
    ``unet.text_proj.*``: ``add_text_proj`` adds it (the checkpoint loader does so when those keys are
    present), and then a prompt is taken — its max-pooled text embedding, projected, is added to the
    time embedding through diffusers' identity class embedding.
    """

    TIME_EMBED_DIM = 4 * 128  # UNet2DModel's time embedding width: 4 × block_out_channels[0]

    def __init__(self, params: UNetParams):
        super().__init__()
        from diffusers import UNet2DModel

        self.params = params
        self.model = UNet2DModel(
            sample_size=params.image_size, in_channels=params.in_channels, out_channels=params.out_channels,
            layers_per_block=2, block_out_channels=(128, 128, 256, 256, 512, 512),
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"))

    @property
    def takes_text(self) -> bool:
        return hasattr(self, "text_proj")

    def add_text_proj(self, text_dim: int) -> None:
        """Our text extension: ``text_proj`` (Linear(text_dim → 4·128)) feeding the class embedding."""
        weight = next(self.model.parameters())
        self.model.class_embedding = nn.Identity()  # what class_embed_type="identity" builds; no keys
        self.text_proj = nn.Linear(text_dim, self.TIME_EMBED_DIM).to(weight.device, weight.dtype)

    def forward(self, x, timesteps, text_embeddings=None):
        class_labels = None
        if text_embeddings is not None:
            if not self.takes_text:
                raise ValueError("this diffusers UNet (use_diffusers_unet) takes no text, as in VLA Foundry; "
                                 "drop the prompt")
            class_labels = self.text_proj(text_embeddings.max(dim=1).values.to(x.dtype))  # (B, 4·128)
        elif self.takes_text:
            # Unconditional samples of a text model: the projection of an all-zero text.
            class_labels = self.text_proj.bias.expand(x.shape[0], -1)
        return self.model(x, timesteps, class_labels=class_labels).sample
