"""The GPU check's scripts still run: ``bench/gpu_check.py --smoke`` runs every step of ``make gpu-check`` on the
CPU with tiny models and short rows. Sessions with a GPU are rare and short; a bench that broke since the last one
(a renamed field, a changed return type) would spend that time on a traceback instead of a measurement."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
try:
    import cpu_threads
finally:
    sys.path.remove(str(ROOT / "bench"))


def test_every_step_of_the_gpu_check_runs_on_the_cpu():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    summary = result.stdout[result.stdout.rindex("## GPU check"):] if "## GPU check" in result.stdout else ""
    assert result.returncode == 0, f"{summary}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    for step in ("tests", "generate", "images", "policy", "fleet", "text"):
        assert f"| {step} | ok |" in summary, summary
    # Each bench printed its table, not only an exit status.
    assert "| 1 |" in result.stdout and "tokens/s" in result.stdout and "req/s" in result.stdout


def test_fleet_bench_leaves_litserve_out_where_it_cannot_be_installed(monkeypatch):
    """A GPU host has no package registry: the fleet bench's LitServe rows are left out there, and our server's
    rows (the GPU goals) still run, instead of the whole step failing on pip."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fleet
    finally:
        sys.path.remove(str(ROOT / "bench"))
    calls = []

    def pip_fails(command, **kwargs):
        calls.append(command)
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(fleet, "litserve", None)
    monkeypatch.setattr(fleet.subprocess, "run", pip_fails)
    assert fleet.ensure_litserve() is None
    assert calls and calls[0][1:4] == ["-m", "pip", "install"]


def test_fleet_bench_robots_keep_running_over_the_websocket():
    """Each transport's replies report their server timing under other keys; a robot that read the wrong one died
    after its first reply, and its row showed one request per robot instead of a measurement."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet.py"), "--tiny", "--transport", "websocket",
                             "--concurrency", "2", "--seconds", "1", "--warmup", "0.5", "--no-starvation",
                             "--no-litserve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split("|") for line in result.stdout.splitlines()
            if line.startswith("| ours, batching on (websocket)")]
    assert rows, result.stdout[-4000:]
    cells = [c.strip() for c in rows[0]]
    requests_per_s, errors = float(cells[3]), int(cells[-2])
    assert requests_per_s > 20 and errors == 0, rows[0]
    # The server's event loop: its main thread's CPU time per request over the window, and its busy share.
    loop = re.fullmatch(r"(\d+) \((\d+)%\)", cells[-3])
    assert loop and int(loop.group(1)) > 0 and 0 < int(loop.group(2)) <= 100, rows[0]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


def test_fleet_bench_simulates_a_gpu_in_every_server():
    """--simulated-gpu: each batch's sampling sleeps the simulated time in our server and its model process alike
    (bench/simulated_gpu/sitecustomize.py on their PYTHONPATH), so a model call takes at least BASE_MS; without the
    simulation the tiny model's call takes a few ms on this CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet.py"), "--simulated-gpu", "25,1",
                             "--concurrency", "2", "--seconds", "1", "--warmup", "0.5", "--no-starvation",
                             "--no-litserve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in result.stdout.splitlines()
            if line.startswith("| ours, batching on")}
    assert len(rows) == 2, result.stdout[-4000:]  # in-thread and model process
    for cells in rows.values():
        queue, prep, run, route = (float(x) for x in cells[7].split(","))
        assert 25 <= run < 60 and int(cells[-2]) == 0, cells  # 25 ms + 1 ms per extra robot, then the chunks
    assert "compute floor of one robot's request (simulated GPU): 25.00 ms" in result.stdout


