"""``clip_openclip``: an OpenCLIP model (``open_clip.create_model``), keys ``model.<open_clip keys>``.

A standalone encoder (format spec §1.3): unit-length text and image embeddings with
open_clip's own tokenizer and preprocessing, which work offline. ``architecture`` is an
open_clip model name (e.g. ``ViT-B-32``) or a JSON model config file (relative to the
experiment, for custom sizes); ``pretrained`` a local weights file, or none (random init:
the checkpoint holds every weight).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vla_foundry.errors import InvalidInputError
from vla_foundry.models.clip_hf import l2normalize
from vla_foundry.models.registry import register_model
from vla_foundry.params.clip import ClipOpenClipParams


def model_name(architecture: str) -> str:
    """The open_clip name for ``architecture``; a JSON config file is registered with open_clip first."""
    import open_clip

    if architecture.endswith(".json"):
        path = Path(architecture)
        if not path.is_file():
            raise ValueError(f"clip_openclip architecture file {architecture!r} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if architecture not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {architecture!r}; e.g. ViT-B-32, ViT-B-16, or a JSON "
                         "model config file")
    return architecture


@register_model("clip_openclip")
class ClipOpenClip(nn.Module):
    modality = "encoder"

    def __init__(self, params: ClipOpenClipParams, load_pretrained: bool = True):
        super().__init__()
        import open_clip

        self.params = params
        name = model_name(params.architecture)
        pretrained = params.pretrained if load_pretrained else None
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        self._tokenizer = open_clip.get_tokenizer(name)

    @property
    def embedding_dim(self) -> int:
        return self.model.visual.output_dim

    @property
    def max_text_length(self) -> int:
        return self.model.context_length

    def tokenize(self, texts: list[str], max_length: int, field: str = "texts") -> torch.Tensor:
        """(B, context_length) ids. Texts longer than the context are refused (open_clip would cut them)."""
        limit = min(max_length, self.max_text_length)
        for i, text in enumerate(texts):
            length = len(self._tokenizer.encode(text)) + 2  # start and end tokens
            if length > limit:
                raise InvalidInputError(f"{field}[{i}] is {length} tokens long (with start/end tokens); this model "
                                        f"takes at most {limit}; shorten it", field=field)
        return self._tokenizer(list(texts))

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 arrays → (B, 3, S, S) through open_clip's preprocessing (resize, crop, normalize)."""
        from PIL import Image

        return torch.stack([self.preprocess(Image.fromarray(image)) for image in images])

    def forward(self, input_ids=None, pixel_values=None, **_):
        """The raw (unnormalized) projections: ``text_embeds`` (B, D) and ``image_embeds`` (B, 1, D)."""
        out = {}
        if input_ids is not None:
            out["text_embeds"] = self.model.encode_text(input_ids)
        if pixel_values is not None:
            out["image_embeds"] = l2normalize(self.model.encode_image(pixel_values))[:, None]
        return out

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.embed_token_ids(self.tokenize(list(texts), self.max_text_length))

    def embed_token_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unit-length text embeddings (B, D) of ``tokenize``'s ids."""
        return l2normalize(self.model.encode_text(input_ids.to(next(self.parameters()).device)))

    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        weight = next(self.parameters())
        return l2normalize(self.model.encode_image(self.pixel_values(images).to(weight.device, weight.dtype)))
