"""How many threads torch's CPU operators use in this server process (``VLA_TORCH_THREADS``).

torch's default is one thread per core of the host. A server is more than its operators: its event loop
parses requests and writes replies on a core of its own while a model computes, and the host often runs
other work (a robot's own control process, a sidecar, the clients in a benchmark). When more threads want
to run than there are cores, each parallel operator waits at its end for its slowest thread, and OpenMP's
threads spin while they wait, so one descheduled thread stalls every operator. Measured on a 2-core CPU
(the demo transformer, 1 and 8 streaming OpenAI clients, ``bench/text_serving.py``'s clients): with one
busy process beside the server, torch's default 2 threads gave 49 and 16 tokens/s, one thread 546 and
1,688; on the same host left quiet, 584 and 1,696 against 703 and 1,475.

So ``auto`` (the default) gives torch the CPUs this process may use less one, kept for the event loop, and
at least one. The CPUs it may use are its affinity mask, bounded by a container's CPU quota (cgroup
``cpu.max``, or v1's ``cpu.cfs_quota_us``), which torch does not read: in a container limited to 2 CPUs
on a 64-core host torch would start 64 threads. ``OMP_NUM_THREADS``, when set, is left to torch (it reads
it at import; the replica launcher sets it for each CPU replica, as Ray sets it for its workers). A count
sets exactly that many.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP_ROOT) -> Optional[float]:
    """The CPUs a container's quota allows (quota ÷ period, e.g. 1.5), or None without one: cgroup v2's
    ``cpu.max`` ("max 100000" is none), else v1's ``cpu/cpu.cfs_quota_us`` (-1 is none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on at once: its affinity mask, bounded by a container's quota (rounded up:
    a quota of 1.5 CPUs runs two threads, each part of the time)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def auto_threads(cpus: int) -> int:
    """Torch threads for a server process that may use ``cpus`` CPUs: one is left for its event loop."""
    return max(1, cpus - 1)


def choose_torch_threads(setting: Union[int, str], environ: Optional[dict] = None,
                         root: Path = CGROUP_ROOT) -> tuple[Optional[int], str]:
    """(threads to set, or None to leave torch's, and why in words) for ``VLA_TORCH_THREADS`` = ``setting``."""
    environ = os.environ if environ is None else environ
    if setting != "auto":
        return int(setting), f"VLA_TORCH_THREADS={setting}"
    if environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    cpus = usable_cpus(root)
    return auto_threads(cpus), f"VLA_TORCH_THREADS=auto: {cpus} usable CPU(s), one left for the event loop"


def apply_torch_threads(setting: Union[int, str]) -> str:
    """Sets torch's intra-op threads for this process (the model threads started later use as many) and says
    what it chose, for the start log."""
    import torch

    threads, why = choose_torch_threads(setting)
    if threads is not None:
        torch.set_num_threads(threads)
    return f"torch runs CPU operators on {torch.get_num_threads()} thread(s) ({why})"
