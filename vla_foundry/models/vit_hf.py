"""``vit_hf``: a timm vision transformer as the ``vlm``'s vision tower (format spec §6; keys ``vit.model.<timm keys>``).

Built inside the ``vlm``, never served alone. VLA Foundry builds the timm model by name with no classifier
(``num_classes=0``) and reads ``forward_intermediates(x)[0]``, which is ``forward_features``: every token after
the final norm, class and register tokens included (a class-token model then gives 1 + G² tokens per image, which
only an unshuffled projector takes). The weights always come from the checkpoint, never from a hub.
Shapes: B images, N cameras, T tokens per image, D width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ViTHF(nn.Module):
    def __init__(self, params):
        super().__init__()
        import timm

        if not params.hf_pretrained:
            raise ValueError("vit_hf needs `hf_pretrained`: a timm model name, e.g. vit_base_patch16_siglip_224")
        name = params.hf_pretrained
        if ":" in name:  # hf-hub:, local-dir:, … would make timm read a config from elsewhere (a hub) at build
            raise ValueError(f"vit_hf: `vit.hf_pretrained` is {name!r}; give a timm model name of timm's own list, "
                             "such as vit_base_patch16_siglip_224 (the weights come from the checkpoint)")
        kwargs = {"img_size": params.img_size} if params.img_size else {}
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except (RuntimeError, ValueError, TypeError, OSError) as e:
            raise ValueError(f"vit_hf: timm cannot build {name!r} ({e}); `vit.hf_pretrained` must be a timm model "
                             "name such as vit_base_patch16_siglip_224") from e
        if not hasattr(self.model, "patch_embed"):
            raise ValueError(f"vit_hf: {name} is a {type(self.model).__name__}, not a vision transformer with patch "
                             "tokens; `vit.hf_pretrained` must name a timm ViT")
        if self.model.num_features != params.hidden_dim:
            raise ValueError(f"vit_hf: {params.hf_pretrained} is {self.model.num_features} wide but `vit.hidden_dim` "
                             f"is {params.hidden_dim} (the projector's input width comes from it); set hidden_dim: "
                             f"{self.model.num_features}")
        height, width = self.model.patch_embed.img_size
        if height != width:
            raise ValueError(f"vit_hf: {params.hf_pretrained} takes {height}×{width} images; served: square ones")
        self.params = params
        self.image_size = height
        # Tokens per image: the patch grid and the prefix (class, register) tokens, all kept.
        self.tokens = self.model.patch_embed.num_patches + getattr(self.model, "num_prefix_tokens", 0)

    @property
    def patches_per_side(self) -> int:
        """The side of the square token grid, or 0 when prefix tokens make the count no square (then only an
        unshuffled projector takes it)."""
        side = math.isqrt(self.tokens)
        return side if side * side == self.tokens else 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, T, D); (B, N, 3, H, W) → (B, N, T, D)."""
        cameras = pixel_values.shape[:-3]
        out = self.model.forward_features(pixel_values.reshape(-1, *pixel_values.shape[-3:]))  # (B·N, T, D)
        return out.reshape(*cameras, *out.shape[1:])
