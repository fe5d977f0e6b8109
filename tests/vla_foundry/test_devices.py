"""Host memory as the KV cache's default cap sees it (vla_foundry/devices.py): a container's cgroup limit counts."""

import torch

from vla_foundry.devices import cgroup_memory_left, free_memory_bytes


def test_a_cgroup_v2_limit_bounds_the_memory_free(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert cgroup_memory_left(str(tmp_path)) == 768 * 2**20
    assert free_memory_bytes(torch.device("cpu"), cgroup=str(tmp_path)) <= 768 * 2**20


def test_a_cgroup_v1_limit_counts_and_no_limit_leaves_the_host_figure(tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(2**31))  # over its limit: nothing left
    assert cgroup_memory_left(str(v1)) == 0
    unlimited = tmp_path / "v2"
    unlimited.mkdir()
    (unlimited / "memory.max").write_text("max\n")
    (unlimited / "memory.current").write_text("1\n")
    assert cgroup_memory_left(str(unlimited)) is None
    assert cgroup_memory_left(str(tmp_path / "none")) is None
    assert free_memory_bytes(torch.device("cpu"), cgroup=str(unlimited)) > 0
