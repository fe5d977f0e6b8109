"""The launcher of ``vla-foundry serve --replicas`` with stand-in replicas (small scripts, no model), so its signals,
restarts and drain are checked in seconds: the launcher runs in a process of its own, as it does in production, and
gets its SIGTERM from outside."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

REPLICA = textwrap.dedent("""
    import os, signal, socket, sys, time
    args = sys.argv[1:]
    index, fd = int(args[args.index("--replica-index") + 1]), int(args[args.index("--listen-fd") + 1])
    from service.launcher import die_with_the_launcher
    if not die_with_the_launcher(int(args[args.index("--launcher-pid") + 1])):
        sys.exit(0)
    log = open(os.environ["LOG"], "a", buffering=1)
    log.write(f"start {index}\\n")
    marker = os.environ.get("FAIL_ONCE")
    if marker and index == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(1)  # a crash: the launcher starts it again
    if marker and index == 0 and os.environ.get("CONFIG_BROKEN_SINCE"):
        sys.exit(2)  # started again, it finds its configuration edited into a wrong one
    sock = socket.socket(fileno=fd)
    def drain(*_):
        sock.close()  # stops listening at once, as uvicorn does, then finishes its work
        log.write(f"term {index}\\n")
        time.sleep(float(os.environ.get("DRAIN_S", "0.2")))
        log.write(f"exit {index}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, drain)
    while True:
        time.sleep(0.05)
""")

LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    from service.launcher import Launcher, listening_socket
    class StopDuringStart(Launcher):
        def _start(self, child):
            super()._start(child)
            if child.index == 0 and os.environ.get("STOP_DURING_START"):
                os.kill(os.getpid(), signal.SIGTERM)  # the signal comes while the replicas are being started
    sock = listening_socket("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    drain_timeout_s = float(os.environ.get("DRAIN_TIMEOUT_S", "2"))
    sys.exit(StopDuringStart([sys.executable, sys.argv[1]], ["", ""], sock, drain_timeout_s).run())
""")


@pytest.fixture
def launch(tmp_path):
    (tmp_path / "replica.py").write_text(REPLICA)
    log = tmp_path / "events.log"
    log.touch()
    started: list[subprocess.Popen] = []

    def start(new_session: bool = False, **env: str) -> tuple[subprocess.Popen, int, Path]:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "replica.py")], stdout=subprocess.PIPE,
                                text=True, cwd=REPO, env={**os.environ, "LOG": str(log), **env},
                                start_new_session=new_session)
        started.append(proc)
        return proc, int(proc.stdout.readline()), log

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def events(log: Path) -> list[str]:
    return log.read_text().splitlines()


def wait_for(condition, timeout: float = 60.0) -> None:  # (only how long a failure takes to show)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_a_replica_that_dies_is_started_again_and_sigterm_drains_all(launch, tmp_path):
    proc, port, log = launch(FAIL_ONCE=str(tmp_path / "failed-once"), DRAIN_S="1.5")
    wait_for(lambda: events(log).count("start 0") == 2 and "start 1" in events(log))  # replica 0 again, after 1 s
    assert not refused(port)  # while they run, the port takes connections
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: {"term 0", "term 1"} <= set(events(log)))
    wait_for(lambda: refused(port), timeout=1)  # draining: new connections are refused at once, not queued
    assert proc.poll() is None  # (while the replicas still finish their work)
    assert proc.wait(timeout=10) == 0
    assert {"exit 0", "exit 1"} <= set(events(log))  # each finished its drain, none was killed


def test_a_replica_whose_configuration_broke_after_launch_does_not_end_the_others(launch, tmp_path):
    """Exit status 2 ends the launch only at a replica's first start; a replica started again that exits 2 (its
    configuration was edited since) is retried, while the others serve on."""
    proc, port, log = launch(FAIL_ONCE=str(tmp_path / "failed-once"), CONFIG_BROKEN_SINCE="1")
    wait_for(lambda: events(log).count("start 0") >= 3)  # crashed, then exited 2, then tried again
    assert proc.poll() is None and "term 1" not in events(log)
    assert not refused(port)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0 and "exit 1" in events(log)


def test_a_stop_during_start_stops_the_replicas_started_and_starts_no_other(launch):
    """SIGTERM while the replicas are being started: the one started gets SIGTERM (it may end before its own
    handler is set; unsignalled, the launcher would wait for its kill deadline of 10 + 5 s, as it never ends
    alone), and the next is never started."""
    proc, port, log = launch(STOP_DURING_START="1", DRAIN_TIMEOUT_S="10")
    started = time.monotonic()
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 8 and "start 1" not in events(log)


def test_ctrl_c_in_a_terminal_drains_the_replicas_through_the_launcher(launch):
    """Ctrl-C sends SIGINT to the terminal's whole foreground process group: only the launcher gets it (replicas
    run in groups of their own) and drains each replica with SIGTERM, so none dies of a SIGINT it has no handler
    for yet."""
    proc, port, log = launch(new_session=True)
    wait_for(lambda: {"start 0", "start 1"} <= set(events(log)))
    time.sleep(0.3)  # past setting their SIGTERM handlers
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    assert proc.wait(timeout=10) == 0
    assert {"term 0", "term 1", "exit 0", "exit 1"} <= set(events(log))


