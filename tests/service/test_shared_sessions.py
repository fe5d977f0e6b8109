"""Robot sessions shared by replicas through Redis (``VLA_SESSION_STORE``, service/shared_sessions.py): robots whose
steps land on two server processes in turn, one of them killed and restarted mid-episode, get the actions of a
session that never left one process; the store refuses interleaved steps, oversized states, and reports expiry."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Optional

import httpx
import numpy as np
import pytest

from service import DeploymentSpec
from service.shared_sessions import SharedSessionStates, pack_state, unpack_state
from tests.service.conftest import serving
from tests.service.live_server import free_port, live_server_process
from tests.service.test_admin import allowed_root
from tests.service.test_sessions import current, without_timing

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


def test_a_stale_version_never_overwrites_a_newer_step_nor_another_key_s_session(redis_url):
    import asyncio

    from service.shared_sessions import CONFLICT, TAKEN

    async def scenario():
        store = SharedSessionStates(redis_url, idle_timeout_s=60, max_state_bytes=2**20, prefix="vla:test-cas:")
        state = {"seed": 3, "history": {"frames": {"cam": {7: np.arange(6, dtype=np.uint8).reshape(2, 3)}}}}
        blob = pack_state(state)

        def save(version, owner=None, step=7):
            return store.save("s", version, owner, "policy", "ckpt", blob, {"last_step": step}, time.time(), 1)

        first = await save(0)
        second = await save(first, step=8)
        late = await save(first, step=9)  # a replica that missed the second
        theirs = await save(second, owner="bob", step=9)  # another key, with the right version
        stored = await store.load("s")
        await store.forget("s")
        reborn = await save(0, step=0)  # a new session under the same id: its version is new too
        await store.close()
        return first, second, late, theirs, stored, reborn

    first, second, late, theirs, stored, reborn = asyncio.run(scenario())
    assert second > first and (late, theirs) == (CONFLICT, TAKEN) and reborn > second
    assert stored.version == second and stored.info == {"last_step": 8} and stored.checkpoint == "ckpt"
    np.testing.assert_array_equal(stored.state["history"]["frames"]["cam"][7], np.arange(6).reshape(2, 3))
    assert unpack_state(pack_state({1: {2: [3]}})) == {1: {2: [3]}}  # int keys survive


def test_a_load_reads_the_state_in_the_round_trip_of_its_details_when_the_caller_holds_no_copy(redis_url):
    """A replica's step loads the session: a replica with no copy of it (a robot's first step there) reads the
    details and the state in one round trip to the store (before: two); one with a copy reads the details, and
    the state only when its copy is another version (a second trip, of one version's details and state); a read of
    the details only is one trip, and so is a session not stored. The state never passes through a Lua script
    (Redis is single-threaded: copying megabytes through Lua held it 60-100 times longer)."""
    import asyncio

    async def scenario():
        store = SharedSessionStates(redis_url, idle_timeout_s=60, max_state_bytes=2**20, prefix="vla:test-load:")
        state = {"seed": 3, "history": {"frames": {"cam": {7: np.arange(6, dtype=np.uint8).reshape(2, 3)}}}}
        version = await store.save("s", 0, "alice", "policy", "ckpt", pack_state(state), {"last_step": 7},
                                   time.time(), 1)
        trips, execute = [], store.redis.execute_command

        async def counted(*args, **kwargs):
            trips[-1].append(args[0])
            return await execute(*args, **kwargs)

        store.redis.execute_command = counted
        loads = {}
        for name, call in (("none held", store.load("s")), ("stale", store.load("s", known_version=version - 1)),
                           ("held", store.load("s", known_version=version)),
                           ("details", store.load("s", with_state=False)), ("absent", store.load("other"))):
            trips.append([])
            loads[name] = await call
        store.redis.execute_command = execute
        await store.forget("s")
        await store.close()
        return version, loads, dict(zip(loads, trips))

    version, loads, trips = asyncio.run(scenario())
    assert trips == {"none held": ["HMGET"], "stale": ["HMGET", "HMGET"], "held": ["HMGET"], "details": ["HMGET"],
                     "absent": ["HMGET"]}, trips
    for name in ("none held", "stale"):
        np.testing.assert_array_equal(loads[name].state["history"]["frames"]["cam"][7], np.arange(6).reshape(2, 3))
    assert loads["held"].state is None and loads["details"].state is None and loads["absent"] is None
    for name in ("none held", "stale", "held", "details"):
        stored = loads[name]
        assert (stored.version, stored.owner, stored.model, stored.checkpoint, stored.info, stored.requests) == \
            (version, "alice", "policy", "ckpt", {"last_step": 7}, 1), name


def test_keeping_a_session_keeps_its_marker_too(redis_url):
    """A robot's open websocket keeps its stored session (``keep``) without saving it; the session's marker must be
    kept alike, or a connection open longer than the marker's life would leave a session that outlives it, and
    after the session expired its robot would silently get a fresh history instead of ``session_gone``."""
    import asyncio

    async def scenario():
        store = SharedSessionStates(redis_url, idle_timeout_s=60, max_state_bytes=2**20, prefix="vla:test-keep:")
        state_key, seen_key = store._keys("s")
        await store.save("s", 0, None, "policy", "ckpt", pack_state({"seed": 1}), {}, time.time(), 1)
        await store.redis.pexpire(state_key, 500)
        await store.redis.pexpire(seen_key, 500)  # as if the connection had been open for nearly the marker's life
        await store.keep("s")
        ttls = await store.redis.pttl(state_key), await store.redis.pttl(seen_key)
        await store.forget("s")
        await store.close()
        return ttls, store.ttl_ms, store.seen_ttl_ms

    (state_ttl, seen_ttl), ttl_ms, seen_ttl_ms = asyncio.run(scenario())
    assert ttl_ms - 5_000 < state_ttl <= ttl_ms
    assert seen_ttl_ms - 5_000 < seen_ttl <= seen_ttl_ms and seen_ttl > state_ttl


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
        deleted = client.delete("/sessions/sleepy")  # gone, as it is without a store (not "unknown")
        assert deleted.status_code == 409 and deleted.json()["error"]["type"] == "session_gone", deleted.text
        reset = client.post("/sessions/sleepy/reset", json={"seed": 5})
        assert reset.status_code == 200, reset.text
        assert without_timing(reset.json()) == {"session_id": "sleepy", "model": "policy", "reset": True,
                                                "seed": 5}  # as any reset
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


# ----------------------------------------------------------------------------- two replicas in this process


@pytest.fixture
def replicas(policy_spec, redis_url, request):
    """Two apps (replicas) on one emptied Redis database, with two API keys."""
    from contextlib import ExitStack

    url = database(redis_url, 3)
    with ExitStack() as stack:
        yield [stack.enter_context(serving(policy_spec, session_store=url, api_keys="alice-key,bob-key"))
               for _ in range(2)]


ALICE, BOB = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}


def step_on(client, session_id, k, headers=ALICE):
    return client.post(f"/sessions/{session_id}/step", json={"observation": current(k), "step": k}, headers=headers)


def test_another_key_can_neither_take_nor_delete_a_session_on_any_replica(replicas):
    a, b = replicas
    assert step_on(a, "arm", 0).status_code == 200
    taken = step_on(b, "arm", 1, headers=BOB)  # bob on the other replica, which holds no copy of it
    assert taken.status_code == 409 and "taken" in taken.json()["error"]["message"]
    assert b.delete("/sessions/arm", headers=BOB).status_code == 404
    assert b.post("/sessions/arm/reset", json={}, headers=BOB).status_code == 404
    assert b.get("/sessions", headers=BOB).json()["sessions"] == []
    assert step_on(b, "arm", 1).status_code == 200  # alice, on the replica bob tried: hers still, history and all
    assert [s["session_id"] for s in a.get("/sessions", headers=ALICE).json()["sessions"]] == ["arm"]


def test_an_expired_sessions_id_stays_its_keys_until_its_robot_resets_it(policy_spec, redis_url):
    """Expired in the store, alice's session id is not bob's to take while its marker lives: her robot is told
    ``session_gone``, resets the same id and goes on."""
    with serving(policy_spec, session_store=database(redis_url, 4), session_idle_timeout_s=1.0,
                 api_keys="alice-key,bob-key") as client:
        assert step_on(client, "arm", 0).status_code == 200
        time.sleep(1.5)
        taken = step_on(client, "arm", 0, headers=BOB)
        assert taken.status_code == 409 and "taken" in taken.json()["error"]["message"], taken.text
        assert step_on(client, "arm", 1).json()["error"]["type"] == "session_gone"
        assert client.post("/sessions/arm/reset", json={}, headers=ALICE).status_code == 200
        assert step_on(client, "arm", 0).status_code == 200


def test_a_session_deleted_on_one_replica_starts_anew_on_the_other_which_held_a_copy(replicas):
    a, b = replicas
    for k in range(5):
        assert step_on(a, "arm", k).status_code == 200  # a holds the session at step 4
    assert b.delete("/sessions/arm", headers=ALICE).status_code == 200
    assert step_on(b, "arm", 0).status_code == 200  # a new session under the same id, on b
    again = step_on(a, "arm", 1)  # a's copy (step 4) must not pass for it: step 1 follows the new one's step 0
    assert again.status_code == 200, again.text
    listed = b.get("/sessions", headers=ALICE).json()["sessions"]
    assert [(s["session_id"], s["last_step"]) for s in listed] == [("arm", 1)]


def test_a_session_made_again_on_another_deployment_is_stepped_there_by_a_replica_holding_an_old_copy(
        tiny_checkpoints, redis_url):
    """Replica a holds a copy of session "arm" on deployment p1; replica b deletes it and makes it again on p2. A
    step that names no model goes to the session's deployment, on either replica: the store says which, not a's
    copy (before, a refused every such step with 409 for good, its copy never expiring)."""
    from contextlib import ExitStack

    checkpoint = str(tiny_checkpoints["diffusion_policy"])
    specs = [DeploymentSpec(name="p1", checkpoint=checkpoint), DeploymentSpec(name="p2", checkpoint=checkpoint)]

    def step_(client, k, model=None):
        return client.post("/sessions/arm/step", json={"observation": current(k), "step": k,
                                                       **({"model": model} if model else {})})

    with ExitStack() as stack:
        a, b = (stack.enter_context(serving(*specs, session_store=database(redis_url, 13))) for _ in range(2))
        assert step_(a, 0, "p1").status_code == 200
        assert b.delete("/sessions/arm").status_code == 200
        assert step_(b, 0, "p2").status_code == 200
        for client, k in ((b, 1), (a, 2), (a, 3)):
            reply = step_(client, k)
            assert reply.status_code == 200 and reply.json()["model"] == "p2", reply.text
        assert [s["model"] for s in a.get("/sessions").json()["sessions"]] == ["p2"]


def test_a_reset_on_a_replica_that_holds_an_expired_copy_starts_the_new_episode(policy_spec, redis_url):
    url = database(redis_url, 4)
    with serving(policy_spec, session_store=url, session_idle_timeout_s=1.0) as a, \
            serving(policy_spec, session_store=url, session_idle_timeout_s=1.0) as b:
        assert step_on(a, "arm", 0, headers={}).status_code == 200
        time.sleep(1.5)
        gone = step_on(b, "arm", 1, headers={})
        assert gone.status_code == 409 and gone.json()["error"]["type"] == "session_gone"
        assert a.post("/sessions/arm/reset", json={"seed": 9}, headers={}).status_code == 200
        assert step_on(b, "arm", 0, headers={}).status_code == 200  # the new episode, on the other replica


def twin_sessions(client) -> list[dict]:
    """Sessions "steady" and "bumpy", each made and then reset to seed 4; steady's steps 0-3, to compare with."""
    for name in ("steady", "bumpy"):
        assert client.post(f"/sessions/{name}/step", json={"observation": current(0), "step": 0}).status_code == 200
        assert client.post(f"/sessions/{name}/reset", json={"seed": 4}).status_code == 200
    return [step_on(client, "steady", k, headers={}).json() for k in range(4)]


def test_a_step_the_store_did_not_take_is_not_counted_twice(policy_spec, redis_url, monkeypatch):
    """The store fails once as a step is pushed (503): the session is reloaded from the store, so the step sent
    again gives what a session that never failed gives."""
    with serving(policy_spec, session_store=database(redis_url, 5)) as client:
        steady = twin_sessions(client)
        save, failures = SharedSessionStates.save, []

        async def failing_once(self, *args, **kwargs):
            if not failures:
                failures.append(1)
                raise ConnectionError("the store went away for a moment")
            return await save(self, *args, **kwargs)

        bumpy = [step_on(client, "bumpy", 0, headers={}).json()]
        monkeypatch.setattr(SharedSessionStates, "save", failing_once)
        failed = step_on(client, "bumpy", 1, headers={})
        assert failed.status_code == 503 and "VLA_SESSION_STORE" in failed.json()["error"]["message"]
        bumpy += [step_on(client, "bumpy", k, headers={}).json() for k in (1, 2, 3)]
    assert [(s["action"], s["replanned"], s["plan_step"]) for s in bumpy] == \
        [(s["action"], s["replanned"], s["plan_step"]) for s in steady]


def test_a_session_made_on_another_checkpoint_is_not_continued(tiny_checkpoints, redis_url, tmp_path):
    """One replica reloaded with another checkpoint under the same deployment name: its sessions are reported gone
    there, not continued on weights and plans they were not made with."""
    url = database(redis_url, 6)
    other = tmp_path / "other-policy"
    shutil.copytree(tiny_checkpoints["diffusion_policy"], other)
    old = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    new = DeploymentSpec(name="policy", checkpoint=str(other))
    with serving(old, session_store=url) as a, serving(new, session_store=url) as b:
        assert step_on(a, "arm", 0, headers={}).status_code == 200
        moved = step_on(b, "arm", 1, headers={})
        assert moved.status_code == 409 and "another checkpoint" in moved.json()["error"]["message"]
        assert b.post("/sessions/arm/reset", json={}, headers={}).status_code == 200  # a new episode on b's
        assert step_on(b, "arm", 0, headers={}).status_code == 200


def test_a_websocket_s_own_session_leaves_the_store_with_the_connection(policy_spec, redis_url):
    import msgpack

    from tests.service.test_robot_ws import flat_observation

    url = database(redis_url, 7)
    with serving(policy_spec, session_store=url) as client:
        with client.websocket_connect("/ws/diffusion_policy") as ws:
            ws.receive_bytes()  # the metadata
            ws.send_bytes(msgpack.packb(flat_observation(), use_bin_type=True))
            assert "actions" in msgpack.unpackb(ws.receive_bytes())
            assert len(client.get("/sessions").json()["sessions"]) == 1
        deadline = time.monotonic() + 5
        while client.get("/sessions").json()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/sessions").json()["sessions"] == []


def test_a_save_whose_reply_was_lost_but_landed_keeps_its_step_once(policy_spec, redis_url, monkeypatch):
    """The connection drops after the store took the step: the step is kept (200), not applied twice."""
    with serving(policy_spec, session_store=database(redis_url, 8)) as client:
        steady = twin_sessions(client)
        save, lost = SharedSessionStates.save, []

        async def landing_then_lost(self, *args, **kwargs):
            version = await save(self, *args, **kwargs)
            if not lost:
                lost.append(version)
                raise ConnectionError("the reply was lost")
            return version

        bumpy = [step_on(client, "bumpy", 0, headers={}).json()]
        monkeypatch.setattr(SharedSessionStates, "save", landing_then_lost)
        bumpy += [step_on(client, "bumpy", k, headers={}).json() for k in (1, 2, 3)]
        assert lost and [s["requests"] for s in client.get("/sessions").json()["sessions"]
                         if s["session_id"] == "bumpy"] == [5]  # its first step, then steps 0-3 (a reset is no
        # request of the episode, as without a store): each once
    assert [(s["action"], s["replanned"], s["plan_step"]) for s in bumpy] == \
        [(s["action"], s["replanned"], s["plan_step"]) for s in steady]


def test_a_store_that_fails_to_answer_is_a_503_on_every_session_route(policy_spec, redis_url, monkeypatch):
    from redis.exceptions import ConnectionError as RedisConnectionError

    url = database(redis_url, 9)
    with serving(policy_spec, session_store=url) as client:
        assert step_on(client, "arm", 0, headers={}).status_code == 200

        async def down(*args, **kwargs):
            raise RedisConnectionError("Connection refused")

        for name in ("load", "listed", "seen"):
            monkeypatch.setattr(SharedSessionStates, name, down)
        replies = [step_on(client, "arm", 1, headers={}), step_on(client, "other", 0, headers={}),
                   client.get("/sessions"), client.delete("/sessions/arm"),
                   client.post("/sessions/arm/reset", json={})]
        assert [r.status_code for r in replies] == [503] * 5, [r.text for r in replies]
        assert all("VLA_SESSION_STORE" in r.json()["error"]["message"] for r in replies)


def test_a_store_that_never_answers_fails_the_check_within_seconds():
    """A Redis address that accepts connections and never answers (a hung host): the start-up check raises after
    the store's 5 s socket timeout instead of hanging the replica's start."""
    import asyncio
    import socket

    import redis

    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody reads or answers
    try:
        store = SharedSessionStates(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", idle_timeout_s=60,
                                    max_state_bytes=2**20)

        async def check() -> float:
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await asyncio.wait_for(store.check(), 30)
            await store.close()
            return time.monotonic() - started

        assert asyncio.run(check()) < 10
    finally:
        silent.close()


def test_a_chunk_sent_again_to_the_other_replica_gets_its_answer(replicas):
    """Chunk mode: a request whose reply was lost, sent again with its step number to another replica, gets the
    chunk it got there (the answer travels in the stored state) and is planned once."""
    a, b = replicas

    def chunk_on(client, k: int) -> dict:
        reply = client.post("/predict/diffusion_policy", json={"observation": current(k), "session_id": "arm",
                                                               "step": k}, headers=ALICE)
        assert reply.status_code == 200, reply.text
        return reply.json()

    first, again = chunk_on(a, 0), chunk_on(b, 0)
    assert {k: again[k] for k in ("action_chunk", "seed", "step", "valid_until")} == \
        {k: first[k] for k in ("action_chunk", "seed", "step", "valid_until")}
    assert chunk_on(b, 2)["seed"] == first["seed"] + 1  # the next plan: the first was planned once
    assert [s["plans"] for s in a.get("/sessions", headers=ALICE).json()["sessions"]] == [2]


# ----------------------------------------------------------------------------- a robot connected by websocket


def connected(client, session_id: str, steps: int = 1, headers: Optional[dict] = None):
    """A websocket on ``session_id`` that has stepped its session ``steps`` times (the last reply's step > 0 after
    more than one)."""
    import msgpack

    from tests.service.test_robot_ws import flat_observation

    url = f"/ws/diffusion_policy?session_id={session_id}"
    ws = client.websocket_connect(url, headers=dict(headers or {})).__enter__()
    ws.receive_bytes()
    for k in range(steps):
        ws.send_bytes(msgpack.packb(flat_observation(k), use_bin_type=True))
        assert "step" in msgpack.unpackb(ws.receive_bytes())
    return ws


def next_frame(ws) -> dict:
    """The reply to one more observation: {"bytes": ...} for an answer, {"text": ...} for a refusal."""
    import msgpack

    from tests.service.test_robot_ws import flat_observation

    ws.send_bytes(msgpack.packb(flat_observation(9), use_bin_type=True))
    return ws.receive()


def test_a_websocket_whose_session_is_deleted_is_told_on_this_replica_and_the_other(replicas):
    """As without a store: the robot's next frame gets 'was deleted ... connect again' (before, its session silently
    began a new history), whether the session was deleted on the replica it is connected to or on another."""
    a, b = replicas
    for deleter in (a, b):
        ws = connected(a, "arm", steps=3, headers=ALICE)
        try:
            assert deleter.delete("/sessions/arm", headers=ALICE).status_code == 200
            reply = next_frame(ws)
            assert "was deleted" in (reply.get("text") or ""), reply
        finally:
            ws.__exit__(None, None, None)


@pytest.fixture(scope="module")
def policies(tiny_checkpoints, tmp_path_factory):
    return allowed_root(tiny_checkpoints, tmp_path_factory)


def test_a_websocket_open_across_a_reload_is_not_continued_on_the_new_checkpoint(policies, redis_url):
    """The session was made on the old checkpoint: the robot's next frame is told ``session_gone`` (before, with a
    store, its history went on on the new weights)."""
    roots = policies  # (an allowed root holding two checkpoints of the policy)
    with serving(DeploymentSpec(name="policy", checkpoint=str(roots / "policy-a")),
                 session_store=database(redis_url, 10), admin_keys="admin-key", checkpoint_roots=str(roots)) as client:
        ws = connected(client, "arm")
        try:
            reloaded = client.post("/admin/deployments/policy/reload", json={"checkpoint": str(roots / "policy-b")},
                                   headers={"Authorization": "Bearer admin-key"})
            assert reloaded.status_code == 200, reloaded.text
            reply = next_frame(ws)
            assert "reloaded with another checkpoint" in (reply.get("text") or ""), reply
        finally:
            ws.__exit__(None, None, None)


def test_an_open_websocket_keeps_its_session_in_the_store_while_its_robot_pauses(policy_spec, redis_url):
    """A session with an open websocket does not expire (README): in the store either, though its robot sends
    nothing for longer than the idle timeout (before, its next frame was refused: expired in the store)."""
    import msgpack

    with serving(policy_spec, session_store=database(redis_url, 11), session_idle_timeout_s=1.0) as client:
        ws = connected(client, "arm", steps=2)
        try:
            time.sleep(1.6)
            reply = next_frame(ws)
            assert reply.get("bytes") is not None, reply.get("text")
            assert msgpack.unpackb(reply["bytes"])["step"] > 0
        finally:
            ws.__exit__(None, None, None)


def test_a_session_deleted_elsewhere_starts_anew_with_its_own_count_age_and_seed(replicas):
    """A replica that held a copy of a session deleted on another makes the new session under its id as a replica
    without a copy does (before, it kept the deleted episode's request count, creation time and seed)."""
    a, b = replicas
    for k in range(4):
        assert step_on(a, "arm", k).status_code == 200
    assert a.post("/sessions/arm/reset", json={"seed": 1234}, headers=ALICE).status_code == 200
    assert b.delete("/sessions/arm", headers=ALICE).status_code == 200
    started = time.time()
    first = a.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "arm"}, headers=ALICE)
    assert first.status_code == 200 and first.json()["seed"] != 1234, first.text
    (new,) = a.get("/sessions", headers=ALICE).json()["sessions"]
    assert new["requests"] == 1 and new["created"] >= started - 0.05, new
