"""Reading and writing VLA Foundry experiment directories (format spec §1–§2).

``load_model(path)`` picks the checkpoint (latest by natural sort, EMA when the run used
it), reads it without unpickling anything but tensors, strips wrapper prefixes, loads it
strictly into a model built from ``config_model.yaml`` through the registry, and only
then moves it to the device and dtype asked for. ``save_experiment`` writes the same
layout (the demo pack and the tests use it).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from vla_foundry.config_files import is_bare_hf_directory, read_model_config, read_training_config, read_yaml
from vla_foundry.errors import CheckpointError
from vla_foundry.params import ModelParams, parse_params

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP
CHECKPOINT_SUFFIXES = (".pt", ".safetensors")
BF16_PRECISIONS = ("amp_bf16", "amp_bfloat16", "pure_bf16")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class CheckpointInfo:
    experiment_dir: Path
    file: Path
    checkpoint_num: Optional[int]
    step: Optional[int]  # optimizer steps (global_step) when recorded
    ema: bool
    precision: Optional[str]  # hparams.precision of the training run

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.experiment_dir), "file": self.file.name, "step": self.step,
                "checkpoint_num": self.checkpoint_num, "ema": self.ema}


def natural_sort_key(path: Union[str, Path]) -> list:
    """``checkpoint_11`` > ``checkpoint_10`` > ``checkpoint_9`` (spec §1.1)."""
    parts = re.split(r"(\d+)", str(path).lower())
    return [int(p) if p.isdigit() else p for p in parts]


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    return DTYPES[dtype]


def _checkpoints_dir(path: Path) -> Path:
    return path if path.name == "checkpoints" else path / "checkpoints"


def checkpoint_file_path(experiment_dir: Union[str, Path], name: str) -> Path:
    """Where the weights file ``name`` of ``experiment_dir`` lies: in its ``checkpoints/`` folder."""
    return _checkpoints_dir(Path(experiment_dir)) / name


def find_checkpoint(experiment_dir: Union[str, Path], checkpoint: Union[None, int, str, Path] = None,
                    use_ema: Optional[bool] = None, training_config: Optional[dict] = None) -> tuple[Path, bool]:
    """The weights file to load and whether it holds EMA weights.

    ``checkpoint``: None ⇒ the latest ``checkpoint_<N>``; an int N; or a file name (inside
    ``checkpoints/``) or path. ``use_ema``: None ⇒ ``config.yaml``'s ``ema.enabled``.
    """
    experiment_dir = Path(experiment_dir)
    ckpt_dir = _checkpoints_dir(experiment_dir)
    if training_config is None:
        training_config = read_training_config(experiment_dir)
    if use_ema is None:
        use_ema = bool((training_config.get("ema") or {}).get("enabled", False))

    if checkpoint is None:
        candidates = [p for p in ckpt_dir.glob("checkpoint_*") if p.suffix in CHECKPOINT_SUFFIXES]
        if not candidates:
            raise CheckpointError(
                f"no checkpoint_<N>.pt (or .safetensors) in {ckpt_dir}. Point the deployment at a VLA Foundry "
                "experiment directory that holds checkpoints/, or name the file with `checkpoint_file`.")
        chosen = max(candidates, key=natural_sort_key)
    elif isinstance(checkpoint, int):
        chosen = ckpt_dir / f"checkpoint_{checkpoint}.pt"
        if not chosen.is_file() and chosen.with_suffix(".safetensors").is_file():
            chosen = chosen.with_suffix(".safetensors")
    else:
        chosen = Path(checkpoint)
        if not chosen.is_absolute():
            # A name inside checkpoints/ first (a file of that name where the server runs belongs to another
            # run); a relative path to elsewhere only when checkpoints/ has no such file.
            inside = ckpt_dir / chosen
            chosen = inside if inside.is_file() or not chosen.is_file() else chosen
    if not chosen.is_file():
        available = sorted((p.name for p in ckpt_dir.glob("*") if p.suffix in CHECKPOINT_SUFFIXES),
                           key=natural_sort_key)
        raise CheckpointError(f"checkpoint file {chosen} does not exist. Available in {ckpt_dir}: "
                              f"{', '.join(available) or '(none)'}")

    is_ema = chosen.name.startswith("ema_")
    if use_ema and not is_ema:
        ema_file = chosen.with_name("ema_" + chosen.name[len("checkpoint_"):])
        if not ema_file.is_file():
            raise CheckpointError(
                f"this experiment was trained with EMA enabled but {ema_file.name} is missing next to "
                f"{chosen.name}. Publish the EMA file, or load the raw weights with use_ema=False.")
        chosen, is_ema = ema_file, True
    return chosen, is_ema


def read_checkpoint_file(path: Union[str, Path]) -> dict[str, Any]:
    """A checkpoint file's payload. Only tensors and plain containers are ever deserialised."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        key = "ema_state_dict" if path.name.startswith("ema_") else "state_dict"
        payload: dict[str, Any] = {key: tensors}
        for name in ("checkpoint_num", "global_step"):
            if metadata.get(name, "").isdigit():
                payload[name] = int(metadata[name])
        return payload
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (a raw pickle, a legacy torch file, or a damaged one). Only "
            "torch.save zip files (read weights-only) and .safetensors are loaded; nothing else is unpickled.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":  # the weights-only unpickler refused a Python object
            # Not torch's text: it suggests weights_only=False, which this server never does.
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects, not only tensors, and unpickling can "
                "run arbitrary code. Re-save it as {'state_dict': model.state_dict(), ...} or as .safetensors."
            ) from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}; expected a dict with 'state_dict'")
    return payload


