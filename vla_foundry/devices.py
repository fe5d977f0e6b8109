"""Device and dtype decisions, made once at the edge (load time), never inside models."""

from __future__ import annotations

import os
from typing import Optional

import torch

from vla_foundry.checkpoint import BF16_PRECISIONS, resolve_dtype


def resolve_device(device: Optional[str] = "auto") -> torch.device:
    """``auto`` ⇒ ``cuda:0`` when CUDA is present, else ``cpu``; ``cuda`` ⇒ ``cuda:0``."""
    if device in (None, "", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this host has no CUDA device; use cpu or auto")
        if resolved.index is None:
            resolved = torch.device("cuda:0")
        if resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this host has {torch.cuda.device_count()} CUDA "
                             "devices")
    return resolved


def resolve_model_dtype(dtype: Optional[str], device: torch.device, precision: Optional[str]) -> torch.dtype:
    """``auto`` ⇒ float32 on CPU; on CUDA bfloat16 when the run trained in bf16, else float32."""
    explicit = resolve_dtype(dtype)
    if explicit is not None:
        return explicit
    if device.type == "cuda" and precision in BF16_PRECISIONS:
        return torch.bfloat16
    return torch.float32


def free_memory_bytes(device: torch.device, cgroup: str = "/sys/fs/cgroup") -> int:
    """Memory free now on ``device``: the GPU's on CUDA, else the host's (``MemAvailable``: free plus what the
    kernel can reclaim at once, on Linux; free pages elsewhere), and no more than what the process's cgroup still
    allows (a container's memory limit, which ``MemAvailable`` does not see)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        with open("/proc/meminfo") as info:
            free = next((int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    left = cgroup_memory_left(cgroup)
    return free if left is None else min(free, left)


def cgroup_memory_left(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """What the process's cgroup still allows (limit − usage), or None without a limit: cgroup v2's ``memory.max``
    and ``memory.current``, else v1's ``memory/memory.limit_in_bytes`` and ``memory.usage_in_bytes``."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(os.path.join(root, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(root, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # no limit (v1 writes a huge number)
            return None
        return max(0, int(limit) - usage)
    return None
