"""docs/configuration.md is generated from the settings models and cannot drift from them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service import config_reference
from service.settings import DeploymentSpec, Settings

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"


def _rows(text: str, first_cell: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell (without backticks)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.setdefault(cells[0].strip("`"), cells)
    return rows


def test_the_committed_reference_is_the_generated_one():
    assert DOC.read_text() == config_reference.render(), \
        "docs/configuration.md is out of date: run `python -m service.config_reference --write`"


def test_every_setting_and_deployment_key_is_documented():
    text = DOC.read_text()
    rows = _rows(text, "variable")
    prefix = Settings.model_config["env_prefix"]
    for name in Settings.model_fields:
        row = rows.get(f"{prefix}{name.upper()}")
        assert row, f"{prefix}{name.upper()} is not in docs/configuration.md"
        assert row[-1], f"{prefix}{name.upper()} has no description"
    deployment_table = text.split("## Deployment entries", 1)[1].split("\n## ", 1)[0]
    keys = _rows(deployment_table, "key")
    assert set(keys) == set(DeploymentSpec.model_fields)
    assert all(row[-1] for row in keys.values())


def test_defaults_come_from_the_models():
    rows = _rows(DOC.read_text(), "variable")
    prefix = Settings.model_config["env_prefix"]
    for name, field in Settings.model_fields.items():
        default = rows[f"{prefix}{name.upper()}"][3]
        value = field.default
        if isinstance(value, bool):
            assert default == f"`{str(value).lower()}`", name
        elif isinstance(value, (int, float)):
            shown = int(value) if float(value).is_integer() else value
            assert default.startswith(f"`{shown}`"), (name, default)
        elif isinstance(value, str):
            assert default == f"`{value}`", name
    # Machine-dependent: the demo dir under HOME, shown without the machine's home or VLA_DEMO_DIR.
    assert rows[f"{prefix}DEMO_DIR"][3] == "`~/.cache/vla_foundry/demo`"


def test_the_rendering_does_not_depend_on_the_environment(monkeypatch, tmp_path):
    expected = config_reference.render()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLA_")}
    env.update(VLA_DEMO_DIR=str(tmp_path / "demo"), VLA_PORT="9999", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "service.config_reference"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected


def test_check_and_write_modes(tmp_path, capsys):
    target = tmp_path / "configuration.md"

    def run(*args):
        return config_reference.main([*args, "--output", str(target)])

    assert run("--check") == 1  # missing
    assert run("--write") == 0 and target.read_text() == DOC.read_text()
    assert run("--check") == 0
    target.write_text(target.read_text().replace("Cap on", "Limit on", 1))
    assert run("--check") == 1 and "out of date" in capsys.readouterr().err
    assert config_reference.main([]) == 0 and capsys.readouterr().out == DOC.read_text()


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_env_example_covers_every_setting(name):
    """.env.example (the compose env_file template) names every VLA_* setting."""
    variable = f"{Settings.model_config['env_prefix']}{name.upper()}"
    assert variable in (REPO / ".env.example").read_text()
