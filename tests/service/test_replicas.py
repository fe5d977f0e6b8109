"""``vla-foundry serve --replicas``: one address, a process per replica, each given its GPUs; ``/models`` shows where
every replica runs. This host has no GPU, so the replicas are "given" GPU names that CUDA cannot open here: each sees
``CUDA_VISIBLE_DEVICES`` set to its own and runs on the CPU, which is what the launch plan decides and shows."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest

from service.cli import serve_command
from service.launcher import replica_plan, visible_gpus
from service.settings import Settings
from tests.service.live_server import live_server_process
from tests.service.test_sessions import current
from tests.service.test_shared_sessions import redis_url  # noqa: F401  (a fixture: a Redis of this module's)


def test_the_plan_gives_each_replica_its_gpus(monkeypatch):
    assert replica_plan("per-gpu", 1, ["0", "1"]) == ["0", "1"]
    assert replica_plan("per-gpu", 2, ["0", "1"]) == ["0", "0", "1", "1"]  # small policies: two per GPU
    assert replica_plan("3", 1, ["GPU-a", "GPU-b"]) == ["GPU-a", "GPU-b", "GPU-a"]  # a count: the GPUs in turn
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert replica_plan("2", 1, []) == ["", ""]  # CPU replicas: GPUs hidden (on a host without any, no change)
    with pytest.raises(ValueError, match="--replicas N for N CPU replicas"):
        replica_plan("per-gpu", 1, [])
    assert visible_gpus("none") == [] and visible_gpus(" 0, 2 ") == ["0", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")
    assert visible_gpus(None) == ["GPU-a", "GPU-b"]
    assert replica_plan("2", 1, visible_gpus("none")) == ["", ""]  # GPUs hidden from CPU replicas on a GPU host
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert replica_plan("2", 1, visible_gpus("none")) == ["", ""]  # also when the launcher's variable is unset
    for bad in ("", " , ", "0,0"):
        with pytest.raises(ValueError, match="names no GPU or one twice"):
            visible_gpus(bad)


def test_replica_settings_are_checked(monkeypatch):
    monkeypatch.setenv("VLA_REPLICAS", "per-gpu")
    assert Settings.load().replicas == "per-gpu"
    assert Settings.load(replicas="2").replicas == 2
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="replicas"):
            Settings.load(replicas=bad)
    monkeypatch.delenv("VLA_REPLICAS")
    with pytest.raises(ValueError, match=r"gpus \('0,1'\) names the GPUs of replicas, and replicas is 1"):
        Settings.load(gpus="0,1")  # one server process would ignore it
    assert Settings.load(gpus="0,1", replicas="2").gpus == "0,1"
    monkeypatch.setenv("VLA_GPUS", "0,1")  # with replicas from the command line: checked once both are applied
    assert Settings.load(replicas="2").gpus == "0,1"


def replicas_seen(base: str, expected: int, timeout: float = 90) -> dict[int, dict]:
    """Each replica's own view (``replica``), by index, from new connections until ``expected`` have answered
    with every deployment ready and each lists all of them in ``replicas``."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with httpx.Client(base_url=base, timeout=30) as client:  # a new connection: any replica may accept it
            body = client.get("/models").json()
        mine = body["replica"]
        if all(d["status"] == "ready" for d in mine["deployments"]) and len(body["replicas"]) == expected:
            seen[mine["index"]] = body
        if len(seen) == expected:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"replicas seen: {sorted(seen)} of {expected}")


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (make test installs it from Debian)")
def test_replicas_per_gpu_behind_one_address(tiny_checkpoints, redis_url, tmp_path):  # noqa: F811
    """Two replicas, one per (named) GPU: both answer on the one port, ``/models`` shows each with its GPU from
    either; one killed is started again while the other serves; SIGTERM drains both."""
    policy = tiny_checkpoints["diffusion_policy"]
    args = ["--checkpoint", f"{policy}=policy", "--replicas", "per-gpu", "--gpus", "0,1"]
    env = {"VLA_SESSION_STORE": redis_url, "VLA_MAX_BATCH_SIZE": "1"}
    log = tmp_path / "launch.log"
    with live_server_process(args, tmp_path, env=env, log_path=log) as (base, launcher):
        seen = replicas_seen(base, 2)
        for index, body in seen.items():
            mine = body["replica"]
            assert (mine["gpus"], mine["launcher"]) == (str(index), "vla-foundry serve --replicas")
            assert body["replica"]["deployments"] == [{"name": "policy", "status": "ready", "device": "cpu"}]
            assert [(r["index"], r["gpus"]) for r in body["replicas"]] == [(0, "0"), (1, "1")]
        pids = {i: seen[i]["replica"]["pid"] for i in seen}
        assert launcher.pid not in pids.values() and len(set(pids.values())) == 2

        reply = httpx.post(f"{base}/sessions/robot/step", json={"observation": current(0), "step": 0}, timeout=60)
        assert reply.status_code == 200, reply.text

        os.kill(pids[0], signal.SIGKILL)  # a replica dies: the launcher starts it again, the other serves meanwhile
        deadline = time.monotonic() + 90
        while True:  # the new replica 0 is listed once it has loaded; the dead one drops out (15 s unannounced)
            body = httpx.get(f"{base}/models", timeout=30).json()
            # whichever replica answers has loaded: one still loading takes no connection
            assert all(d["status"] == "ready" for d in body["replica"]["deployments"]), body["replica"]
            listed = body["replicas"]
            restarted = [r for r in listed if r["index"] == 0 and r["pid"] != pids[0]]
            if restarted and len(listed) == 2 and restarted[0]["deployments"][0]["status"] == "ready":
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        for k in (1, 2):  # the robot's session goes on wherever its steps land
            reply = httpx.post(f"{base}/sessions/robot/step", json={"observation": current(k), "step": k}, timeout=60)
            assert reply.status_code == 200 and reply.json()["step"] == k, reply.text
        children = [pids[1], restarted[0]["pid"]]
        signalled = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=90) == 0
        assert time.monotonic() - signalled < 20 and "did not drain" not in log.read_text()  # drained, not killed
    for pid in children:  # no replica outlives its launcher
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_replica_with_a_wrong_configuration_ends_the_launch(tiny_checkpoints, tmp_path):
    """``cuda:1`` on replicas given one GPU each: every replica would fail the same way, so the launch ends (2)
    instead of restarting them for ever."""
    serve = [*serve_command(), "serve", "--checkpoint", str(tiny_checkpoints["diffusion_policy"]), "--port", "0"]
    env = {**os.environ, "VLA_DEMO_DIR": str(tmp_path)}
    result = subprocess.run([*serve, "--replicas", "2", "--gpus", "0,1", "--device", "cuda:1"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "this replica was given 1 GPU(s)" in result.stderr and "--gpus" in result.stderr
    plan = subprocess.run([*serve, "--replicas", "per-gpu", "--gpus", "none"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert plan.returncode == 2 and "no GPU is visible" in plan.stderr


def test_warnings_about_the_whole_launch_are_logged_once_not_once_per_replica(tmp_path):
    """A misspelt variable and a server open to the network without keys concern the launch: its launcher says
    so, and its replicas (which read the same environment and settings) do not say it again."""
    log = tmp_path / "launch.log"
    env = {**os.environ, "VLA_DEMO_DIR": str(tmp_path), "VLA_MAX_QUEU": "3"}
    command = [*serve_command(), "serve", "--checkpoint", str(tmp_path / "missing"), "--replicas", "2", "--host",
               "0.0.0.0", "--port", "0"]  # (a missing checkpoint fails at once: each replica starts in seconds)
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while log.read_text().count("Application startup complete") < 2:  # both replicas are past their start
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
    text = log.read_text()
    assert text.count("VLA_MAX_QUEU is not a setting of this server and is ignored") == 1, text[-3000:]
    assert text.count("serving on 0.0.0.0 without API keys") == 1, text[-3000:]
    assert text.count("several replicas without VLA_SESSION_STORE") == 1, text[-3000:]


class LoadingManager:
    """Stands in for a DeploymentManager: loading until ``loaded_after`` readiness checks (None: for ever)."""

    def __init__(self, loaded_after=None):
        self.checks, self.loaded_after = 0, loaded_after

    def readiness(self):
        self.checks += 1
        loading = self.loaded_after is None or self.checks <= self.loaded_after
        return not loading, {"status": "loading" if loading else "ready",
                             "deployments": {"policy": "loading" if loading else "ready"}}


def test_a_replica_starts_listening_once_loaded_and_not_at_all_when_stopped_while_loading():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.replicas import hold_startup_until_loaded

    app = FastAPI()
    app.state.manager = LoadingManager(loaded_after=3)
    hold_startup_until_loaded(app)
    with TestClient(app):  # entering runs the start-up: it returns once loaded
        assert app.state.manager.checks == 4
    stopped = FastAPI()
    stopped.state.manager = LoadingManager()
    hold_startup_until_loaded(stopped, stopping=lambda: stopped.state.manager.checks >= 2)
    with pytest.raises(RuntimeError, match="stopped while loading"):
        with TestClient(stopped):
            pass


def test_per_gpu_on_ray_counts_node_by_node(monkeypatch):
    ray = pytest.importorskip("ray")
    from service.ray_serve import replicas_per_gpu

    nodes = [{"Alive": True, "Resources": {"GPU": 1.0}}, {"Alive": True, "Resources": {"GPU": 1.0}},
             {"Alive": False, "Resources": {"GPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 4.0}}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert replicas_per_gpu(0.5) == 4 and replicas_per_gpu(None) == 2 and replicas_per_gpu(0.4) == 4
    with pytest.raises(ValueError, match="no node of the Ray cluster has 2 GPU"):  # 2 GPUs, but one per node
        replicas_per_gpu(2)
    nodes[:] = [{"Alive": True, "Resources": {"GPU": 2.0}}, {"Alive": True, "Resources": {"GPU": 3.0}}]
    # a fraction fits within one GPU, never across two: 0.4 ⇒ 2 per GPU (not 5 on two GPUs)
    assert replicas_per_gpu(0.4) == 10 and replicas_per_gpu(0.3) == 15 and replicas_per_gpu(2) == 2


def test_ray_refuses_a_fraction_of_gpus_above_one():
    pytest.importorskip("ray")
    from service.ray_serve import app

    with pytest.raises(ValueError, match="num_gpus 1.5: above 1, Ray gives whole GPUs only"):
        app({"num_gpus": "1.5"})


def test_the_replica_directory_leaves_the_store_once_no_replica_announces(redis_url):  # noqa: F811
    """Every announcement gives the directory's keys STALE_AFTER_S to live: a fleet that is gone leaves nothing."""
    import asyncio

    import redis.asyncio

    from service.replicas import STALE_AFTER_S, ReplicaDirectory

    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        directory = ReplicaDirectory(client, "test:")
        await directory.announce({"id": "a", "host": "h"})
        ttls = [await client.ttl(key) for key in (directory.entries, directory.seen)]
        listed = await directory.live()
        await client.aclose()
        return ttls, listed

    ttls, listed = asyncio.run(main())
    assert listed == [{"id": "a", "host": "h"}]
    assert all(0 < ttl <= STALE_AFTER_S for ttl in ttls), ttls  # (-1: no expiry)
