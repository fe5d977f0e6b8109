"""``vla-foundry serve --replicas``: several server processes of one configuration behind one address.

The launcher binds the listening socket once and starts one process per replica, each given its
GPUs through ``CUDA_VISIBLE_DEVICES`` (so ``device: auto`` is its own GPU) and the socket to accept
on; the kernel hands each new connection to one of them. A robot's keep-alive connection stays
with the replica that accepted it. Each replica loads every deployment and batches its own
requests, exactly as a single server does.

The launcher then only watches: a replica that exits is started again (after 1 s, doubling up to
30 s while it keeps failing within a minute of its start), and the socket stays open meanwhile,
so connections wait in its queue instead of being refused. A replica that exits with status 2
(the configuration is wrong) ends the launch: every restart would fail the same way. SIGTERM or
Ctrl-C drains every replica (each stops accepting and finishes its requests, as one server
does) and kills what is still running ``drain_timeout_s`` + 5 s later (a replica's drain, its
websockets and its requests together, takes at most ``drain_timeout_s``); a second Ctrl-C kills them at once. A replica
dies with its launcher, even one killed by SIGKILL.

What makes a launch impossible (no GPU for ``per-gpu``, a device some replica will not have, the address taken) is
found before anything else is said or started (:func:`prepare_launch`), so such a launch prints only why it failed.

Why processes and not threads: each replica has its own interpreter, so replicas on different
GPUs never wait for each other's interpreter lock, and one that crashes takes no other with it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

from service.torch_threads import omp_num_threads, replica_threads

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger("service.launcher")

GPU_ENV = "CUDA_VISIBLE_DEVICES"  # the GPUs a replica sees, numbered from 0 in it (set here for each replica)
CONFIG_ERROR = 2  # what `vla-foundry serve` exits with when its settings are wrong
INTERRUPTED = 130  # a second Ctrl-C: stopped without finishing the work in flight (the shell's code for SIGINT)
SECOND_INTERRUPT = "second interrupt: stopping without finishing the requests in flight"
PLAN_FLAGS = "--gpus, --replicas, --replicas-per-gpu"  # how a replica's GPUs are given
RESTART_DELAY_S, MAX_RESTART_DELAY_S, STABLE_AFTER_S = 1.0, 30.0, 60.0
KILL_GRACE_S = 5.0


def visible_gpus(gpus: Optional[str]) -> list[str]:
    """The GPUs replicas may be given, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs): ``gpus``
    (comma-separated; ``none``: no GPU), else this process's ``CUDA_VISIBLE_DEVICES``, else every GPU torch
    counts."""
    if gpus is not None:
        if gpus.strip().lower() == "none":
            return []
        names = [g.strip() for g in gpus.split(",") if g.strip()]
        if not names or len(set(names)) < len(names):
            raise ValueError(f"--gpus / VLA_GPUS {gpus!r} names no GPU or one twice: give distinct GPUs as "
                             "CUDA_VISIBLE_DEVICES names them (e.g. 0,1 or GPU UUIDs), or none for CPU replicas")
        return names
    if os.environ.get(GPU_ENV) is not None:
        return [g.strip() for g in os.environ[GPU_ENV].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def replica_plan(replicas: str, per_gpu: int, gpus: list[str]) -> list[str]:
    """Each replica's ``CUDA_VISIBLE_DEVICES``: ``per-gpu`` ⇒ ``per_gpu`` replicas on every GPU; a count ⇒ that
    many, spread over the GPUs in turn; ``""`` hides every GPU: a CPU replica (with ``--gpus none`` on a host that
    has GPUs it must not see them; on a host without any, hiding them changes nothing)."""
    if replicas == "per-gpu":
        if not gpus:
            raise ValueError("--replicas per-gpu: no GPU is visible here (none given with --gpus, CUDA_VISIBLE_DEVICES "
                             "empty or no CUDA device); use --replicas N for N CPU replicas")
        return [gpu for gpu in gpus for _ in range(per_gpu)]
    count = int(replicas)
    if gpus:
        return [gpus[i % len(gpus)] for i in range(count)]
    return [""] * count


def check_replica_devices(settings: "Settings", plan: list[str]) -> None:
    """What a replica of ``plan`` would refuse at its start, refused once here instead (ValueError), before any
    replica starts: a device it will not have (``cuda`` on CPU replicas, ``cuda:1`` on a replica given one GPU),
    and a CUDA device on GPU replicas when this host has none. Each replica still checks its own GPUs."""
    from service.replicas import check_devices_exist, settings_for_replica

    for gpus in dict.fromkeys(plan):
        settings_for_replica(settings, len([g for g in gpus.split(",") if g.strip()]), PLAN_FLAGS)
    if any(plan) and os.environ.get(GPU_ENV) is None:
        # This process sees every GPU of the host, and a replica sees some of them: a device missing here is missing
        # in every replica. (With CUDA_VISIBLE_DEVICES set here, a replica may be given GPUs this process cannot see.)
        check_devices_exist(settings)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening, inherited by every replica (SO_REUSEADDR, as uvicorn binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def address(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


BIND_ERRORS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)  # what binding an address can fail with


def cannot_listen(host: str, port: int, error: OSError) -> str:
    """Why the server cannot listen on ``host``:``port``, in one line that names the fix."""
    where = f"cannot listen on {address(host, port)}"
    if error.errno == errno.EADDRINUSE:
        return (f"{where}: address already in use (another server listens there; `ss -ltnp 'sport = :{port}'` "
                "names it): stop it, or choose another port with --port or VLA_PORT (0: any free port)")
    if error.errno == errno.EACCES:
        return (f"{where}: permission denied (ports below 1024 need privileges): choose another port with --port "
                "or VLA_PORT, such as 8000")
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return (f"{where}: {host!r} is no address of this host ({reason}): give --host or VLA_HOST as one of its "
                "addresses, 127.0.0.1 (this host only) or 0.0.0.0 (every interface)")
    return f"{where}: {reason}; check --host (VLA_HOST) and --port (VLA_PORT)"


def prepare_launch(settings: "Settings") -> tuple[list[str], socket.socket]:
    """Each replica's ``CUDA_VISIBLE_DEVICES`` and the bound socket they will share; ValueError, naming the fix,
    when the launch cannot run: no GPU for ``per-gpu``, a device some replica will not have, the address taken."""
    plan = replica_plan(str(settings.replicas), settings.replicas_per_gpu, visible_gpus(settings.gpus))
    check_replica_devices(settings, plan)
    try:
        return plan, listening_socket(settings.host, settings.port)
    except OSError as e:
        raise ValueError(cannot_listen(settings.host, settings.port, e)) from None


@dataclass
class _Child:
    index: int
    gpus: str  # its CUDA_VISIBLE_DEVICES ("" for a CPU replica)
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    failures: int = 0  # exits in a row, each within STABLE_AFTER_S of its start
    restarts: int = 0  # starts after the first
    restart_at: Optional[float] = None


class Launcher:
    """Starts ``command`` + ``--replica-index I --listen-fd FD`` once per entry of ``plan`` and keeps them up.

    The signal handlers only note the request; the loop acts on it between its own steps, so a replica that is
    being started when SIGTERM comes is signalled as soon as it exists, and none is started after it.
    """

    def __init__(self, command: Sequence[str], plan: list[Optional[str]], sock: socket.socket, drain_timeout_s: float,
                 torch_threads: Union[int, str] = "auto"):
        self.command, self.sock, self.drain_timeout_s = list(command), sock, drain_timeout_s
        self.torch_threads = torch_threads  # VLA_TORCH_THREADS: a count each replica sets itself, or auto
        self.children = [_Child(i, gpus) for i, gpus in enumerate(plan)]
        self.stop_requested = False
        self.stop_signals = 0  # SIGTERM and Ctrl-C received (a launch ending on its own counts none)
        self.interrupted_twice = False

    def _request_stop(self, signum: int, _frame: object = None) -> None:
        self.stop_signals += 1
        if signum == signal.SIGINT and self.stop_signals > 1 and not self.interrupted_twice:
            # A second Ctrl-C: the replicas still draining are killed now instead of finishing their requests.
            draining = [c for c in self.children if c.process is not None and c.process.poll() is None]
            if draining:
                self.interrupted_twice = True
                logger.warning("%s: killing %d replica(s)", SECOND_INTERRUPT, len(draining))
                for child in draining:
                    child.process.kill()
        self.stop_requested = True

    def _start(self, child: _Child) -> None:
        env = {**os.environ, GPU_ENV: child.gpus}
        if self.torch_threads == "auto" and omp_num_threads(env) is None:
            # Replicas share the host's CPUs (GPU replicas too: their preprocessing runs there): each gets its
            # share, less one for its event loop (torch_threads.py).
            env["OMP_NUM_THREADS"] = str(replica_threads(len(self.children)))
        fd = self.sock.fileno()
        command = [*self.command, "--port", str(self.sock.getsockname()[1]), "--replica-index", str(child.index),
                   "--listen-fd", str(fd), "--launcher-pid", str(os.getpid())]
        # A process group of its own: Ctrl-C in a terminal (or SIGHUP) reaches the launcher only, which drains the
        # replicas with SIGTERM, instead of each replica getting SIGINT before it has set its own handlers.
        child.process = subprocess.Popen(command, env=env, pass_fds=(fd,), process_group=0)
        child.started, child.restart_at = time.monotonic(), None
        logger.info("replica %d started (pid %d, %s)", child.index, child.process.pid,
                    f"{GPU_ENV}={child.gpus!r}" if child.gpus else "CPU")
        if self.stop_requested:  # the request came while it was being started
            child.process.send_signal(signal.SIGTERM)

    def _stop(self) -> None:
        """Every replica drains; the socket closes here, so once the replicas have closed theirs a new connection
        is refused at once (a load balancer moves on) instead of waiting in a queue nobody accepts from."""
        self.stop_requested = True
        self.sock.close()  # first: the replicas hold their own copies until they stop listening
        logger.info("stopping: draining %d replica(s)", len(self.children))
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, self._request_stop)
        code = 0
        try:
            for child in self.children:
                if self.stop_requested:
                    break
                self._start(child)
            while not self.stop_requested and not code:
                for child in self.children:
                    code = self._watch(child)
                    if code:  # every replica would fail alike: none is started again
                        break
                else:
                    time.sleep(0.2)
            self._stop()
            self._wait_for_replicas()
        finally:  # an error here must not leave replicas serving the port without their launcher
            for child in self.children:
                if child.process is not None and child.process.poll() is None:
                    child.process.kill()
                    child.process.wait()
        return code or (INTERRUPTED if self.interrupted_twice else 0)  # (a replica's configuration error wins)

    def _wait_for_replicas(self) -> None:
        # A replica's own drain (its robot websockets, then its requests) ends within drain_timeout_s.
        deadline = time.monotonic() + self.drain_timeout_s + KILL_GRACE_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if not self.interrupted_twice:
                    logger.warning("replica %d did not drain in time: killed", child.index)
                child.process.kill()
                child.process.wait()

    def _watch(self, child: _Child) -> int:
        """Restarts ``child`` when it has exited and its delay has passed; a configuration error ends the launch."""
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at and not self.stop_requested:
                child.restarts += 1
                try:
                    self._start(child)
                except OSError as e:  # no process could be made now (memory, process limits): try again later
                    child.process, child.started = None, now  # (a failed start is a quick failure: the delay grows)
                    self._schedule_restart(child, now, f"could not be started ({e})")
            return 0
        status = child.process.poll()
        if status is None or self.stop_requested:
            return 0
        if status == CONFIG_ERROR and not child.restarts:
            logger.error("replica %d exited with status %d (its configuration is wrong): stopping every replica",
                         child.index, status)
            return CONFIG_ERROR
        if status == CONFIG_ERROR:  # the others run on: a configuration edited since they started must not end them
            logger.error("replica %d, started again, exited with status %d: its configuration (as read now) is "
                         "wrong; the other replicas serve on and it is tried again", child.index, status)
        self._schedule_restart(child, now, f"(pid {child.process.pid}) exited with status {status}")
        return 0

    def _schedule_restart(self, child: _Child, now: float, what: str) -> None:
        child.failures = child.failures + 1 if now - child.started < STABLE_AFTER_S else 1
        delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** min(child.failures - 1, 30))  # (no overflow)
        logger.warning("replica %d %s: starting it again in %.0f s", child.index, what, delay)
        child.restart_at = now + delay


def die_with_the_launcher(launcher_pid: Optional[int]) -> bool:
    """In a replica: SIGTERM when the launcher dies (even by SIGKILL), so no replica serves on without it
    (Linux's PR_SET_PDEATHSIG; elsewhere nothing). False when the launcher has died already (before this call
    the death would have gone unnoticed)."""
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, ctypes.c_ulong(signal.SIGTERM)) != 0:  # 1 = PR_SET_PDEATHSIG
            logger.warning("PR_SET_PDEATHSIG failed (errno %d): this replica may outlive its launcher",
                           ctypes.get_errno())
    except (OSError, AttributeError):
        pass
    return launcher_pid is None or os.getppid() == launcher_pid


def launch(command: Sequence[str], plan: list[str], sock: socket.socket, drain_timeout_s: float,
           torch_threads: Union[int, str] = "auto") -> int:
    """``vla-foundry serve`` with more than one replica, once :func:`prepare_launch` has planned and bound: start and
    watch (see the module's notes)."""
    return Launcher(command, plan, sock, drain_timeout_s, torch_threads).run()


def launch_banner(plan: list[str], host: str, port: int) -> str:
    """The launcher's line once it listens (its first replica prints how to use the server once it is ready)."""
    where = ", ".join(f"GPU {g}" if g else "CPU" for g in plan)
    return f"VLA Foundry Serve: {len(plan)} replicas on {address(host, port)} ({where})"
