"""VLA_TORCH_THREADS: torch's CPU threads chosen for a server process (service/torch_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings
from service.torch_threads import auto_threads, choose_torch_threads, cpu_quota, usable_cpus

REPO = Path(__file__).resolve().parents[2]


def cgroup(tmp_path: Path, v2: str = None, v1: tuple[str, str] = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return tmp_path


def test_a_container_quota_is_read_from_cgroup_v2_and_v1(tmp_path):
    assert cpu_quota(cgroup(tmp_path / "a", v2="150000 100000\n")) == 1.5
    assert cpu_quota(cgroup(tmp_path / "b", v2="max 100000\n")) is None
    assert cpu_quota(cgroup(tmp_path / "c", v1=("200000", "100000"))) == 2.0
    assert cpu_quota(cgroup(tmp_path / "d", v1=("-1", "100000"))) is None
    assert cpu_quota(tmp_path / "none") is None
    assert cpu_quota(cgroup(tmp_path / "e", v2="garbage")) is None


def test_a_quota_that_is_no_limit_or_unreadable_is_none(tmp_path):
    for content in ("100000 0", "-1 100000", "0 100000", "150000", "max", ""):
        assert cpu_quota(cgroup(tmp_path / str(abs(hash(content))), v2=content)) is None, content
    assert cpu_quota(cgroup(tmp_path / "v1-zero", v1=("100000", "0"))) is None


def test_a_nested_cgroup_and_the_ones_above_it_are_read(tmp_path):
    """A process in a nested cgroup (a systemd unit, a container sharing the host's cgroup namespace) is bounded
    by its own cpu.max and by every one above it: the smallest counts."""
    root = cgroup(tmp_path / "root", v2="max 100000")
    cgroup(root / "system.slice", v2="300000 100000")
    cgroup(root / "system.slice" / "robot.service", v2="max 100000")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/robot.service\n")
    assert cpu_quota(root, proc) == 3.0
    cgroup(root / "system.slice" / "robot.service", v2="150000 100000")
    assert cpu_quota(root, proc) == 1.5
    v1_root, v1_own = tmp_path / "v1", tmp_path / "v1" / "cpu" / "docker" / "abc"  # v1: the cpu controller's tree
    v1_own.mkdir(parents=True)
    (v1_own / "cpu.cfs_quota_us").write_text("250000")
    (v1_own / "cpu.cfs_period_us").write_text("100000")
    proc.write_text("12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n")
    assert cpu_quota(v1_root, proc) == 2.5


def test_usable_cpus_are_the_affinity_bounded_by_the_quota_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "none") == affinity
    assert usable_cpus(cgroup(tmp_path / "half", v2="50000 100000")) == 1  # half a CPU: one thread
    assert usable_cpus(cgroup(tmp_path / "big", v2=f"{(affinity + 8) * 100000} 100000")) == affinity
    if affinity >= 2:
        assert usable_cpus(cgroup(tmp_path / "1.5", v2="150000 100000")) == 2


def test_auto_keeps_a_cpu_for_the_event_loop_and_leaves_omp_num_threads_to_torch(tmp_path):
    assert [auto_threads(n) for n in (1, 2, 3, 16)] == [1, 1, 2, 15]
    quota_of_4 = cgroup(tmp_path, v2="400000 100000")
    threads, why = choose_torch_threads("auto", environ={}, root=quota_of_4)
    assert threads == auto_threads(min(4, len(os.sched_getaffinity(0)))) and "auto" in why
    assert choose_torch_threads("auto", environ={"OMP_NUM_THREADS": "3"}, root=quota_of_4) == (
        None, "OMP_NUM_THREADS=3")
    assert choose_torch_threads(6, environ={"OMP_NUM_THREADS": "3"}, root=quota_of_4) == (6, "VLA_TORCH_THREADS=6")
    for unset in ("", "  "):  # as OpenMP reads it: unset
        assert choose_torch_threads("auto", environ={"OMP_NUM_THREADS": unset}, root=quota_of_4)[0] == threads


def test_the_setting_takes_auto_or_a_count(monkeypatch):
    assert Settings().torch_threads == "auto"
    monkeypatch.setenv("VLA_TORCH_THREADS", "3")
    assert Settings().torch_threads == 3
    for bad in ("0", "many", "-2"):
        monkeypatch.setenv("VLA_TORCH_THREADS", bad)
        with pytest.raises(ValueError):
            Settings()


@pytest.mark.parametrize("env, expected", [({"VLA_TORCH_THREADS": "3"}, "3"), ({"OMP_NUM_THREADS": "2"}, "2"),
                                           ({}, str(auto_threads(usable_cpus())))])
def test_the_app_sets_torch_threads_at_start_for_its_model_threads(env, expected, tiny_checkpoints):
    """In a fresh process (torch's thread count is process-wide): the app's start sets it, and a deployment's model
    thread, started after, computes with that many."""
    script = f"""
import logging
import torch
logging.basicConfig(level=logging.INFO)
from service import DeploymentSpec
from service.app import create_app
from service.settings import Settings
from fastapi.testclient import TestClient
spec = DeploymentSpec(name="tiny", checkpoint={str(tiny_checkpoints["transformer"])!r})
app = create_app(Settings(deployments=[spec], device="cpu", warmup=False))
with TestClient(app) as client:
    executor = app.state.manager.get("tiny").executor
    print(torch.get_num_threads(), executor.submit(torch.get_num_threads).result(timeout=60).value)
"""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VLA_TORCH_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], env={**clean, **env, "HF_HUB_OFFLINE": "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [expected, expected], out.stdout
    assert "torch runs CPU operators on" in out.stderr
