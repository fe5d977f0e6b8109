"""Robot sessions shared by replicas through Redis (``VLA_SESSION_STORE``, service/shared_sessions.py): robots whose
steps land on two server processes in turn, one of them killed and restarted mid-episode, get the actions of a
session that never left one process; the store refuses interleaved steps, oversized states, and reports expiry."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest

from service import DeploymentSpec
from service.shared_sessions import SharedSessionStates, pack_state, unpack_state
from tests.service.conftest import serving
from tests.service.live_server import free_port, live_server_process
from tests.service.test_sessions import current

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make test installs it from Debian)")


@pytest.fixture(scope="module")
def redis_url():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
                             ).stdout.strip() != "PONG":
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture(scope="module")
def policy_config(tiny_checkpoints, tmp_path_factory):
    """A deployment YAML: the tiny policy replanning every second step (so plans are handed out across replicas)."""
    path = tmp_path_factory.mktemp("config") / "serve.yaml"
    path.write_text(f"deployments:\n  - name: policy\n    checkpoint: {tiny_checkpoints['diffusion_policy']}\n"
                    "    open_loop_steps: 2\n")
    return ["--config", str(path)]


POLICY_ENV = {"VLA_MAX_BATCH_SIZE": "1"}  # one robot per call: the same floats as alone


def step(base: str, session_id: str, k: int) -> dict:
    reply = httpx.post(f"{base}/sessions/{session_id}/step", json={"observation": current(k), "step": k}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def seeded(base: str, session_id: str, seed: int) -> None:
    """A session made by one step, then a new episode seeded ``seed``."""
    step(base, session_id, 0)
    reply = httpx.post(f"{base}/sessions/{session_id}/reset", json={"seed": seed}, timeout=30)
    assert reply.status_code == 200 and reply.json()["seed"] == seed, reply.text


def test_robots_keep_their_history_across_two_replicas_one_killed_and_restarted(policy_config, redis_url, tmp_path):
    env = {**POLICY_ENV, "VLA_SESSION_STORE": redis_url}
    robots = range(8)
    steps = 12
    with live_server_process(policy_config, tmp_path / "b", env=env) as (b, _):
        reference = {}
        for i in robots:  # each robot's episode alone on one process: the actions to expect
            seeded(b, f"reference-{i}", 100 + i)
            reference[i] = [step(b, f"reference-{i}", k) for k in range(steps)]
        got: dict[int, list] = {i: [] for i in robots}
        with live_server_process(policy_config, tmp_path / "a", env=env) as (a, first_a):
            for i in robots:
                seeded(a if i % 2 else b, f"robot-{i}", 100 + i)
            for k in range(5):  # each step on the other replica than the robot's last one
                for i in robots:
                    got[i].append(step((a, b)[(i + k) % 2], f"robot-{i}", k))
            listed = httpx.get(f"{b}/sessions").json()["sessions"]
            first_a.kill()  # a replica dies mid-episode: no drain, no goodbye
            first_a.wait()
        for k in range(5, 8):  # the robots go on on the one left
            for i in robots:
                got[i].append(step(b, f"robot-{i}", k))
        with live_server_process(policy_config, tmp_path / "a2", env=env) as (a, _):
            for k in range(8, steps):  # a fresh replica takes its turns again
                for i in robots:
                    got[i].append(step((a, b)[(i + k) % 2], f"robot-{i}", k))
    assert {s["session_id"] for s in listed} >= {f"robot-{i}" for i in robots}  # every replica lists every session
    for i in robots:
        for k, (mine, expected) in enumerate(zip(got[i], reference[i])):
            assert (mine["step"], mine["replanned"], mine["plan_step"]) == \
                (expected["step"], expected["replanned"], expected["plan_step"]), (i, k)
            np.testing.assert_allclose(mine["action"], expected["action"], atol=1e-6, err_msg=f"robot {i} step {k}")
    assert any(r["replanned"] for r in reference[0]) and not all(r["replanned"] for r in reference[0])


def test_a_stale_version_never_overwrites_a_newer_step_and_states_round_trip(redis_url):
    import asyncio

    async def scenario():
        store = SharedSessionStates(redis_url, idle_timeout_s=60, max_state_bytes=2**20, prefix="vla:test-cas:")
        state = {"seed": 3, "history": {"frames": {"cam": {7: np.arange(6, dtype=np.uint8).reshape(2, 3)}}}}
        blob = pack_state(state)
        first = await store.save("s", 0, None, "policy", blob, {"last_step": 7}, time.time(), 1)
        second = await store.save("s", first, None, "policy", blob, {"last_step": 8}, time.time(), 2)
        late = await store.save("s", first, None, "policy", blob, {"last_step": 8}, time.time(), 2)  # a replica behind
        stored = await store.load("s")
        await store.close()
        return first, second, late, stored

    first, second, late, stored = asyncio.run(scenario())
    assert (first, second, late) == (1, 2, None)
    assert stored.version == 2 and stored.info == {"last_step": 8}
    np.testing.assert_array_equal(stored.state["history"]["frames"]["cam"][7], np.arange(6).reshape(2, 3))
    assert unpack_state(pack_state({1: {2: [3]}})) == {1: {2: [3]}}  # int keys survive


@pytest.fixture
def policy_spec(tiny_checkpoints):
    return DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), open_loop_steps=2)


def database(redis_url: str, number: int) -> str:
    """Database ``number`` of the test's Redis, emptied: a test of its own that other tests' sessions stay out of."""
    port = redis_url.split(":")[-1].split("/")[0]
    subprocess.run(["redis-cli", "-p", port, "-n", str(number), "flushdb"], check=True, capture_output=True)
    return redis_url.rsplit("/", 1)[0] + f"/{number}"


def test_a_session_that_expired_in_the_store_is_reported_and_reset(policy_spec, redis_url):
    with serving(policy_spec, session_store=database(redis_url, 1), session_idle_timeout_s=1.0) as client:
        assert client.post("/sessions/sleepy/step", json={"observation": current(0), "step": 0}).status_code == 200
        time.sleep(1.5)
        gone = client.post("/sessions/sleepy/step", json={"observation": current(1), "step": 1})
        assert gone.status_code == 409 and gone.json()["error"]["type"] == "session_gone"
        reset = client.post("/sessions/sleepy/reset", json={"seed": 5})
        assert reset.status_code == 200, reset.text
        again = client.post("/sessions/sleepy/step", json={"observation": current(0), "step": 0})
        assert again.status_code == 200 and again.json()["replanned"]
        listed = client.get("/sessions").json()["sessions"]
        assert [s["session_id"] for s in listed] == ["sleepy"] and listed[0]["last_step"] == 0
        assert client.delete("/sessions/sleepy").status_code == 200
        assert client.get("/sessions").json()["sessions"] == []


def test_a_state_over_the_cap_is_refused_with_the_reason_and_not_kept(policy_spec, redis_url):
    with serving(policy_spec, session_store=database(redis_url, 2), session_state_max_bytes=1024) as client:
        reply = client.post("/sessions/big/step", json={"observation": current(0), "step": 0})
        assert reply.status_code == 413 and "VLA_SESSION_STATE_MAX_BYTES" in reply.json()["error"]["message"]
        assert client.get("/sessions").json()["sessions"] == []


def test_an_unreachable_store_fails_the_start_naming_it(policy_spec):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(deployments=[policy_spec], device="cpu", session_store=f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(RuntimeError, match="VLA_SESSION_STORE"):
        with TestClient(app):
            pass