def _global_step_of(path: Path) -> Optional[int]:
    """``global_step`` recorded in a checkpoint file, read without loading its weights; None when absent."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # the header only
                value = (f.metadata() or {}).get("global_step", "")
            return int(value) if value.isdigit() else None
        if not zipfile.is_zipfile(path):
            return None
        # mmap: the tensors stay on disk; only the small pickled dict is read.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the step is only reported: a damaged file must not stop the EMA load
        logger.warning("could not read global_step from %s (%s: %s)", path, type(e).__name__, e)
        return None
    value = payload.get("global_step") if isinstance(payload, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def training_step(payload: dict[str, Any], file: Path, is_ema: bool) -> Optional[int]:
    """The optimizer step (``global_step``) the weights were saved at, or None when not recorded.

    ``ema_<N>`` files record only ``ema_optimization_step``, which is not the training step (it is 0 for
    "vanilla" EMA, spec §2.2), and N counts saves, not steps (§1.1, §2.1). The EMA weights were saved with
    ``checkpoint_<N>``, so their step is that file's ``global_step``.
    """
    step = payload.get("global_step")
    if step is not None or not is_ema:
        return step
    raw = file.with_name("checkpoint_" + file.name[len("ema_"):])
    for candidate in (raw, raw.with_suffix(".safetensors" if raw.suffix == ".pt" else ".pt")):
        if candidate.is_file():
            return _global_step_of(candidate)
    return None


def state_dict_from_payload(payload: dict[str, Any], path: Path, ema: bool) -> dict[str, torch.Tensor]:
    key = "ema_state_dict" if ema else "state_dict"
    if key in payload:
        state_dict = payload[key]
        if not isinstance(state_dict, dict):
            raise CheckpointError(
                f"{path}: {key!r} is a {type(state_dict).__name__}, not a mapping of parameter names to tensors. "
                f"Re-save it as {{{key!r}: model.state_dict(), ...}}.")
    elif all(isinstance(v, torch.Tensor) for v in payload.values()) and payload:
        state_dict = payload  # a bare state dict (torch.save(model.state_dict()))
    else:
        raise CheckpointError(f"{path} has no {key!r}; its keys are {sorted(payload)[:10]}")
    return strip_wrapper_prefixes(state_dict, f"{path} ({key!r})")


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor], source: str = "the state dict"
                           ) -> dict[str, torch.Tensor]:
    """Remove ``_orig_mod.`` / ``module.`` while the first key carries one (spec §2.3)."""
    bad = [k for k in state_dict if not isinstance(k, str)][:3]
    if bad:  # the prefix test below needs string keys
        raise CheckpointError(f"{source} has keys that are not parameter names: {bad!r} (keys must be strings like "
                              "'layers.0.attention.in_proj.weight'). Re-save it with model.state_dict().")
    while state_dict:
        first = next(iter(state_dict))
        prefix = next((p for p in WRAPPER_PREFIXES if first.startswith(p)), None)
        if prefix is None:
            break
        state_dict = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    return state_dict


def _tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """For each name of a tensor the model holds under several names (weight tying), all its names."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_by_tensor.setdefault(id(tensor), []).append(name)
    return {name: names for names in names_by_tensor.values() if len(names) > 1 for name in names}


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load whose error lists missing, unexpected and mis-shaped keys.

    A tied tensor stored under only one of its names counts as present under all of them:
    ``safetensors.torch.save_model`` keeps one name per shared tensor (the ``.pt`` files keep both).
    """
    adapt = getattr(model, "adapt_to_checkpoint_keys", None)
    if adapt is not None:  # optional modules of our own that only some checkpoints carry (see the model)
        adapt(state_dict.keys())
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: the state dict's value for {not_tensors[0]!r} is a "
                              f"{type(state_dict[not_tensors[0]]).__name__}, not a tensor; the file is not a "
                              "VLA Foundry checkpoint, or it is damaged")
    expected = model.state_dict()
    tied = _tied_names(model)
    for names in {tuple(names) for names in tied.values()}:  # a tied tensor saved twice holds one value twice
        present = [n for n in names if n in state_dict]
        differing = [n for n in present[1:] if not torch.equal(state_dict[n], state_dict[present[0]])]
        if differing:  # (the reference's load would keep the last silently: the config is not the training's)
            raise CheckpointError(f"{source}: {present[0]} and {differing[0]} are one tensor in the model built from "
                                  "its config (weight tying) but differ in the checkpoint; check `weight_tying` in "
                                  "config_model.yaml")
    aliases = {k: next(a for a in tied[k] if a in state_dict) for k in expected
               if k not in state_dict and any(a in state_dict for a in tied.get(k, ()))}
    if aliases:
        state_dict = {**state_dict, **{k: state_dict[a] for k, a in aliases.items()}}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        def listing(name, keys):
            more = f" (+{len(keys) - 12} more)" if len(keys) > 12 else ""
            return f"{name} ({len(keys)}): {', '.join(keys[:12])}{more}"

        parts = [listing(n, k) for n, k in (("missing", missing), ("unexpected", unexpected),
                                            ("shape mismatch", mis_shaped)) if k]
        raise CheckpointError(f"{source} does not match the model built from its config; " + "; ".join(parts)
                              + ". Check that config_model.yaml belongs to these weights.")
    # load_state_dict copies into the fp32 parameters, so bf16 weights are upcast exactly (spec §2.4).
    model.load_state_dict(state_dict, strict=True)


def resolve_local_paths(params: ModelParams, base_dir: Path) -> None:
    """Point relative ``hf_pretrained`` paths at the experiment directory when they exist there (spec §1.2)."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, ModelParams):
            resolve_local_paths(value, base_dir)
        elif f.name in ("hf_pretrained", "pretrained", "architecture") and isinstance(value, str) and value:
            candidate = base_dir / value
            if not Path(value).is_absolute() and candidate.exists():
                setattr(params, f.name, str(candidate.resolve()))


