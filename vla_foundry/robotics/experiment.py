"""Writing a policy experiment: the checkpoint plus the robotics side files a server reads
(``config_processor.yaml``, ``preprocessing_config.yaml``, ``config_normalizer.yaml``,
``stats.json``; format spec §1, §12). The demo pack and the tests use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from vla_foundry.checkpoint import save_experiment
from vla_foundry.robotics.robot_io import RobotIO, image_names_for


def normalizer_block(fields: list[str], *, method: str = "percentile_1_99", scope: str = "per_timestep",
                     past: int = 0, future: int = 0, epsilon: float = 1e-2, centered: bool = True) -> dict:
    """A ``config_normalizer.yaml`` normalizing ``fields`` (the stats window is ``past``/``future``)."""
    return {"enabled": True, "method": method, "scope": scope, "epsilon": epsilon, "centered_norm": centered,
            "include_fields": list(fields), "field_configs": {}, "lowdim_past_timesteps": past,
            "lowdim_future_timesteps": future}


def save_policy_experiment(model, experiment_dir: Union[str, Path], robot_io: RobotIO, stats: dict,
                           normalizer: dict, *, stats_window: Optional[tuple[int, int]] = None,
                           **save_kwargs: Any) -> Path:
    """``model`` as an experiment directory with its robot I/O; returns the weights file."""
    experiment_dir = Path(experiment_dir)
    r = robot_io
    past, future = stats_window or (r.past_steps, r.future_steps)
    data = {
        "type": "robotics", "camera_names": r.camera_names, "image_indices": r.image_indices,
        "image_names": r.image_names or image_names_for(r.camera_names, r.image_indices),
        "proprioception_fields": r.proprioception_fields, "action_fields": r.action_fields,
        "lowdim_past_timesteps": r.past_steps, "lowdim_future_timesteps": r.future_steps,
        "processor": r.processor, "processor_kwargs": r.processor_kwargs, "image_size": r.image_size,
        "max_text_seq_len": r.max_text_seq_len, "pad_missing_images": r.pad_missing_images,
        "mask_padded_images": r.mask_padded_images, "normalization": normalizer,
        "augmentation": {"enabled": r.crop_shape is not None,
                         "image": {"crop": {"enabled": r.crop_shape is not None, "mode": "center",
                                            "shape": r.crop_shape}}},
        "action_dim": r.action_dim, "proprioception_dim": r.proprioception_dim,
        "use_hf_fast_tokenizer": r.processor_loading.use_fast,
    }
    if r.processor_loading.image_seq_length:
        data["img_num_tokens"] = r.processor_loading.image_seq_length
    preprocessing = {"camera_names": r.camera_names, "image_indices": r.image_indices,
                     "past_lowdim_steps": past, "future_lowdim_steps": future,
                     "resize_images_size": r.resize_images_size, "image_resizing_method": r.image_resizing_method}
    training_config = {**(save_kwargs.pop("training_config", None) or {}), "data": data}
    file = save_experiment(model, experiment_dir, training_config=training_config, **save_kwargs)
    # (in the order given: the normalizer's field_configs are looked up in file order, spec §12.2)
    (experiment_dir / "config_processor.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (experiment_dir / "preprocessing_config.yaml").write_text(yaml.safe_dump(preprocessing, sort_keys=True))
    (experiment_dir / "config_normalizer.yaml").write_text(yaml.safe_dump(normalizer, sort_keys=False))
    (experiment_dir / "stats.json").write_text(json.dumps(stats))
    return file