def test_replicas_die_with_their_launcher_even_when_it_is_killed(launch):
    proc, port, log = launch()
    wait_for(lambda: {"start 0", "start 1"} <= set(events(log)))
    time.sleep(0.3)  # past their die_with_the_launcher call
    proc.kill()  # no SIGTERM to forward: the kernel tells each replica its parent died
    wait_for(lambda: {"exit 0", "exit 1"} <= set(events(log)))
    wait_for(lambda: refused(port))  # nobody serves the port any more


def test_starts_that_fail_back_off_even_after_a_long_run(monkeypatch):
    """A replica that served for hours, then cannot be started again (no memory, a process limit): the attempts are
    quick failures, so the delay doubles up to its cap instead of retrying every second for ever."""
    from service import launcher as launcher_module

    clock = {"now": 10_000.0}
    monkeypatch.setattr(launcher_module.time, "monotonic", lambda: clock["now"])
    sock = socket.socket()
    launcher = launcher_module.Launcher(["true"], [""], sock, drain_timeout_s=1)
    child = launcher.children[0]
    child.started = 0.0  # started long ago
    child.process = subprocess.Popen([sys.executable, "-c", "pass"])
    child.process.wait()

    def no_process(*args, **kwargs):
        raise OSError("no memory")

    monkeypatch.setattr(launcher_module.subprocess, "Popen", no_process)
    delays = []
    assert launcher._watch(child) == 0  # it exited after a long run: the first delay is the shortest
    for _ in range(7):
        delays.append(child.restart_at - clock["now"])
        clock["now"] = child.restart_at
        assert launcher._watch(child) == 0 and child.process is None
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    child.failures = 5000  # hours of failing starts: the delay stays at its cap (2 ** 4999 would overflow a float)
    clock["now"] = child.restart_at
    assert launcher._watch(child) == 0 and child.failures == 5001 and child.restart_at - clock["now"] == 30
    sock.close()


@pytest.mark.parametrize("setting, omp, expected", [("auto", None, "3"), ("auto", "", "3"), ("auto", "5", "5"),
                                                  (4, None, None)])
def test_cpu_replicas_share_the_cores_less_one_each_for_its_event_loop(monkeypatch, setting, omp, expected):
    """Each CPU replica gets OMP_NUM_THREADS = its share of the usable CPUs less one (torch_threads.auto_threads),
    unless OMP_NUM_THREADS or a count in VLA_TORCH_THREADS says otherwise (the replica then sets that itself)."""
    from service import launcher as launcher_module
    from service import torch_threads

    monkeypatch.setattr(torch_threads, "usable_cpus", lambda: 12)  # 3 replicas: 4 CPUs each, 3 threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    started, real_popen = [], subprocess.Popen
    monkeypatch.setattr(launcher_module.subprocess, "Popen",
                        lambda command, env, **kwargs: started.append(env) or real_popen(["true"]))
    sock = socket.socket()
    launcher = launcher_module.Launcher(["serve"], ["", "", ""], sock, drain_timeout_s=1, torch_threads=setting)
    launcher._start(launcher.children[0])
    launcher.children[0].process.wait()
    assert started[0].get("OMP_NUM_THREADS") == expected
    sock.close()


def test_one_ctrl_c_while_a_failed_launch_drains_is_not_a_second_one(monkeypatch):
    """A launch ending on a replica's configuration error drains the others; one Ctrl-C meanwhile is the first
    signal, not a second one: nothing is killed, and the launch still ends with the configuration error's 2."""
    from service import launcher as launcher_module

    sock = socket.socket()
    launcher = launcher_module.Launcher(["true"], [""], sock, drain_timeout_s=1)
    child = launcher.children[0]
    # A replica that drains on SIGTERM (a plain sleep would die of it, and whether it had yet when polled was a
    # race); it says when its handler is in place, before the launch stops it.
    draining = "import signal, time; signal.signal(signal.SIGTERM, lambda *_: None); print('ready', flush=True); " \
               "time.sleep(30)"
    child.process = subprocess.Popen([sys.executable, "-c", draining], stdout=subprocess.PIPE, text=True)
    assert child.process.stdout.readline().strip() == "ready"
    try:
        launcher._stop()  # (what run() does once a replica exited 2)
        launcher._request_stop(signal.SIGINT)
        assert not launcher.interrupted_twice and child.process.poll() is None
        launcher._request_stop(signal.SIGINT)  # a second one does cut the drain short
        assert launcher.interrupted_twice and child.process.wait(timeout=10) != 0
    finally:
        if child.process.poll() is None:
            child.process.kill()
        child.process.wait()
        child.process.stdout.close()