def side_file_fields(params: ModelParams) -> list[tuple[ModelParams, dataclasses.Field]]:
    """Every (block, field) in ``params``' tree whose nested block lives in a file of its own (``nested(...,
    side_file=...)``), outermost first."""
    found = []
    for f in dataclasses.fields(params):
        if f.metadata.get("side_file"):
            found.append((params, f))
        value = getattr(params, f.name)
        if isinstance(value, ModelParams):
            found.extend(side_file_fields(value))
    return found


def load_side_configs(params: ModelParams, experiment_dir: Path, _read: tuple[Path, ...] = ()) -> None:
    """Fill in the blocks that live in side files (a ``vlm_foundry_backbone``'s source VLM config, spec §8.4), each
    read from where its block locates it, relative paths in it resolved against that file's folder. A file that
    leads back to one being read is refused (a loop of experiments pointing at each other)."""
    for block, f in side_file_fields(params):
        if getattr(block, f.name) is not None:  # given inline (a config built in code, or an inline block)
            continue
        path = block.locate_side_file(f.name, experiment_dir).resolve()
        if path in _read:
            raise ValueError(f"{path} leads back to itself through `{f.name}` side files; check "
                             "vlm_experiment_dir and resume_from_checkpoint in the configs")
        try:
            side = parse_params(read_yaml(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        resolve_local_paths(side, path.parent)
        load_side_configs(side, path.parent, (*_read, path))
        setattr(block, f.name, side)


def load_params(experiment_dir: Union[str, Path], training_config: Optional[dict] = None) -> ModelParams:
    experiment_dir = Path(experiment_dir)
    params = parse_params(read_model_config(experiment_dir, training_config))
    resolve_local_paths(params, experiment_dir)
    load_side_configs(params, experiment_dir)
    return params


def load_model(path: Union[str, Path], checkpoint: Union[None, int, str, Path] = None,
               use_ema: Optional[bool] = None, device: Union[str, torch.device] = "cpu",
               dtype: Union[None, str, torch.dtype] = None) -> torch.nn.Module:
    """Load a VLA Foundry experiment directory; the model comes back in eval mode.

    ``model.params`` holds its params and ``model.checkpoint`` a :class:`CheckpointInfo`.
    The model is built and loaded on CPU in float32, then moved to ``device``/``dtype`` once. ``dtype="auto"``
    picks as the server does (``devices.resolve_model_dtype``): bfloat16 on CUDA for a run trained in bf16, else
    float32; None keeps float32.
    """
    from vla_foundry.models import create_model  # registers every type

    experiment_dir = Path(path)
    if experiment_dir.is_file():  # a weights file inside <experiment>/checkpoints/
        checkpoint, experiment_dir = experiment_dir, experiment_dir.parent.parent
    elif experiment_dir.name == "checkpoints":
        experiment_dir = experiment_dir.parent
    if not experiment_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {experiment_dir} does not exist")
    torch_dtype = resolve_dtype(dtype)
    training_config = read_training_config(experiment_dir)
    precision = (training_config.get("hparams") or {}).get("precision")
    if dtype == "auto":
        from vla_foundry.devices import resolve_model_dtype  # (devices imports this module)

        torch_dtype = resolve_model_dtype(dtype, torch.device(device), precision)
    params = load_params(experiment_dir, training_config)
    if is_bare_hf_directory(experiment_dir):  # the HF directory's own weights are the checkpoint
        if checkpoint is not None:
            raise CheckpointError(f"{experiment_dir} is a Hugging Face model directory with one set of weights; "
                                  f"drop the checkpoint file choice ({checkpoint!r})")
        model = create_model(params, load_pretrained=True)
        file = next(iter(sorted(experiment_dir.glob("*.safetensors"))), experiment_dir / "config.json")
        payload, is_ema = {}, False
    else:
        file, is_ema = find_checkpoint(experiment_dir, checkpoint, use_ema, training_config)
        payload = read_checkpoint_file(file)
        state_dict = state_dict_from_payload(payload, file, is_ema)
        model = create_model(params, load_pretrained=False)
        load_state_dict_strict(model, state_dict, str(file))
    model.params = params
    model.checkpoint = CheckpointInfo(
        experiment_dir=experiment_dir.resolve(), file=file.resolve(),
        checkpoint_num=payload.get("checkpoint_num"),
        step=training_step(payload, file, is_ema), ema=is_ema,
        precision=precision)
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    logger.info("loaded %s (%s) from %s on %s", params.type, "EMA" if is_ema else "raw", file, device)
    return model


def save_experiment(model: torch.nn.Module, experiment_dir: Union[str, Path], *, checkpoint_num: int = 1,
                    global_step: int = 0, ema_state_dict: Optional[dict] = None, precision: str = "fp32",
                    training_config: Optional[dict] = None, tokenizer: Any = None,
                    fmt: str = "pt") -> Path:
    """Write ``model`` as a VLA Foundry experiment directory; returns the weights file.

    ``training_config`` adds blocks to ``config.yaml`` (e.g. ``data``); the ``model``,
    ``ema`` and ``hparams.precision`` blocks are written from the arguments.
    """
    experiment_dir = Path(experiment_dir)
    ckpt_dir = experiment_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model_config = model.params.to_dict()
    config = dict(training_config or {})
    config["model"] = model_config
    config["ema"] = {**config.get("ema", {}), "enabled": ema_state_dict is not None}
    config["hparams"] = {**config.get("hparams", {}), "precision": precision}
    (experiment_dir / "config_model.yaml").write_text(yaml.safe_dump(model_config, sort_keys=True))
    for block, f in side_file_fields(model.params):  # e.g. vlm_config_model.yaml, as VLA Foundry's exporter writes
        if getattr(block, f.name) is not None:
            side = experiment_dir / f.metadata["side_file"]
            side.write_text(yaml.safe_dump(getattr(block, f.name).to_dict(), sort_keys=True))
    # (in the order given: a policy's data block holds its normalizer's field_configs, looked up in file order)
    (experiment_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        meta = {"checkpoint_num": str(checkpoint_num), "global_step": str(global_step)}
        # safetensors refuses shared storage (tied weights): store independent copies.
        file = ckpt_dir / f"checkpoint_{checkpoint_num}.safetensors"
        save_file({k: v.clone() for k, v in state_dict.items()}, str(file), metadata=meta)
        if ema_state_dict is not None:
            save_file({k: v.detach().cpu().clone() for k, v in ema_state_dict.items()},
                      str(ckpt_dir / f"ema_{checkpoint_num}.safetensors"), metadata=meta)
    elif fmt == "pt":
        file = ckpt_dir / f"checkpoint_{checkpoint_num}.pt"
        torch.save({"checkpoint_num": checkpoint_num, "state_dict": state_dict, "global_step": global_step,
                    "samples_seen": 0}, file)
        if ema_state_dict is not None:
            torch.save({"checkpoint_num": checkpoint_num, "ema_state_dict": ema_state_dict,
                        "ema_optimization_step": 0}, ckpt_dir / f"ema_{checkpoint_num}.pt")
    else:
        raise ValueError(f"fmt must be 'pt' or 'safetensors'; got {fmt!r}")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(experiment_dir / "tokenizer"))
    return file