def test_the_vlm_backbone_batching_bench_runs_and_both_ways_agree(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import vlm_backbone_batching as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert bench.main(["--robots", "3", "--repeats", "1", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| vlm")]
    assert len(rows) == 2
    assert all(float(row.split("|")[-2]) < 1e-5 for row in rows)  # max difference between the two ways


def test_the_cpu_threads_bench_runs_and_keeps_its_busy_processes_to_itself():
    """Its busy processes end with it (a leftover would slow every later test on this host)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_threads.py"), "--threads", "1",
                             "--busy", "1", "--concurrency", "1", "--rounds", "1", "--seconds", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| 1 | 1 | 1 |")]
    assert len(rows) == 1 and float(rows[0][3]) > 0 and rows[0][5] == "0", result.stdout[-2000:]
    leftover = subprocess.run(["pgrep", "-f", cpu_threads.BUSY_MARKER], capture_output=True, text=True).stdout.split()
    assert not leftover, leftover


@pytest.mark.parametrize("killed", ["while it spins", "before it starts"])
def test_the_cpu_threads_bench_busy_processes_end_with_their_parent(killed):
    """A bench killed before its cleanup (a timeout's SIGKILL) leaves no process spinning on the host, also when it
    is killed before the busy process's interpreter has started (a busy host; before, the busy process then took
    init for its parent and spun for good)."""
    spawn = f"import os, subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {cpu_threads.BUSY_CODE!r}, " \
            f"str(os.getpid())])\n"
    parent = subprocess.Popen([sys.executable, "-c", spawn + ("time.sleep(60)" if killed == "while it spins" else
                                                              "os.kill(os.getpid(), 9)")])
    try:
        deadline = time.monotonic() + 20
        while killed == "while it spins" and not busy_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert killed != "while it spins" or busy_pids(), "the busy process did not start"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while busy_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not busy_pids()


def busy_pids() -> list[str]:
    return subprocess.run(["pgrep", "-f", cpu_threads.BUSY_MARKER], capture_output=True, text=True).stdout.split()


def test_the_refusal_cost_bench_refuses_every_request_both_ways():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "refusal_cost.py"), "--requests", "300",
                             "--rounds", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| 1 \| (.+) \| ([\d.]+) µs \|$", result.stdout, flags=re.M)
    assert [label for label, _ in rows] == ["a line each", "sampled, 20 lines a second"], result.stdout
    assert all(float(us) > 0 for _, us in rows)


def _overload_bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import overload
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return overload


def test_the_overload_bench_clients_do_not_collect_garbage_during_a_phase(monkeypatch):
    """The overload bench's client stands in for a thousand robots: a collection of its own would pause every
    request in flight and count as the server's latency, so its collector is off while a phase runs and collects
    after it (bench/overload.py, ``phase_without_collections``)."""
    import gc
    import weakref

    overload = _overload_bench()

    class Cycle:
        def __init__(self):
            self.me = self

    assert gc.isenabled()
    with overload.phase_without_collections():
        assert not gc.isenabled()
        garbage = weakref.ref(Cycle())
        more = [weakref.ref(Cycle()) for _ in range(50 * gc.get_threshold()[0])]  # enough to collect many times over
        assert garbage() is not None and all(ref() is not None for ref in more)
    assert gc.isenabled() and garbage() is None and not any(ref() for ref in more)  # collected once it is over
    gc.disable()
    try:
        with overload.phase_without_collections():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()

    # A phase as the bench runs it (no server: its readings stubbed): the collector is off while its body runs.
    monkeypatch.setattr(overload, "scrape", lambda base: {})
    monkeypatch.setattr(overload, "server_cpu_s", lambda base: 0.0)
    monkeypatch.setattr(overload, "main_thread_cpu_s", lambda base: None)
    seen = []

    async def body(pool):
        seen.append(gc.isenabled())

    overload.run_phase("http://127.0.0.1:1", overload.Phase("stub", "", 1.0), body)
    assert seen == [False] and gc.isenabled()


def test_the_overload_bench_histogram_of_the_accepted_latencies(capsys):
    """Each accepted latency in the bucket up to its bound, in multiples of the round's unloaded p50; past 3×
    counted as the slow 200s are; a round without an unloaded p50 has no histogram (not every latency in ≤ 1×)."""
    import json

    overload = _overload_bench()
    assert overload.TAIL_BUCKETS == (1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
    assert overload.tail_histogram([4.0, 5.0, 7.0, 12.0, 12.1, 30.0, 50.0], 4.0) == [1, 1, 1, 1, 1, 1, 1]
    assert overload.tail_histogram([4.0], float("nan")) is None and overload.past_goal([4.0], float("nan")) is None

    def phase(*latencies_ms):
        p = overload.Phase("p", "", 1.0)
        p.outcomes = [overload.Outcome(0.0, ms / 1000, "200") for ms in latencies_ms]
        return p

    measured, unmeasured = overload.Round(1), overload.Round(2)
    measured.unloaded, measured.overload = phase(4.0, 4.0, 4.0), phase(4.0, 5.0, 7.0, 12.0, 12.1, 30.0, 50.0)
    unmeasured.unloaded, unmeasured.overload = phase(), phase(4.0)
    overload.print_tail_histograms([measured, unmeasured])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or
            line.startswith("| 2 |")]
    assert rows[0] == "| 1 | 4.0 ms | " + " | ".join(["1 (14.3 %)"] * 7) + " | 3 (42.9 %) |", rows
    assert rows[1] == "| 2 | - ms | " + " | ".join(["-"] * 8) + " |", rows
    figures = json.loads(json.dumps(overload.histogram_figures(measured)))
    assert figures == {"bounds": [1.0, 1.5, 2.0, 3.0, 5.0, 10.0], "counts": [1] * 7, "past_3x": 3}
    assert json.loads(json.dumps(overload.histogram_figures(unmeasured)))["counts"] is None
