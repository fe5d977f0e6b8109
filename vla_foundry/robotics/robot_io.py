"""What a policy expects from a robot: cameras, frames, fields, windows (format spec §8.3, §12.3).

Read from ``config_processor.yaml`` (else ``config.yaml``'s ``data:`` block) and
``preprocessing_config.yaml`` (entry 0 when it is keyed per dataset). Field widths come
from ``stats.json`` (``action_dim`` = Σ widths of the action fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from vla_foundry.config_files import read_training_config, read_yaml
from vla_foundry.errors import CheckpointError
from vla_foundry.robotics.processor import RESIZE_METHODS, HFProcessorLoading


def image_names_for(camera_names: list[str], image_indices: list[int]) -> list[str]:
    """Index outer, camera inner: ``camA_t-1, camB_t-1, camA_t0, camB_t0`` (spec §8.3)."""
    return [f"{cam}_t{idx}" for idx in image_indices for cam in camera_names]


@dataclass
class RobotIO:
    camera_names: list[str]
    image_indices: list[int]
    image_names: list[str]
    proprioception_fields: list[str]
    action_fields: list[str]
    field_dims: dict[str, int]
    past_steps: int  # P: lowdim_past_timesteps of the model window
    future_steps: int  # F
    processor: Optional[str] = None  # HF processor directory, or "none"
    processor_kwargs: dict = field(default_factory=dict)
    processor_loading: HFProcessorLoading = HFProcessorLoading()  # use_hf_fast_tokenizer, PaliGemma's img_num_tokens
    image_size: Optional[int] = None
    resize_images_size: Optional[list[int]] = None  # (H, W) of the training frames
    image_resizing_method: str = "center_crop"
    crop_shape: Optional[list[int]] = None  # augmentation crop, applied centred at inference
    max_text_seq_len: Optional[int] = None
    pad_missing_images: bool = False
    mask_padded_images: bool = False

    @property
    def action_steps(self) -> int:
        """Ta = P + 1 + F."""
        return self.past_steps + 1 + self.future_steps

    @property
    def action_dim(self) -> int:
        return sum(self.field_dims[f] for f in self.action_fields)

    @property
    def proprioception_dim(self) -> int:
        return sum(self.field_dims[f] for f in self.proprioception_fields)

    @classmethod
    def from_experiment(cls, experiment_dir: Union[str, Path], stats: dict) -> "RobotIO":
        experiment_dir = Path(experiment_dir)
        path = experiment_dir / "config_processor.yaml"
        data = read_yaml(path) if path.is_file() else (read_training_config(experiment_dir).get("data") or {})
        if not data:
            raise CheckpointError(f"{experiment_dir} has no config_processor.yaml (nor a `data:` block in config.yaml);"
                                  " a policy needs it to know its cameras and fields")
        prep_path = experiment_dir / "preprocessing_config.yaml"
        prep = (read_yaml(prep_path) or {}) if prep_path.is_file() else {}
        if 0 in prep or "0" in prep:  # keyed per dataset: use the first
            prep = prep.get(0, prep.get("0")) or {}
        cameras = list(data.get("camera_names") or prep.get("camera_names") or [])
        indices = [int(i) for i in (data.get("image_indices") or prep.get("image_indices") or [0])]
        if not cameras:
            raise CheckpointError(f"{path}: `camera_names` is empty; a policy needs at least one camera")
        names = list(data.get("image_names") or image_names_for(cameras, indices))
        proprio = list(data.get("proprioception_fields") or [])
        actions = list(data.get("action_fields") or [])
        if not actions:
            raise CheckpointError(f"{path}: `action_fields` is empty; the policy's actions need names")
        dims = {}
        for name in proprio + actions:
            entry = stats.get(name) or {}
            if "mean" not in entry:
                raise CheckpointError(f"stats.json has no statistics for {name!r}; its width cannot be known")
            dims[name] = len(entry["mean"])
        augmentation = data.get("augmentation") or {}
        image_aug = augmentation.get("image") or {}
        crop = (image_aug.get("crop") or image_aug.get("random_crop") or {}  # random_crop: the old name (§1.2)
                if augmentation.get("enabled", True) else {})
        expected_names = set(image_names_for(cameras, indices))
        if set(names) != expected_names or len(names) != len(expected_names):
            raise CheckpointError(f"{path}: image_names {names} do not match <camera>_t<index> for cameras {cameras} "
                                  f"and image indices {indices}")
        method = prep.get("image_resizing_method", "center_crop")
        if method not in RESIZE_METHODS:
            raise CheckpointError(f"{prep_path}: image_resizing_method {method!r} is unknown; one of "
                                  f"{', '.join(RESIZE_METHODS)}")
        resize = prep.get("resize_images_size")
        return cls(
            camera_names=cameras, image_indices=indices, image_names=names, proprioception_fields=proprio,
            action_fields=actions, field_dims=dims,
            past_steps=int(data.get("lowdim_past_timesteps", prep.get("past_lowdim_steps", 0))),
            future_steps=int(data.get("lowdim_future_timesteps", prep.get("future_lowdim_steps", 0))),
            processor=data.get("processor"), processor_kwargs=dict(data.get("processor_kwargs") or {}),
            processor_loading=HFProcessorLoading.from_data_config(data),
            image_size=data.get("image_size"), resize_images_size=list(resize) if resize else None,
            image_resizing_method=method,
            crop_shape=list(crop["shape"]) if crop.get("enabled") and crop.get("shape") else None,
            max_text_seq_len=data.get("max_text_seq_len"), pad_missing_images=bool(data.get("pad_missing_images")),
            mask_padded_images=bool(data.get("mask_padded_images")))
