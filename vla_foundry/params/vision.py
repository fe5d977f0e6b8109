"""Params of the vision models: ``vit`` (ours, format spec §5), ``vit_hf`` (timm), ``vlm`` (§6), ``vlm_hf``."""

from dataclasses import dataclass
from typing import Optional

from vla_foundry.params.model_params import ModelParams, nested, register_model_params


@register_model_params("vit")
@dataclass
class ViTParams(ModelParams):
    positive = ("img_size", "patch_size", "hidden_dim", "inter_dim", "n_heads", "n_layers",
                "projector_pixel_shuffle_factor")

    img_size: int = 384
    patch_size: int = 16
    hidden_dim: int = 768
    inter_dim: int = 3072
    n_heads: int = 12
    n_layers: int = 12
    ln_eps: float = 1e-6
    dropout: float = 0.0
    cls_flag: bool = False
    projector_pixel_shuffle_factor: int = 1
    pretrained: Optional[str] = None
    interpolation_mode: str = "bicubic"


@register_model_params("vit_hf")
@dataclass
class ViTHFParams(ModelParams):
    positive = ("hidden_dim", "projector_pixel_shuffle_factor")

    hf_pretrained: Optional[str] = None  # a timm model name, e.g. vit_base_patch16_siglip_224
    hidden_dim: int = 768  # the model's width, which sizes the projector (VLA Foundry reads it from here)
    projector_pixel_shuffle_factor: int = 1
    img_size: Optional[int] = None  # not in VLA Foundry (the name sets it); where given, timm builds at this size


@register_model_params("vlm")
@dataclass
class VLMParams(ModelParams):
    vit: Optional[ModelParams] = nested("vit", hf_type="vit_hf", required=True)
    transformer: Optional[ModelParams] = nested("transformer", hf_type="transformer_hf", required=True)
    image_token_id: Optional[int] = None
    processor: Optional[str] = None  # the HF processor used in training; informational


@register_model_params("vlm_hf")
@dataclass
class VLMHFParams(ModelParams):
    # A Hugging Face image-text-to-text directory (or hub id).
    hf_pretrained: Optional[str] = None
    processor: Optional[str] = None
