"""Policy backbones (format spec §8): images (+ instruction) → conditioning tokens (B, C, Dc).

Built inside ``diffusion_policy`` from its ``vision_language_backbone`` block, keyed by the
block's ``type``; never served alone, so they have their own registry. Keys live under
``vision_language_backbone._model.``. Each backbone also says how raw frames and prompts
become its inputs (``input_processor``) and whether it reads the instruction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vla_foundry.keyed_registry import KeyedRegistry
from vla_foundry.models.clip_hf import ClipHF, l2normalize
from vla_foundry.models.vit import ViT
from vla_foundry.robotics.processor import (HFProcessorLoading, InputProcessor, RawPixels, hf_processor,
                                          hf_tokenizer_text, text_pad_id)

BACKBONES: KeyedRegistry[type] = KeyedRegistry(
    "policy backbone", "Check `vision_language_backbone.type` in config_model.yaml.")


def register_backbone(backbone_type: str):
    return BACKBONES.register(backbone_type)


def create_backbone(params, load_pretrained: bool = True) -> nn.Module:
    """The backbone of ``params.type`` (a block without ``type`` is a ``vlm_backbone``, spec §1.2). The ones that
    run a whole VLM (§8.4) live in ``vlm_backbones.py``."""
    return BACKBONES.get(params.type)(params, load_pretrained=load_pretrained)


def list_backbones() -> list[str]:
    return BACKBONES.keys()


def _batch_size(input_ids: Optional[torch.Tensor], pixel_values: torch.Tensor) -> int:
    if input_ids is None:
        raise ValueError("the backbone needs input_ids to know the batch size (B = input_ids.shape[0])")
    B = input_ids.shape[0]
    if pixel_values.dim() == 4 and pixel_values.shape[0] % B:
        raise ValueError(f"{pixel_values.shape[0]} images do not split evenly over a batch of {B}")
    return B


@register_backbone("clip_backbone")
class ClipBackbone(nn.Module):
    """§8.1: the §7 CLIP wrapper; tokens ``[text_embeds, image_embeds…]`` (B, 1+N, Pd), or images only."""

    def __init__(self, params, load_pretrained: bool = True):
        super().__init__()
        self.params = params
        self._model = ClipHF(params, load_pretrained=load_pretrained)

    @property
    def output_dim(self) -> int:
        return self._model.embedding_dim

    @property
    def uses_language(self) -> bool:
        return not self.params.disable_text  # with disable_text the text tower still runs, unused

    @property
    def max_text_length(self) -> Optional[int]:
        return self._model.max_text_length

    def input_processor(self, processor: Optional[str], image_size: Optional[int] = None,
                        processor_kwargs: Optional[dict] = None,
                        loading: HFProcessorLoading = HFProcessorLoading()) -> InputProcessor:
        if processor in (None, "", "none"):
            text = hf_tokenizer_text(self._model.tokenizer)
            return InputProcessor(RawPixels(image_size), text, text_pad_id(self._model.tokenizer))
        return hf_processor(processor, processor_kwargs, loading)

    def forward(self, input_ids, pixel_values, attention_mask=None, attention_mask_images=None, **_) -> torch.Tensor:
        out = self._model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                          attention_mask_images=attention_mask_images)
        if self.params.disable_text:
            return out["image_embeds"]  # (B, N, Pd)
        return torch.cat([out["text_embeds"][:, None], out["image_embeds"]], dim=1)  # (B, 1+N, Pd)


@register_backbone("vit_backbone")
class ViTBackbone(nn.Module):
    """§8.2: our ViT over every image; patch tokens flattened camera-major (B, N·P, D). Text is ignored."""

    uses_language = False
    max_text_length = None

    def __init__(self, params, load_pretrained: bool = True):
        super().__init__()
        if params.cls_flag:
            raise ValueError("vit_backbone with cls_flag: true does not work in VLA Foundry (spec §8.2); "
                             "train with cls_flag: false")
        self.params = params
        self._model = ViT(params)

    @property
    def output_dim(self) -> int:
        return self.params.hidden_dim

    def input_processor(self, processor: Optional[str], image_size: Optional[int] = None,
                        processor_kwargs: Optional[dict] = None,
                        loading: HFProcessorLoading = HFProcessorLoading()) -> InputProcessor:
        if processor in (None, "", "none"):
            return InputProcessor(RawPixels(image_size or self.params.img_size), None)
        hf = hf_processor(processor, processor_kwargs, loading)
        return InputProcessor(hf.image_fn, None)

    def forward(self, input_ids, pixel_values, attention_mask=None, attention_mask_images=None, **_) -> torch.Tensor:
        if pixel_values.dim() == 4:
            B = _batch_size(input_ids, pixel_values)
            pixel_values = pixel_values.view(B, -1, *pixel_values.shape[1:])  # (B, N, 3, h, w)
        tokens = self._model(pixel_values)  # (B, N, P, D)
        return tokens.flatten(1, 2)  # (B, N·P, D)


@register_backbone("openclip_backbone")
class OpenClipBackbone(nn.Module):
    """Beyond VLA Foundry: an OpenCLIP model as ``clip_backbone`` uses CLIP: tokens
    ``[text projection, unit-length image embeddings…]`` (B, 1+N, D); keys ``_model.model.<open_clip keys>``."""

    def __init__(self, params, load_pretrained: bool = True):
        super().__init__()
        from vla_foundry.models.clip_openclip import ClipOpenClip

        self.params = params
        self._model = ClipOpenClip(params, load_pretrained=load_pretrained)

    @property
    def output_dim(self) -> int:
        return self._model.embedding_dim

    @property
    def uses_language(self) -> bool:
        return not self.params.disable_text

    @property
    def max_text_length(self) -> Optional[int]:
        return self._model.max_text_length

    def input_processor(self, processor: Optional[str], image_size: Optional[int] = None,
                        processor_kwargs: Optional[dict] = None,
                        loading: HFProcessorLoading = HFProcessorLoading()) -> InputProcessor:
        model = self._model

        def text_fn(prompts, max_length):
            ids = model.tokenize(list(prompts), max_length or model.max_text_length,
                                 field="observation.language_instruction")
            return ids, (ids != 0).long()

        image_fn = RawPixels(image_size) if processor == "none" else model.pixel_values
        return InputProcessor(image_fn, text_fn)

    def forward(self, input_ids, pixel_values, attention_mask=None, attention_mask_images=None, **_) -> torch.Tensor:
        B = _batch_size(input_ids, pixel_values)
        images = l2normalize(self._model.model.encode_image(pixel_values)).view(B, -1, self.output_dim)
        if attention_mask_images is not None:
            images = images * attention_mask_images[..., None].to(images.dtype)
        if self.params.disable_text:
            return images
        text = self._model.model.encode_text(input_ids)  # (B, D)
        return torch.cat([text[:, None], images], dim=1)
