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


def _include_loader(including_file: Path, chain: tuple[Path, ...] = ()) -> type:
    """A SafeLoader that replaces each ``!include`` node by the included file's nodes while composing.

    Expanding at compose time (not at construction) is what makes a nested include resolve against
    the file that wrote it: the included file is composed by its own loader, whose folder is its own.
    ``<<: !include`` then needs nothing special: the merge key already sees a mapping node.
    ``chain``: the files being composed, outermost first (a file that includes itself, directly or not,
    is refused by name rather than recursing without end).
    """
    base_dir = including_file.parent
    chain = (*chain, including_file.resolve())

    class IncludeLoader(yaml.SafeLoader):
        def compose_scalar_node(self, anchor):
            node = super().compose_scalar_node(anchor)
            if node.tag != "!include":
                return node
            included = compose_include(node)
            if anchor is not None:  # an alias of this node means the included content
                self.anchors[anchor] = included
            return included

    def compose_include(node: yaml.ScalarNode) -> yaml.Node:
        path = (base_dir / node.value).resolve()
        if not path.is_file():
            raise CheckpointError(f"!include {node.value!r} in {including_file}: no such file {path} (the path is "
                                  f"relative to the including file's folder {base_dir}); fix the path or add the file")
        if path in chain:
            cycle = " → ".join(p.name for p in (*chain[chain.index(path):], path))
            raise CheckpointError(f"!include {node.value!r} in {including_file} includes a file that is being "
                                  f"included already ({cycle}); break the cycle")
        try:
            with open(path) as f:
                included = yaml.compose(f, Loader=_include_loader(path, chain))
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path} (included from {including_file}) is not valid YAML: {e}") from e
        if included is None:
            raise CheckpointError(f"!include {node.value!r} in {including_file}: {path} is empty; give it content "
                                  "or drop the include")
        return included

    return IncludeLoader


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_include_loader(path))
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
