"""Params of the CLIP encoders (format spec §7) and the policy backbones (§8)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vla_foundry.params.model_params import ModelParams, nested, register_model_params
from vla_foundry.params.vision import ViTParams

VLM_CONFIG_FILE = "vlm_config_model.yaml"  # the source VLM's config_model.yaml, published beside a policy's


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
    """§8.4: an HF image-text model; its last ``num_vlm_layers_to_use`` hidden states at the action token."""

    hf_pretrained: Optional[str] = None
    num_vlm_layers_to_use: int = 4


@register_model_params("vlm_foundry_backbone")
@dataclass
class VLMFoundryBackboneParams(ModelParams):
    """§8.4: our own ``vlm``, built from the source experiment's model config (``vlm``, read from the side file
    ``vlm_config_model.yaml`` beside the policy's config; see ``locate_side_file``)."""

    num_vlm_layers_to_use: int = 4
    vlm_experiment_dir: Optional[str] = None  # where the VLM was trained (a path on the training machine)
    vlm: Optional[ModelParams] = nested("vlm", side_file=VLM_CONFIG_FILE)

    def locate_side_file(self, name: str, experiment_dir: Path) -> Path:
        """(``name`` is ``vlm``, the one side-file block.) The source VLM's ``config_model.yaml``, looked for where
        VLA Foundry looks, in its order: in ``vlm_experiment_dir``, in the experiment of ``resume_from_checkpoint``
        (``<exp>/checkpoints/<file>``), then the copy published beside the policy (``vlm_config_model.yaml``).
        The first two name the training machine's paths, so only the places that exist here count."""
        candidates = []
        if self.vlm_experiment_dir:
            candidates.append(experiment_dir / self.vlm_experiment_dir / "config_model.yaml")
        if self.resume_from_checkpoint:
            candidates.append(experiment_dir / Path(self.resume_from_checkpoint).parent.parent / "config_model.yaml")
        candidates.append(experiment_dir / VLM_CONFIG_FILE)
        own = (experiment_dir / "config_model.yaml").resolve()  # (a pointer back into the policy's own experiment)
        found = next((c for c in candidates if c.is_file() and c.resolve() != own), None)
        if found is None:
            raise ValueError(f"vlm_foundry_backbone needs the source VLM's model config: looked for "
                             f"{', '.join(str(c) for c in candidates)}; publish it beside the policy's config as "
                             f"{VLM_CONFIG_FILE} (VLA Foundry's exporter does)")
        return found


@register_model_params("openclip_backbone")
@dataclass
class OpenClipBackboneParams(ClipOpenClipParams):
    """Beyond VLA Foundry: an OpenCLIP model (e.g. ``ViT-B-32``) conditioning a policy like ``clip_backbone``."""

    disable_text: bool = False
