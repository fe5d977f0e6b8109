"""How many threads torch's CPU operators use in this server process (``VLA_TORCH_THREADS``).

torch's default is one thread per core of the host. A server is more than its operators: its event loop
parses requests and writes replies on a core of its own while a model computes, and the host often runs
other work (a robot's own control process, a sidecar, the clients in a benchmark). When more threads want
to run than there are cores, each parallel operator waits at its end for its slowest thread, and OpenMP's
threads spin while they wait, so one descheduled thread stalls every operator: on this project's 2-core CPU,
beside one busy process, torch's default 2 threads gave 16-128 times fewer tokens than one thread (README, "CPU
threads", and ``bench/cpu_threads.py``).

So ``auto`` (the default) gives torch the CPUs this process may use less one, kept for the event loop, and
at least one. The CPUs it may use are its affinity mask, bounded by a container's CPU quota (cgroup
``cpu.max``, or v1's ``cpu.cfs_quota_us``), which torch does not read: in a container limited to 2 CPUs
on a 64-core host torch would start 64 threads. ``OMP_NUM_THREADS``, when set, is left to torch (it reads
it at import; the replica launcher sets it for each replica, as Ray sets it for its workers). A count
sets exactly that many.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Union

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _cpus_of(quota: str, period: str) -> Optional[float]:
    """quota ÷ period in CPUs; None for no quota ("max", or a value that is not positive) or one unreadable."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """This process's cgroup path per hierarchy: "" for v2's unified one, "cpu" for v1's cpu controller."""
    paths = {}
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                paths[""] = path
            elif "cpu" in controllers.split(","):
                paths["cpu"] = path
    except (OSError, ValueError):
        pass
    return paths


def _and_parents(base: Path, path: str) -> list[Path]:
    """``base``/``path`` and every folder above it up to ``base`` (a limit on a parent cgroup holds too)."""
    folder, folders = base / path.lstrip("/"), []
    while True:
        folders.append(folder)
        if folder == base or base not in folder.parents:
            return folders
        folder = folder.parent


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Optional[float]:
    """The CPUs a container's (or a systemd unit's) quota allows this process (quota ÷ period, e.g. 1.5), or None
    without one: the smallest of cgroup v2's ``cpu.max`` in its own cgroup and those above it ("max 100000" is
    none), else of v1's ``cpu.cfs_quota_us`` ÷ ``cpu.cfs_period_us`` (-1 is none). A container usually sees its
    own cgroup at the root of the hierarchy; a process in a nested one is found through ``/proc/self/cgroup``."""
    own = _own_cgroups(proc_cgroup)
    v2 = [_read(folder / "cpu.max").split()[:2] for folder in _and_parents(root, own.get("", "/"))]
    limits = [_cpus_of(*fields) for fields in v2 if len(fields) == 2]
    if not any(limits):
        limits = [_cpus_of(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us"))
                  for folder in _and_parents(root / "cpu", own.get("cpu", "/"))]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _read(path: Path) -> str:
    """A cgroup file's text; "" where there is none."""
    try:
        return path.read_text()
    except OSError:
        return ""


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may run on at once: its affinity mask, bounded by a quota (rounded up: a quota of
    1.5 CPUs runs two threads, each part of the time)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def auto_threads(cpus: int) -> int:
    """Torch threads for a server process that may use ``cpus`` CPUs: one is left for its event loop."""
    return max(1, cpus - 1)


def replica_threads(replicas: int) -> int:
    """Torch threads for each of ``replicas`` replicas sharing this process's CPUs: its share, less one."""
    return auto_threads(usable_cpus() // replicas)


def omp_num_threads(environ: Mapping[str, str]) -> Optional[str]:
    """``OMP_NUM_THREADS`` when it is set to something (an empty or blank one is unset, as OpenMP reads it)."""
    value = (environ.get("OMP_NUM_THREADS") or "").strip()
    return value or None


def choose_torch_threads(setting: Union[int, str], environ: Optional[Mapping[str, str]] = None,
                         root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[Optional[int], str]:
    """(threads to set, or None to leave torch's, and why in words) for ``VLA_TORCH_THREADS`` = ``setting``."""
    environ = os.environ if environ is None else environ
    if setting != "auto":
        return int(setting), f"VLA_TORCH_THREADS={setting}"
    omp = omp_num_threads(environ)
    if omp is not None:
        return None, f"OMP_NUM_THREADS={omp}"
    cpus = usable_cpus(root, proc_cgroup)
    return auto_threads(cpus), f"VLA_TORCH_THREADS=auto: {cpus} usable CPU(s), one left for the event loop"


def apply_torch_threads(setting: Union[int, str]) -> str:
    """Sets torch's intra-op threads for this process (the model threads started later use as many) and says
    what it chose, for the start log."""
    import torch

    threads, why = choose_torch_threads(setting)
    if threads is not None:
        torch.set_num_threads(threads)
    return f"torch runs CPU operators on {torch.get_num_threads()} thread(s) ({why})"
