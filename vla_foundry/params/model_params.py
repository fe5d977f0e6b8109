"""Model params: one dataclass per config ``type``, parsed from VLA Foundry's YAML dumps.

Parsing follows the reference (format spec §1.2): the block's ``type`` picks the class,
nested blocks pick theirs by their own ``type`` (with the spec's fallbacks when it is
absent), missing keys take the defaults, and unknown keys are ignored with a single
warning that names all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from vla_foundry.keyed_registry import KeyedRegistry

logger = logging.getLogger(__name__)

PARAMS: KeyedRegistry[type] = KeyedRegistry("params type", "Check the config's `type:` value.",
                                             key_attribute="type_key")


def register_model_params(model_type: str):
    """Class decorator keying a params class by the config ``type`` it parses."""
    return PARAMS.register(model_type)


def get_params_class(model_type: str) -> type["ModelParams"]:
    return PARAMS.get(model_type)


def list_registered_params() -> list[str]:
    return PARAMS.keys()


@dataclass(frozen=True)
class NestedBlock:
    """How a nested block picks its params class when its ``type`` is absent."""

    default_type: str
    hf_type: Optional[str] = None  # chosen instead when the block has ``hf_pretrained``

    def type_for(self, block: dict) -> str:
        if block.get("type"):
            return block["type"]
        if self.hf_type and block.get("hf_pretrained"):
            return self.hf_type
        return self.default_type


def nested(default_type: str, *, hf_type: Optional[str] = None, default_block: Optional[dict] = None,
           required: bool = False, side_file: Optional[str] = None):
    """A field holding nested params. Absent ⇒ ``default_block`` (parsed), or None.

    ``side_file``: the block lives in a file of its own beside the config (the loader reads it, see
    ``checkpoint.load_side_configs``); ``to_dict`` leaves it out, as VLA Foundry's dump does."""
    spec = NestedBlock(default_type, hf_type)
    meta = {"nested": spec, "required": required, "side_file": side_file}
    if default_block is None:
        return field(default=None, metadata=meta)
    return field(default_factory=lambda: parse_params(dict(default_block), _default_type=default_type),
                 metadata=meta)


@dataclass
class ModelParams:
    """Fields every model block carries; none of them affects inference."""

    type_key: ClassVar[str] = ""
    # Integer fields that must be at least 1 (sizes and counts: a 0 would fail later, deep inside the model,
    # naming no key).
    positive: ClassVar[tuple[str, ...]] = ()

    type: str = ""
    resume_from_checkpoint: Optional[str] = None
    resume_weights_only: bool = False
    freeze: bool = False

    def __post_init__(self):
        if not self.type:
            self.type = self.type_key
        for name in self.positive:
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value}")

    def to_dict(self) -> dict[str, Any]:
        """The config block as VLA Foundry dumps it (nested params as dicts, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("side_file"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, ModelParams):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return dict(sorted(out.items()))


SCALAR_TYPES = (bool, int, float, str)


def _scalar_type(annotation: Any) -> Optional[type]:
    """``int`` for ``int`` and ``Optional[int]`` (likewise bool, float, str); None for any other annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in SCALAR_TYPES else None


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """A YAML scalar checked against its field's type; a value of another type is refused here, by key,
    rather than failing later deep inside torch. Ints are taken for float fields, and strings that
    read as floats too: PyYAML reads ``1e-5`` (no dot) as a string."""
    want = _scalar_type(annotation)
    if value is None or want is None:
        return value
    # What VLA Foundry's own parser (draccus) reads as the field's type is read so here too: `2.0` and '2' for an
    # int, 'true'/'false' for a bool.
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if want is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if want is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if want is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    # bool is an int subclass, but `n_layers: true` is a mistake, not 1.
    elif isinstance(value, want) and (want is bool or not isinstance(value, bool)):
        return value
    fix = "put it in quotes" if want is str else f"write a YAML {want.__name__}" + (
        " without quotes" if isinstance(value, str) else "")
    raise ValueError(f"model config key `{where}` must be {want.__name__}; got {value!r} "
                     f"({type(value).__name__}); {fix}")


def parse_params(config: dict, *, _default_type: Optional[str] = None, _path: str = "",
                 _unknown: Optional[list[str]] = None) -> ModelParams:
    """Build the params for one model block (a mapping with a ``type``)."""
    if not isinstance(config, dict):
        where = f" at {_path}" if _path else ""
        raise ValueError(f"model config{where} must be a mapping; got {type(config).__name__}")
    top = _unknown is None
    unknown: list[str] = [] if top else _unknown
    model_type = config.get("type") or _default_type
    if not model_type:
        raise ValueError("model config has no `type:`; add the registry key of the model "
                         f"(one of: {', '.join(list_registered_params())})")
    cls = get_params_class(model_type)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        where = f"{_path}.{key}" if _path else key
        f = fields.get(key)
        if f is None:
            unknown.append(where)
            continue
        spec = f.metadata.get("nested")
        if spec is not None and value is None:
            continue  # `key: null` reads as an absent block: its default (or none)
        if spec is not None and isinstance(value, dict):
            kwargs[key] = parse_params(value, _default_type=spec.type_for(value), _path=where, _unknown=unknown)
        elif spec is not None:
            raise ValueError(f"model config key `{where}` must be a block (a mapping of its keys, e.g. "
                             f"`{key}: {{type: {spec.default_type}, ...}}`); got {value!r} ({type(value).__name__})")
        else:
            kwargs[key] = _coerce(value, hints.get(key), where)
    kwargs["type"] = model_type
    try:
        params = cls(**kwargs)
    except ValueError as e:  # a value its class checks (e.g. a positive count): named by its full key here
        if not _path:
            raise
        raise ValueError(f"model config block `{_path}`: {e}") from None
    for f in fields.values():
        if f.metadata.get("required") and getattr(params, f.name) is None:
            raise ValueError(f"{model_type} config needs a `{f.name}:` block; none was given")
    if top and unknown:
        logger.warning("ignoring config keys unknown to VLA Foundry Serve: %s", ", ".join(unknown))
    return params
