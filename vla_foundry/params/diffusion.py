"""Params of the diffusion models: ``unet`` and ``noise_scheduler`` (format spec §10–§11),
``stable_diffusion`` (§11.1) and ``diffusion_policy`` (§9.1)."""

from dataclasses import dataclass, field
from typing import Optional

from vla_foundry.params.model_params import ModelParams, nested, register_model_params


@register_model_params("unet")
@dataclass
class UNetParams(ModelParams):
    positive = ("in_channels", "out_channels", "time_emb_dim", "image_size")

    in_channels: int = 3
    out_channels: int = 3
    time_emb_dim: int = 256
    text_emb_dim: int = 512  # 0 ⇒ no text modules
    channels: list = field(default_factory=list)
    image_size: int = 128
    time_mlp_float32: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.channels, (list, tuple)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.channels):
            raise ValueError(f"`channels` must be a list of positive integers, one per resolution, e.g. "
                             f"[64, 128, 256]; got {self.channels!r}")


@register_model_params("noise_scheduler")
@dataclass
class NoiseSchedulerParams(ModelParams):
    positive = ("num_timesteps",)

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clamp_range: Optional[tuple] = (-1.5, 1.5)

    def __post_init__(self):
        super().__post_init__()
        # Dumped as a 2-element list; (low, high) or None.
        if self.clamp_range is not None:
            pair = self.clamp_range
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair) or pair[0] > pair[1]:
                raise ValueError(f"`clamp_range` must be two numbers [low, high] with low <= high, or null for no "
                                 f"clamp; got {pair!r}")
            self.clamp_range = (float(pair[0]), float(pair[1]))


@register_model_params("stable_diffusion")
@dataclass
class StableDiffusionParams(ModelParams):
    unet: Optional[ModelParams] = nested("unet", default_block={})
    noise_scheduler: Optional[ModelParams] = nested("noise_scheduler", default_block={})
    use_diffusers_unet: bool = False
    use_diffusers_scheduler: bool = False
    use_flow_matching_scheduler: bool = False
    clip: Optional[ModelParams] = nested("clip_hf", default_block={})
    do_classifier_free_guidance: bool = False
    guidance_scale: float = 4.0
    dropout_percent: float = 0.2


@register_model_params("diffusion_policy")
@dataclass
class DiffusionPolicyParams(ModelParams):
    # A block without `type` is a vlm_backbone; no block at all is a clip_backbone (spec §1.2).
    vision_language_backbone: Optional[ModelParams] = nested(
        "vlm_backbone", default_block={"type": "clip_backbone"})
    transformer: Optional[ModelParams] = nested("transformer", hf_type="transformer_hf", required=True)
    noise_scheduler: Optional[ModelParams] = nested("noise_scheduler", default_block={})
    use_flow_matching_scheduler: bool = False
    use_diffusers_scheduler: bool = False
    diffusion_step_conditioning: str = "concat"
    input_noise_std: float = 0.0
    num_action_head_repeats: Optional[int] = None
    action_dim: Optional[int] = None
    proprioception_dim: int = 0
