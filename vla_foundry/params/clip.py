"""Params of the CLIP encoders (format spec §7) and the policy backbones (§8)."""

from dataclasses import dataclass
from typing import Optional

from vla_foundry.params.model_params import ModelParams, register_model_params
from vla_foundry.params.vision import ViTParams


@register_model_params("clip_hf")
@dataclass
class ClipHFParams(ModelParams):
    hf_pretrained: Optional[str] = None
    freeze_text_encoder: bool = False
    freeze_image_encoder: bool = False


@register_model_params("clip_openclip")
@dataclass
class ClipOpenClipParams(ModelParams):
    architecture: str = "ViT-B-32"  # an open_clip model name, or a JSON model config file
    pretrained: Optional[str] = None  # a local weights file, or None for random weights


@register_model_params("clip_backbone")
@dataclass
class ClipBackboneParams(ClipHFParams):
    disable_text: bool = False


@register_model_params("vit_backbone")
@dataclass
class ViTBackboneParams(ViTParams):
    pass


@register_model_params("vlm_backbone")
@dataclass
class VLMBackboneParams(ModelParams):
    hf_pretrained: Optional[str] = None
    num_vlm_layers_to_use: int = 1


@register_model_params("vlm_foundry_backbone")
@dataclass
class VLMFoundryBackboneParams(VLMBackboneParams):
    pass


@register_model_params("openclip_backbone")
@dataclass
class OpenClipBackboneParams(ClipOpenClipParams):
    """Beyond VLA Foundry: an OpenCLIP model (e.g. ``ViT-B-32``) conditioning a policy like ``clip_backbone``."""

    disable_text: bool = False
