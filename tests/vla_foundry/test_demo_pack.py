"""The trained demo pack as the package ships it (``vla_foundry/demo/pack``): complete, intact, pickle-free,
copied into place in seconds without training, and every member loads through the real checkpoint path."""

from __future__ import annotations

import time

import pytest

from vla_foundry import demo
from vla_foundry.demo import DEMO_MEMBERS, MANIFEST, SHIPPED_PACK, ensure_demo_pack, is_built, shipped_members
from vla_foundry.pipelines import load_pipeline


def test_the_package_ships_every_member_with_checksums():
    members = shipped_members()
    assert sorted(members) == sorted(DEMO_MEMBERS)
    for name, files in members.items():
        on_disk = sorted(str(p.relative_to(SHIPPED_PACK / name)) for p in (SHIPPED_PACK / name).rglob("*")
                         if p.is_file())
        assert on_disk == sorted(files), f"{name}: files and {MANIFEST} differ"
        assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl"))], f"{name} ships a pickle"
        assert any(f.startswith("checkpoints/checkpoint_") and f.endswith(".safetensors") for f in files)
    total = sum((SHIPPED_PACK / n / f).stat().st_size for n, files in members.items() for f in files)
    assert total < 40 * 2**20, f"the shipped pack is {total / 2**20:.1f} MiB"


def test_a_fresh_demo_folder_is_filled_from_the_pack_without_training(tmp_path, monkeypatch):
    def no_training(*_):
        raise AssertionError("a shipped member was trained instead of copied")

    monkeypatch.setattr(demo, "BUILDERS", {name: no_training for name in DEMO_MEMBERS})
    started = time.perf_counter()
    ensure_demo_pack(tmp_path)
    assert time.perf_counter() - started < 30
    assert all(is_built(tmp_path / name) for name in DEMO_MEMBERS)


@pytest.mark.parametrize("member", DEMO_MEMBERS)
def test_every_shipped_member_loads(member):
    pipeline = load_pipeline(SHIPPED_PACK / member)
    assert pipeline.checkpoint_info()["step"] is not None


def test_a_damaged_shipped_file_is_refused_by_name(tmp_path):
    pack = tmp_path / "pack"
    name = "demo-transformer_hf"
    files = shipped_members()[name]
    for relative in files:
        (pack / name / relative).parent.mkdir(parents=True, exist_ok=True)
        (pack / name / relative).write_bytes((SHIPPED_PACK / name / relative).read_bytes())
    config = next(f for f in files if f.endswith(".yaml"))
    (pack / name / config).write_text((pack / name / config).read_text() + "\n# edited\n")
    with pytest.raises(RuntimeError, match=f"{name} is damaged .*{config}"):
        demo.copy_shipped_member(name, tmp_path / "out", files, pack=pack)
