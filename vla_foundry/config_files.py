"""Reading an experiment's YAML files as plain mappings (format spec §1.2).

``config.yaml`` is read as data only: nothing in it is validated or acted on beyond the
blocks a server needs (``model``, ``ema``, ``hparams.precision``, ``data.tokenizer``), so
training-time paths that do not exist here do no harm. Hand-written configs may use
``!include file.yaml`` and ``<<: !include file.yaml`` relative to the including file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from vla_foundry.errors import CheckpointError


def _include_loader(base_dir: Path) -> type:
    class IncludeLoader(yaml.SafeLoader):
        pass

    def compose_include(node: yaml.Node) -> yaml.Node:
        path = (base_dir / node.value).resolve()
        if not path.is_file():
            raise CheckpointError(f"!include {node.value!r} in a config under {base_dir}: no such file {path}")
        with open(path) as f:
            return yaml.compose(f, Loader=_include_loader(path.parent))

    def flatten_mapping(self, node):
        # `<<: !include x.yaml` — swap the tagged scalar for the included mapping before merging.
        for i, (key, value) in enumerate(node.value):
            if key.tag == "tag:yaml.org,2002:merge" and value.tag == "!include":
                node.value[i] = (key, compose_include(value))
        return yaml.SafeLoader.flatten_mapping(self, node)

    def construct_include(loader, node):
        return loader.construct_object(compose_include(node), deep=True)

    IncludeLoader.flatten_mapping = flatten_mapping
    IncludeLoader.add_constructor("!include", construct_include)
    return IncludeLoader


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_include_loader(path.parent))
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from e


def read_training_config(experiment_dir: str | Path) -> dict:
    """``config.yaml`` as a mapping, or {} when the experiment has none."""
    path = Path(experiment_dir) / "config.yaml"
    if not path.is_file():
        return {}
    config = read_yaml(path) or {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a mapping; got {type(config).__name__}")
    return config


def is_bare_hf_directory(path: str | Path) -> bool:
    """A Hugging Face model directory (``config.json``) that is not a VLA Foundry experiment."""
    path = Path(path)
    return ((path / "config.json").is_file() and not (path / "config_model.yaml").is_file()
            and not (path / "checkpoints").is_dir())


def bare_hf_model_config(path: str | Path) -> dict:
    """The model block a bare HF directory stands for: ``vlm_hf`` when it has a vision tower, else
    ``transformer_hf``; its own weights are the checkpoint."""
    path = Path(path)
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not readable JSON ({e})") from e
    model_type = "vlm_hf" if isinstance(hf_config, dict) and "vision_config" in hf_config else "transformer_hf"
    return {"type": model_type, "hf_pretrained": str(path.resolve())}


def read_model_config(experiment_dir: str | Path, training_config: Optional[dict] = None) -> dict:
    """The model block: ``config_model.yaml``, else ``config.yaml``'s ``model:``."""
    experiment_dir = Path(experiment_dir)
    path = experiment_dir / "config_model.yaml"
    if path.is_file():
        config = read_yaml(path)
        source = str(path)
    else:
        training_config = read_training_config(experiment_dir) if training_config is None else training_config
        config = training_config.get("model")
        source = f"{experiment_dir / 'config.yaml'} (model:)"
        if config is None and is_bare_hf_directory(experiment_dir):
            return bare_hf_model_config(experiment_dir)
        if config is None:
            raise CheckpointError(
                f"{experiment_dir} has no model config: expected config_model.yaml, or config.yaml with a "
                "`model:` block. Point the deployment at a VLA Foundry experiment directory.")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} must hold a mapping; got {type(config).__name__}")
    return config
