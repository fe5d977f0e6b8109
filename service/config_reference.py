"""The configuration reference (docs/configuration.md), generated from the settings models.

    python -m service.config_reference            # print the markdown
    python -m service.config_reference --write    # (re)write docs/configuration.md
    python -m service.config_reference --check    # exit 1 when docs/configuration.md is out of date

Every ``Settings`` field becomes a ``VLA_<NAME>`` row (type, default, CLI flag, description) and
every ``DeploymentSpec`` field a row of the deployment YAML's ``deployments:`` entries, so the
document follows the code; tests/deploy/test_config_reference.py keeps the committed file current.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.settings import DeploymentSpec, Settings

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
GENERATOR = "python -m service.config_reference --write"


def _env_free_demo_dir() -> Path:
    """vla_foundry.demo_paths' default as it is without ``VLA_DEMO_DIR`` (which it reads at import)."""
    from vla_foundry import demo_paths

    saved = os.environ.pop("VLA_DEMO_DIR", None)
    try:
        return Path(runpy.run_path(demo_paths.__file__)["DEFAULT_DEMO_DIR"])
    finally:
        if saved is not None:
            os.environ["VLA_DEMO_DIR"] = saved


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in inner)
        return f"{name}, optional" if len(inner) < len(args) else name
    if origin is typing.Annotated:  # a type with its own bounds: integer (≥ 1)
        bounds = _constraints(FieldInfo.from_annotation(annotation))
        return f"{_type_name(args[0])} ({bounds})" if bounds else _type_name(args[0])
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (list, tuple, set, Sequence):
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return "list of deployments"
        return f"list of {_type_name(args[0])}" if args else "list"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(field: FieldInfo) -> str:
    bounds = []
    for item in field.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return ", ".join(bounds)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _default(name: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "none" if value in ([], {}, ()) else f"`{value}`"
    value = field.default
    if value is None or value is PydanticUndefined:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        from vla_foundry.demo_paths import DEFAULT_DEMO_DIR

        if value == DEFAULT_DEMO_DIR:
            value = _env_free_demo_dir()
        home = Path.home()
        shown = f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value)
        return f"`{shown}`"
    if isinstance(value, int) and name.endswith("_bytes"):
        return f"`{value}` ({_size(value)})"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _serve_flags() -> dict[str, str]:
    """Settings field → the `vla-foundry serve` flag that sets it."""
    from service.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {}
    for action in sub.choices["serve"]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = max(action.option_strings, key=len)
        if action.dest == "checkpoint":  # DIR[=NAME], repeatable: one deployment each
            flags["deployments"] = f"`{flag} DIR[=NAME]` (repeatable)"
        else:
            flags[action.dest] = f"`{flag}`"
    return flags


def _type_cell(field: FieldInfo) -> str:
    kind, bounds = _type_name(field.annotation), _constraints(field)
    return f"{kind} ({bounds})" if bounds else kind


def settings_rows() -> list[dict[str, str]]:
    prefix = Settings.model_config.get("env_prefix", "")
    flags = _serve_flags()
    rows = []
    for name, field in Settings.model_fields.items():
        rows.append({
            "variable": f"`{prefix}{name.upper()}`",
            "yaml": "" if name == "config" else f"`{name}`",  # the YAML itself
            "type": _type_cell(field),
            "default": _default(name, field),
            "flag": flags.get(name, ""),
            "description": field.description or "",
        })
    return rows


def deployment_rows() -> list[dict[str, str]]:
    rows = []
    for name, field in DeploymentSpec.model_fields.items():
        rows.append({
            "key": f"`{name}`",
            "type": _type_cell(field),
            "default": _default(name, field),
            "description": field.description or "",
        })
    return rows


def _table(columns: list[tuple[str, str]], rows: list[dict[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) or " " for key, _ in columns) + " |")
    return lines


def render() -> str:
    """The markdown of docs/configuration.md."""
    prefix = Settings.model_config.get("env_prefix", "")
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from service/settings.py by `{GENERATOR}`; do not edit by hand. -->",
        "",
        "The server's settings come from, highest precedence first: `vla-foundry serve` flags, the",
        "deployment YAML (`--config` or `VLA_CONFIG`), `VLA_*` environment variables, the defaults.",
        "With no deployment anywhere the server serves the demo pack.",
        "",
        "## Settings",
        "",
        f"Each setting is an environment variable `{prefix}<NAME>` and a top-level key of the deployment YAML.",
        "Booleans take `true`/`false` (or `1`/`0`); `VLA_DEPLOYMENTS` takes JSON.",
        "",
        *_table([("variable", "variable"), ("yaml", "YAML key"), ("type", "type"), ("default", "default"),
                 ("flag", "serve flag"), ("description", "description")], settings_rows()),
        "",
        "## Deployment entries",
        "",
        "The entries of the deployment YAML's `deployments:` list (or of `VLA_DEPLOYMENTS`); relative",
        "`checkpoint` paths are relative to the YAML file.",
        "",
        *_table([("key", "key"), ("type", "type"), ("default", "default"), ("description", "description")],
                deployment_rows()),
        "",
        "## In the container",
        "",
        "`docker/entrypoint.sh` (the image's entry command) adds:",
        "",
        "| variable | default | description |",
        "| --- | --- | --- |",
        "| `VLA_DEPLOY_FILE` | `/config/deploy.yaml` | Served when `VLA_CONFIG` is not set and the file exists "
        "(passed as `--config`); else the demo pack. |",
        "| `VLA_HOST` | `0.0.0.0` | Passed as `--host` (the image's default; the CLI's own is `127.0.0.1`). |",
        "| `VLA_PORT` | `8000` | Passed as `--port`. |",
        "| `VLA_DEMO_DIR` | `/opt/vla/demo` | The demo pack baked into the image (`BUILD_DEMO=1`). |",
        "| `HF_HOME` | `/cache/huggingface` | Hugging Face cache, a named volume in docker-compose.yml. |",
        "| `VLA_ENTRYPOINT_DRY_RUN` | `0` | `1` prints the serve command instead of running it. |",
        "",
        "The compose-level variables (GPU count, published port, volumes, image build) are listed in",
        "`.env.example`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.config_reference", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the reference to --output")
    mode.add_argument("--check", action="store_true", help="exit 1 when --output differs from the generated text")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    elif args.check:
        current = args.output.read_text() if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date: run `{GENERATOR}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
