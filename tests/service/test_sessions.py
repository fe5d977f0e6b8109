"""Robot sessions: history stacking, reset, idle expiry, the cap, serialization, step mode, freshness."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service import DeploymentSpec
from tests.factories import POLICY_CAMERAS, PREDICT_REQUESTS, png_data_url
from tests.service.conftest import serving


def current(i: int) -> dict:
    """Step i as a robot sends it in a session: one frame per camera, the current [d] row."""
    return {"images": {cam: png_data_url(10 * i + k) for k, cam in enumerate(POLICY_CAMERAS)},
            "lowdim": {"arm__pos": [0.1 * i, -0.2 * i]}, "language_instruction": "pick up the red block"}


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), n_action_steps=2,
                          open_loop_steps=2, control_period_s=0.05, max_observation_age_s=2.0)
    with serving(spec, max_sessions=3, session_idle_timeout_s=60) as c:
        yield c


def overflowing(i: int) -> dict:
    """Step i with positions the policy's actions overflow on: refused in the model call (422)."""
    return dict(current(i), lowdim={"arm__pos": [1e37, 1e37]})


def chunk(client, session_id, i, **fields):
    response = client.post("/predict/diffusion_policy", json={"observation": current(i), "session_id": session_id,
                                                              **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_history_is_stacked_as_the_model_expects(client):
    """Sending one step at a time through a session gives exactly the actions of a stateless request carrying
    the full window: frames t-1 and t0, proprioception rows P+1, and the executed action as past_actions.

    The robot executes two actions per chunk, so step 1 was never sent: its frame and row are those of step 0,
    the nearest earlier step (copy padding), and its action the one planned for it."""
    first = chunk(client, "stack", 0, seed=11, step=0)
    second = chunk(client, "stack", 2, seed=12, step=2)
    executed = np.array(first["action_chunk"])[first["first_action_index"] + 1]  # planned for step 1
    full = {"images": {cam: [current(0)["images"][cam], current(2)["images"][cam]] for cam in POLICY_CAMERAS},
            "lowdim": {"arm__pos": [current(0)["lowdim"]["arm__pos"], current(2)["lowdim"]["arm__pos"]]},
            "language_instruction": "pick up the red block"}
    stateless = client.post("/predict/diffusion_policy", json={
        "observation": full, "seed": 12, "past_actions": {"arm__delta": [executed[:2].tolist()],
                                                          "gripper": [executed[2:].tolist()]}}).json()
    np.testing.assert_allclose(second["action_chunk"], stateless["action_chunk"], atol=1e-6)
    assert second["step"] == 2
    # Every step sent: the window holds step 1's own frame and row.
    chunk(client, "dense", 0, seed=11, step=0)
    chunk(client, "dense", 1, seed=0, step=1)
    dense = chunk(client, "dense", 2, seed=12, step=2)
    full["images"] = {cam: [current(1)["images"][cam], current(2)["images"][cam]] for cam in POLICY_CAMERAS}
    full["lowdim"] = {"arm__pos": [current(1)["lowdim"]["arm__pos"], current(2)["lowdim"]["arm__pos"]]}
    assert not np.allclose(dense["action_chunk"], stateless["action_chunk"], atol=1e-6)


def test_first_step_pads_by_copying_and_default_steps_advance(client):
    first = chunk(client, "pad", 0, seed=5)
    copy = {"images": {cam: [current(0)["images"][cam]] * 2 for cam in POLICY_CAMERAS},
            "lowdim": {"arm__pos": [current(0)["lowdim"]["arm__pos"]] * 2},
            "language_instruction": "pick up the red block"}
    stateless = client.post("/predict/diffusion_policy", json={"observation": copy, "seed": 5}).json()
    np.testing.assert_allclose(first["action_chunk"], stateless["action_chunk"], atol=1e-5)
    assert chunk(client, "pad", 1, seed=6)["step"] == 2  # no step given: last step + n_action_steps


def without_timing(reply: dict) -> dict:
    """A reset's reply less its ``timing_ms``, which every reply carries (DESIGN.md: the reset's had none)."""
    reply = dict(reply)
    timing = reply.pop("timing_ms")
    assert set(timing) == {"total"} and timing["total"] >= 0, timing
    return reply


def test_reset_restarts_the_episode_and_its_seeds(client):
    a = chunk(client, "replay", 0)
    chunk(client, "replay", 1)
    seed = client.post("/sessions/replay/reset", json={"seed": 77}).json()["seed"]
    assert seed == 77
    b = chunk(client, "replay", 0)
    assert b["step"] == 0 and b["seed"] == 77  # plan k uses seed + k
    again = client.post("/sessions/replay/reset", json={"seed": 77})
    assert again.status_code == 200 and chunk(client, "replay", 0)["action_chunk"] == b["action_chunk"]
    assert a["seed"] != 77 or a["action_chunk"] == b["action_chunk"]


def test_step_mode_replans_every_open_loop_steps(client):
    client.post("/sessions/stepper/reset", json={})
    replanned, plan_steps = [], []
    for i in range(6):
        body = client.post("/sessions/stepper/step", json={"observation": current(i), "step": i}).json()
        assert body["step"] == i and len(body["action"]) == 3 and set(body["actions"]) == {"arm__delta", "gripper"}
        replanned.append(body["replanned"])
        plan_steps.append(body["plan_step"])
    assert replanned == [True, False, True, False, True, False]
    assert plan_steps == [0, 0, 2, 2, 4, 4]
    sessions = {s["session_id"]: s for s in client.get("/sessions").json()["sessions"]}
    assert sessions["stepper"]["plans"] == 3 and sessions["stepper"]["last_step"] == 5


def test_step_mode_hands_out_the_plan_in_between(client):
    first = client.post("/sessions/plan/step", json={"observation": current(0), "step": 0}).json()
    second = client.post("/sessions/plan/step", json={"observation": current(1), "step": 1}).json()
    chunk_now = chunk(client, "plan-check", 0, seed=first["seed"]) if "seed" in first else None
    assert second["replanned"] is False and second["plan_step"] == 0
    if chunk_now is not None:  # the same observation and seed give the plan the step mode is handing out
        rows = np.array(chunk_now["action_chunk"])
        np.testing.assert_allclose(first["action"], rows[chunk_now["first_action_index"]], atol=1e-5)


def test_time_anchoring_and_freshness(client):
    now = time.time()
    body = chunk(client, "clock", 0, timestamp=now, step=0)
    assert body["timestamp"] == now and body["step"] == 0
    assert body["valid_until"] == pytest.approx(now + 2 * 0.05)
    stale = client.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "clock",
                                                           "timestamp": now - 10})
    assert stale.status_code == 409
    error = stale.json()["error"]
    assert error["field"] == "timestamp" and error["type"] == "stale_observation" and "2 s" in error["message"]
    sent = time.time()  # a step is due within one control period (0.05 s) of its timestamp
    step = client.post("/sessions/clock/step", json={"observation": current(2), "timestamp": sent}).json()
    assert step["valid_until"] == pytest.approx(sent + 0.05)


def test_going_back_in_time_and_unknown_sessions_are_refused(client):
    chunk(client, "order", 0, step=5)
    back = client.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "order", "step": 2})
    assert back.status_code == 422 and back.json()["error"]["field"] == "step"
    assert client.post("/sessions/nobody/reset", json={}).status_code == 404
    bad = client.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "a b"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "session_id"
    wrong = dict(current(0))
    wrong["lowdim"] = {"arm__pos": [0.1, 0.2, 0.3]}
    refused = client.post("/sessions/order/step", json={"observation": wrong, "step": 9})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "observation.lowdim.arm__pos"


def test_the_cap_evicts_the_least_recently_used_session(client):
    for sid in [s["session_id"] for s in client.get("/sessions").json()["sessions"]]:
        client.delete(f"/sessions/{sid}")
    for sid in ("one", "two", "three"):
        chunk(client, sid, 0)
    chunk(client, "one", 1)  # "two" is now the least recently used
    chunk(client, "four", 0)
    live = {s["session_id"] for s in client.get("/sessions").json()["sessions"]}
    assert live == {"one", "three", "four"}
    evicted = client.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "two"})
    assert evicted.status_code == 409 and "evicted" in evicted.json()["error"]["message"]
    assert "VLA_MAX_SESSIONS" in evicted.json()["error"]["message"]


def test_concurrent_requests_on_one_session_are_serialized(client):
    client.post("/sessions/race/reset", json={})
    results, errors = [], []

    def send(i):
        try:
            results.append(chunk(client, "race", i)["step"])
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Each request advanced the session's own step counter once: never two at the same step.
    assert sorted(results) == [0, 2, 4, 6]


def test_idle_sessions_expire(tiny_checkpoints):
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    with serving(spec, session_idle_timeout_s=0.3) as c:
        c.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "sleepy"})
        assert [s["session_id"] for s in c.get("/sessions").json()["sessions"]] == ["sleepy"]
        time.sleep(0.5)
        assert c.get("/sessions").json()["sessions"] == []
        # its robot is told, not silently given a new history
        gone = c.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "sleepy"})
        assert gone.status_code == 409, gone.text
        error = gone.json()["error"]
        assert error["type"] == "session_gone" and "expired" in error["message"] and error["field"] == "session_id"
        assert c.post("/sessions/sleepy/reset", json={"seed": 7}).json()["reset"] is True
        again = c.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "sleepy"})
        assert again.status_code == 200 and again.json()["step"] == 0 and again.json()["seed"] == 7
        assert c.post("/sessions/never-made/reset", json={}).status_code == 404


def test_msgpack_session_step(client):
    import msgpack

    from service.codecs import encode_array

    rng = np.random.default_rng(0)
    observation = {"images": {cam: encode_array(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), binary=True)
                              for cam in POLICY_CAMERAS},
                   "lowdim": {"arm__pos": encode_array(np.array([0.5, 0.5], np.float32), binary=True)},
                   "language_instruction": "pick"}
    response = client.post("/sessions/packed/step", content=msgpack.packb({"observation": observation}),
                           headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    assert response.status_code == 200, response.text
    body = msgpack.unpackb(response.content)
    assert body["step"] == 0 and len(body["action"]) == 3


def test_sessions_belong_to_the_key_that_made_them(tiny_checkpoints):
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    with serving(spec, api_keys="alice-key,bob-key") as c:
        made = c.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "arm-1"},
                      headers=alice)
        assert made.status_code == 200, made.text
        assert [s["session_id"] for s in c.get("/sessions", headers=alice).json()["sessions"]] == ["arm-1"]
        assert c.get("/sessions", headers=bob).json()["sessions"] == []  # bob sees none of alice's
        assert c.post("/sessions/arm-1/reset", json={}, headers=bob).status_code == 404  # as for an unknown id
        assert c.delete("/sessions/arm-1", headers=bob).status_code == 404
        step = c.post("/sessions/arm-1/step", json={"observation": current(1)}, headers=bob)
        assert step.status_code == 409 and "taken" in step.json()["error"]["message"]  # an id he cannot take
        taken = c.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "arm-1"},
                       headers=bob)
        assert taken.status_code == 409 and taken.json()["error"]["field"] == "session_id"
        # alice's session went on untouched: her next chunk continues it
        after = c.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "arm-1"},
                       headers=alice)
        assert after.status_code == 200 and after.json()["step"] > 0
        assert c.delete("/sessions/arm-1", headers=alice).status_code == 200


def test_a_gone_sessions_id_stays_its_keys_until_its_robot_resets_it(tiny_checkpoints):
    """Evicted, alice's session id is not another key's to take: her robot, told ``session_gone``, resets the same
    id and goes on (before, bob could make a session of that id and her reset found nothing)."""
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    with serving(spec, api_keys="alice-key,bob-key", max_sessions=1) as c:
        for who, sid in ((alice, "arm-1"), (alice, "arm-2")):  # arm-2 evicts arm-1 (one session at most)
            assert c.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": sid},
                          headers=who).status_code == 200
        taken = c.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "arm-1"},
                       headers=bob)
        assert taken.status_code == 409 and "taken" in taken.json()["error"]["message"], taken.text
        gone = c.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "arm-1"},
                      headers=alice)
        assert gone.json()["error"]["type"] == "session_gone"
        assert c.post("/sessions/arm-1/reset", json={}, headers=alice).json()["reset"] is True
        again = c.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "arm-1"},
                       headers=alice)
        assert again.status_code == 200 and again.json()["step"] == 0


def test_a_refused_new_session_evicts_nobody(tiny_checkpoints):
    policy = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    text = DeploymentSpec(name="text", checkpoint=str(tiny_checkpoints["transformer"]))
    with serving(policy, text, max_sessions=1) as c:
        assert c.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "kept"}
                      ).status_code == 200
        refused = c.post("/sessions/other/step", json={"model": "text", "observation": current(0)})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "model"
        assert [s["session_id"] for s in c.get("/sessions").json()["sessions"]] == ["kept"]


def test_a_refused_request_changes_nothing_for_the_next(client):
    """A request refused at its begin (an observation the model overflows on, a step count over the policy's T)
    or in its model call leaves its session exactly as it was: the next request gets what it would have got
    had the refused one never been sent (the same step, plan count and actions as a session that never saw it)."""
    overflow = dict(current(1), lowdim={"arm__pos": [1e37, 1e37]})
    for sid, refusals in (("clean", []), ("refused", [{"observation": overflow},
                                                       {"observation": current(1), "num_inference_steps": 101},
                                                       {"observation": dict(current(1), images={"nope": "x"})}])):
        chunk(client, sid, 0, seed=3)
        for body in refusals:
            refused = client.post("/predict/diffusion_policy", json={**body, "session_id": sid, "seed": 4})
            assert refused.status_code == 422, refused.text
    clean, after = chunk(client, "clean", 1, seed=4), chunk(client, "refused", 1, seed=4)
    assert after["step"] == clean["step"] == 2
    np.testing.assert_array_equal(after["action_chunk"], clean["action_chunk"])
    infos = {s["session_id"]: s for s in client.get("/sessions").json()["sessions"]}
    assert infos["refused"]["plans"] == infos["clean"]["plans"] == 2
    # step mode: a replanning step refused in its model call does not take its step (the next one is step 0)
    client.post("/sessions/step-refused/reset", json={})
    refused = client.post("/sessions/step-refused/step", json={"observation": current(0), "num_inference_steps": 101})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "num_inference_steps"
    assert client.post("/sessions/step-refused/step", json={"observation": current(0)}).json()["step"] == 0


def test_a_step_past_its_valid_until_is_not_computed(tiny_checkpoints):
    """A step's action is due within one control period (0.5 s here) of its timestamp: an older one is refused
    (409 stale) though it is within the freshness limit (5 s), as a chunk past its own valid_until is."""
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), control_period_s=0.5,
                          max_observation_age_s=5.0, n_action_steps=2)
    with serving(spec) as c:
        fresh = c.post("/sessions/late/step", json={"observation": current(0), "timestamp": time.time()})
        assert fresh.status_code == 200, fresh.text
        late = c.post("/sessions/late/step", json={"observation": current(1), "timestamp": time.time() - 1.0})
        assert late.status_code == 409 and late.json()["error"]["type"] == "stale_observation"
        assert "1 control period " in late.json()["error"]["message"]
        # a chunk of 2 periods (1 s) for the same observation is still due
        assert c.post("/predict/diffusion_policy", json={"observation": current(1), "session_id": "late-chunk",
                                                         "timestamp": time.time() - 0.75}).status_code == 200
        # a step sent again with its timestamp gets its answer again; another observation of it is refused
        now = time.time()
        first = c.post("/sessions/late/step", json={"observation": current(5), "step": 5, "timestamp": now})
        again = c.post("/sessions/late/step", json={"observation": current(5), "step": 5, "timestamp": now})
        assert again.status_code == 200 and again.json()["action"] == first.json()["action"], again.text
        other = c.post("/sessions/late/step", json={"observation": current(5), "step": 5, "timestamp": time.time()})
        assert other.status_code == 409 and other.json()["error"]["field"] == "step", other.text
        ahead = c.post("/sessions/late/step", json={"observation": current(1), "timestamp": 1e300})
        assert ahead.status_code == 422 and ahead.json()["error"]["field"] == "timestamp", ahead.text
        assert "ahead of the server's clock" in ahead.json()["error"]["message"]
        over = c.post("/sessions/late/step", json={"observation": current(1), "num_inference_steps": 1001})
        assert over.status_code == 422 and over.json()["error"]["field"] == "num_inference_steps"


def test_a_refused_first_request_makes_no_session_and_evicts_nobody(tiny_checkpoints):
    """With the cap reached, a new session id whose first request is refused neither evicts an idle robot's
    session nor stays behind; one whose first request succeeds evicts the least recently used."""
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    with serving(spec, max_sessions=2) as c:
        chunk(c, "a", 0)
        chunk(c, "b", 0)
        for i in range(3):  # refused in the model call (its actions overflow), after the session was taken
            bad = c.post(f"/sessions/bad-{i}/step", json={"observation": overflowing(0)})
            assert bad.status_code == 422 and "NaN or infinite" in bad.json()["error"]["message"], bad.text
        assert sorted(s["session_id"] for s in c.get("/sessions").json()["sessions"]) == ["a", "b"]
        assert chunk(c, "a", 1)["step"] > 0 and chunk(c, "b", 1)["step"] > 0  # neither was evicted
        chunk(c, "new", 0)
        assert sorted(s["session_id"] for s in c.get("/sessions").json()["sessions"]) == ["b", "new"]


def test_an_open_websocket_keeps_its_session(tiny_checkpoints):
    """A session a robot's websocket is stepping is never the idle one evicted (a new session waits with 503 while
    every held one is in use) and never expires while the connection is open."""
    import msgpack

    from tests.service.test_robot_ws import flat_observation

    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    with serving(spec, max_sessions=1, session_idle_timeout_s=0.3) as c:
        with c.websocket_connect("/ws/diffusion_policy?session_id=arm-ws") as ws:
            ws.receive_bytes()  # the metadata frame
            ws.send_bytes(msgpack.packb({**flat_observation(0), "timeout_s": 30}, use_bin_type=True))
            assert msgpack.unpackb(ws.receive_bytes())["step"] == 0
            busy = c.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "other"})
            assert busy.status_code == 503 and busy.json()["error"]["type"] == "overloaded"
            # an HTTP request of the same session that fails leaves it to the connection
            failed = c.post("/sessions/arm-ws/step", json={"observation": overflowing(1), "step": 50})  # replans
            assert failed.status_code == 422, failed.text
            time.sleep(0.5)  # past the idle timeout: an open connection's session stays
            ws.send_bytes(msgpack.packb(flat_observation(1), use_bin_type=True))
            assert msgpack.unpackb(ws.receive_bytes())["step"] > 0
            assert [s["session_id"] for s in c.get("/sessions").json()["sessions"]] == ["arm-ws"]
        time.sleep(0.5)  # closed, then idle past the timeout: it expires, and the metrics stop counting it
        assert "vla_robot_sessions 0.0" in c.get("/metrics").text
        assert c.post("/predict/diffusion_policy", json={"observation": current(0), "session_id": "other"}
                      ).status_code == 200
        for i in range(3):  # connections that leave at once hold no more sessions than the cap
            with c.websocket_connect(f"/ws/diffusion_policy?session_id=brief-{i}") as ws:
                ws.receive_bytes()
        assert len(c.get("/sessions").json()["sessions"]) == 1


def test_a_gone_session_is_reported_with_two_policies_served(tiny_checkpoints):
    """With two policies a step without ``model`` cannot guess one: a robot whose session expired hears
    session_gone (409), not that it should name a deployment."""
    specs = [DeploymentSpec(name=n, checkpoint=str(tiny_checkpoints["diffusion_policy"])) for n in ("p1", "p2")]
    with serving(*specs, session_idle_timeout_s=0.3) as c:
        assert c.post("/sessions/two/step", json={"model": "p1", "observation": current(0)}).status_code == 200
        assert c.post("/sessions/two/step", json={"observation": current(1)}).status_code == 200
        time.sleep(0.5)
        gone = c.post("/sessions/two/step", json={"observation": current(2)})
        assert gone.status_code == 409 and gone.json()["error"]["type"] == "session_gone", gone.text


def test_a_new_sessions_failed_first_request_keeps_it_for_the_next_one_waiting(tiny_checkpoints):
    """Two requests for a new session id at once: the first fails, the second (waiting for the session's lock)
    succeeds. The session it made stays in the store, instead of stepping a copy dropped under it."""
    import asyncio
    from types import SimpleNamespace

    from service.sessions import SessionStore
    from vla_foundry.pipelines import load_pipeline

    deployment = SimpleNamespace(name="policy", modality="action", status="ready",
                                 pipeline=load_pipeline(tiny_checkpoints["diffusion_policy"], traced_sampling=False))

    async def scenario():
        store = SessionStore(max_sessions=4, idle_timeout_s=60)
        entry = store.acquire("fresh", deployment)
        gate = asyncio.Event()

        async def fails():
            await gate.wait()
            raise ValueError("refused")

        async def succeeds():
            return "ok"

        first = asyncio.ensure_future(entry.call(fails()))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(entry.call(succeeds()))  # waits for the session's lock
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(ValueError):
            await first
        assert await second == "ok"
        assert store.get("fresh") is entry
        alone = store.acquire("alone", deployment)
        with pytest.raises(ValueError):
            await alone.call(fails())
        assert [info["session_id"] for info in store.infos()] == ["fresh"]  # a failed first request alone: none

    asyncio.run(scenario())


def test_a_step_sent_again_gets_its_answer_and_changes_nothing(client):
    """A robot whose reply was lost (a timeout, a replica that died after it saved the step) sends the step again:
    it gets the same answer, and the session's plans go on as if it had been sent once."""
    def episode(sid: str, steps: list[int]) -> dict[int, dict]:
        answers = {}
        for step in steps:
            reply = client.post(f"/sessions/{sid}/step", json={"observation": current(step), "step": step})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            if step in answers:  # the repeat: the first answer again
                assert {k: body[k] for k in ("action", "replanned", "plan_step", "valid_until")} == \
                    {k: answers[step][k] for k in ("action", "replanned", "plan_step", "valid_until")}
            answers[step] = body
        return answers

    for sid in ("once", "twice"):  # the same seeded episode for both
        chunk(client, sid, 0, seed=1, step=0)
        assert client.post(f"/sessions/{sid}/reset", json={"seed": 7}).status_code == 200
    once, twice = episode("once", [0, 1, 2, 3, 4]), episode("twice", [0, 1, 1, 2, 3, 3, 4])
    for step in range(5):
        assert {k: twice[step][k] for k in ("action", "replanned", "plan_step")} == \
            {k: once[step][k] for k in ("action", "replanned", "plan_step")}, step


def test_a_chunk_sent_again_gets_its_answer_and_changes_nothing(client):
    """Chunk mode, as step mode: a request sent again with its step number (its reply was lost) gets the chunk it
    got, and the session's plans, seeds and history go on as if it had been sent once. Without a step number a
    request is always a new one."""
    for sid in ("chunks-once", "chunks-twice"):  # the same seeded episode for both
        chunk(client, sid, 0, step=0)
        assert client.post(f"/sessions/{sid}/reset", json={"seed": 7}).status_code == 200
    once = [chunk(client, "chunks-once", k, step=k) for k in (0, 2, 4)]
    twice = [chunk(client, "chunks-twice", k, step=k) for k in (0, 2, 2, 4, 4)]
    answer = ("action_chunk", "seed", "step", "valid_until", "timestamp")
    assert [{k: twice[i][k] for k in answer} for i in (1, 3)] == [{k: twice[i][k] for k in answer} for i in (2, 4)]
    planned = ("action_chunk", "seed", "step")
    assert [{k: c[k] for k in planned} for c in (twice[0], twice[1], twice[3])] == \
        [{k: c[k] for k in planned} for c in once]
    infos = {s["session_id"]: s for s in client.get("/sessions").json()["sessions"]}
    assert infos["chunks-twice"]["plans"] == infos["chunks-once"]["plans"] == 3
    assert infos["chunks-twice"]["last_step"] == 4
    new = chunk(client, "chunks-twice", 4)  # no step number: a new request, n_action_steps later
    assert new["step"] == 6 and new["seed"] == 7 + 3


def test_a_row_the_model_would_overflow_on_is_refused_at_the_step_that_sends_it(client):
    """A step that only hands out its plan (open_loop_steps 2: step 1) refuses a proprioception row the model would
    overflow on, as a replanning step does, naming the field; the session goes on exactly as one that never got
    it (before, the row was kept and every later plan whose window held it was refused)."""
    def step(sid: str, k: int, observation: dict = None):
        return client.post(f"/sessions/{sid}/step", json={"observation": observation or current(k), "step": k})

    for sid in ("rows-clean", "rows-bad"):
        chunk(client, sid, 0, step=0)
        assert client.post(f"/sessions/{sid}/reset", json={"seed": 5}).status_code == 200
    clean = [step("rows-clean", k).json() for k in range(4)]
    bad = [step("rows-bad", 0).json()]
    refused = step("rows-bad", 1, dict(current(1), lowdim={"arm__pos": [3e38, 0.5]}))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["field"] == "observation.lowdim.arm__pos" and "far outside the range" in error["message"]
    bad += [step("rows-bad", k).json() for k in range(1, 4)]
    assert [(s["action"], s["replanned"], s["plan_step"]) for s in bad] == \
        [(s["action"], s["replanned"], s["plan_step"]) for s in clean]
    assert [s["replanned"] for s in clean] == [True, False, True, False]
    # a request without a session is refused by its model call (there is no later window for the row to poison)
    window = {"images": {cam: [current(0)["images"][cam]] * 2 for cam in POLICY_CAMERAS},
              "lowdim": {"arm__pos": [[0.1, 0.2], [1e30, 0.2]]}, "language_instruction": "pick up the red block"}
    stateless = client.post("/predict/diffusion_policy", json={"observation": window})
    assert stateless.status_code == 422 and stateless.json()["error"]["field"].startswith("observation")


def test_a_gone_session_reset_starts_its_episode_and_names_its_model(tiny_checkpoints):
    """A reset of a session that expired or was evicted answers as any reset does: the session's model and its new
    episode's seed (a random one when none is asked for), and the session is there at once (listed; the next
    request continues it with that seed)."""
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    with serving(spec, max_sessions=1, session_idle_timeout_s=1.0) as c:
        assert c.post("/sessions/sleepy/step", json={"observation": current(0)}).status_code == 200
        time.sleep(1.3)  # expired, and no request has looked since: the reset is the first to notice
        reset = c.post("/sessions/sleepy/reset", json={"seed": 7})
        assert reset.status_code == 200 and without_timing(reset.json()) == {
            "session_id": "sleepy", "model": "policy", "reset": True, "seed": 7}, reset.text
        assert [s["session_id"] for s in c.get("/sessions").json()["sessions"]] == ["sleepy"]
        assert chunk(c, "sleepy", 0)["seed"] == 7
        chunk(c, "pushy", 0)  # evicts sleepy (one session at most)
        reset = c.post("/sessions/sleepy/reset").json()
        assert reset["model"] == "policy" and isinstance(reset["seed"], int), reset
        again = chunk(c, "sleepy", 0)
        assert again["step"] == 0 and again["seed"] == reset["seed"]


def test_a_gone_session_whose_deployment_was_unloaded_is_freed_by_its_reset(tiny_checkpoints):
    """The reset of a gone session makes its new episode on the deployment it was on; when no deployment of that
    name is served any more (unloaded), the reset still succeeds (``GONE_FOR_GOOD``: no model), and the id is free:
    no longer reported gone, so the robot's next request starts a session on whatever it is sent to."""
    import asyncio
    from types import SimpleNamespace

    from service.errors import ApiError
    from service.sessions import GONE_FOR_GOOD, SessionStore
    from vla_foundry.pipelines import load_pipeline

    deployment = SimpleNamespace(name="policy", modality="action", status="ready",
                                 pipeline=load_pipeline(tiny_checkpoints["diffusion_policy"], traced_sampling=False))

    def unserved(name: str):
        raise ApiError(404, f"no deployment named {name!r}; deployed: (none)", field="model")

    async def scenario():
        store = SessionStore(max_sessions=4, idle_timeout_s=60)
        store.acquire("arm", deployment, request=False)
        store.end_deployment(deployment, "ended: deployment 'policy' was unloaded")
        with pytest.raises(ApiError) as gone:
            store.get("arm")
        assert gone.value.status == 409 and "unloaded" in gone.value.message
        assert await store.reset_gone("arm", None, 3, unserved) is GONE_FOR_GOOD
        with pytest.raises(ApiError) as unknown:  # no longer reported gone: an id like any other
            store.get("arm")
        assert unknown.value.status == 404
        assert await store.reset_gone("arm", None, 3, unserved) is None  # nothing gone to reset any more
        entry = store.acquire("arm", deployment, request=False, seed=5)  # the next request's new session
        assert store.get("arm") is entry and entry.policy.seed == 5

    asyncio.run(scenario())


def test_a_websocket_reset_answers_as_the_http_reset(client):
    import msgpack

    with client.websocket_connect("/ws/diffusion_policy?session_id=ws-reset") as ws:
        ws.receive_bytes()  # the metadata
        ws.send_bytes(msgpack.packb({"endpoint": "reset", "seed": 9}))
        assert msgpack.unpackb(ws.receive_bytes()) == {"reset": True, "session_id": "ws-reset", "model": "policy",
                                                      "seed": 9}
        ws.send_bytes(msgpack.packb({"endpoint": "reset"}))
        reply = msgpack.unpackb(ws.receive_bytes())
        assert reply["model"] == "policy" and isinstance(reply["seed"], int)


def test_a_control_step_must_be_below_2_53(client):
    """Far past any episode, and past what a session can add to and still encode (a step of 2^64 once made the
    reply fail: 500): refused by field, on both session routes."""
    from tests.factories import PREDICT_REQUESTS

    step = client.post("/sessions/huge/step", json={"observation": current(0), "step": 2**53})
    assert step.status_code == 422 and step.json()["error"]["field"] == "step", step.text
    chunk = client.post("/predict/diffusion_policy", json={**PREDICT_REQUESTS["diffusion_policy"],
                                                           "session_id": "huge", "step": 2**64})
    assert chunk.status_code == 422 and chunk.json()["error"]["field"] == "step", chunk.text
    assert client.post("/sessions/huge/step", json={"observation": current(0), "step": 2**53 - 1}).status_code == 200


def test_a_step_sent_again_is_known_by_what_it_sent_however_it_is_spelled(client, monkeypatch):
    """The digest of what a step sent is made before it queues (not on the model thread), from the numbers the
    policy reads: the same step sent again as [1][d] rows or as a float32 typed array in msgpack gets its answer;
    another observation for that step is refused (409, field step)."""
    import msgpack

    from service.codecs import encode_array
    from vla_foundry.robotics import session as session_module

    monkeypatch.setattr(session_module, "observation_digest", lambda *a: pytest.fail("digest on the model thread"))
    first = client.post("/sessions/spelled/step", json={"observation": current(3), "step": 0})
    assert first.status_code == 200, first.text
    as_rows = {**current(3), "lowdim": {"arm__pos": [[0.3, -0.6]]}}
    again = client.post("/sessions/spelled/step", json={"observation": as_rows, "step": 0})
    assert again.status_code == 200 and again.json()["action"] == first.json()["action"], again.text
    typed = {**current(3), "lowdim": {"arm__pos": encode_array(np.array([0.3, -0.6], np.float32), binary=True)}}
    packed = client.post("/sessions/spelled/step", content=msgpack.packb({"observation": typed, "step": 0}),
                         headers={"content-type": "application/msgpack"})
    assert packed.status_code == 200 and packed.json()["action"] == first.json()["action"], packed.text
    other = client.post("/sessions/spelled/step", json={"observation": current(4), "step": 0})
    assert other.status_code == 409 and other.json()["error"]["field"] == "step", other.text


def test_a_number_beyond_float_in_a_step_sent_with_its_number_is_refused_by_field(client):
    """10**400 in a row of a step that names its number (whose observation is hashed before it queues): 422 naming
    the field, as without a step number (it was a 500 there)."""
    huge = {**current(0), "lowdim": {"arm__pos": [10**400, 0.0]}}
    for body in ({"observation": huge, "step": 0}, {"observation": huge}):
        refused = client.post("/sessions/huge-number/step", json=body)
        assert refused.status_code == 422 and refused.json()["error"]["field"].startswith("observation.lowdim"), \
            refused.text


def test_a_session_with_a_request_waiting_for_it_is_not_evicted(tiny_checkpoints):
    """Between one request of a session releasing its lock and the next taking it, the session is still in use: a
    new session made at that moment (its first request answered by the same batched call) must not evict it.
    Before, it counted as idle then: its waiting request ran on a dropped copy, and its robot's next request was
    told ``session_gone``."""
    import asyncio
    import types

    from service.sessions import SessionStore
    from vla_foundry.pipelines import load_pipeline

    deployment = types.SimpleNamespace(name="policy", modality="action", status="ready",
                                       pipeline=load_pipeline(tiny_checkpoints["diffusion_policy"]))

    async def answered(gate=None):
        if gate is not None:
            await gate.wait()
        return "ok"

    async def scenario():
        store = SessionStore(max_sessions=2, idle_timeout_s=60)
        store.acquire("ws-robot", deployment, request=False).pins += 1  # (a connected robot's: never evicted)
        assert await store.acquire("a", deployment).call(answered()) == "ok"
        gate = asyncio.Event()  # one model call answers a's next request and b's first
        b = store.acquire("b", deployment)
        a_first = asyncio.ensure_future(store.acquire("a", deployment).call(answered(gate)))
        b_first = asyncio.ensure_future(b.call(answered(gate)))
        await asyncio.sleep(0)
        a_second = asyncio.ensure_future(store.acquire("a", deployment).call(answered()))  # waits for a's lock
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(a_first, b_first, a_second) == ["ok"] * 3
        store.get("a")  # (raises 409 session_gone for an evicted one)

    asyncio.run(scenario())


def test_a_session_stays_locked_until_its_model_call_ends_however_often_its_request_is_cancelled(tiny_checkpoints):
    """A request whose client leaves (cancelled), and then is cancelled again (the server shuts down), still holds
    its session until the model thread is done with it: the session's next request never meets a half-recorded
    step. Before, the second cancel released the lock at once."""
    import asyncio
    import types

    from service.sessions import SessionStore
    from vla_foundry.pipelines import load_pipeline

    deployment = types.SimpleNamespace(name="policy", modality="action", status="ready",
                                       pipeline=load_pipeline(tiny_checkpoints["diffusion_policy"]))

    async def scenario():
        store = SessionStore(max_sessions=4, idle_timeout_s=60)
        entry = store.acquire("arm", deployment)
        model_done = asyncio.Event()

        async def model_call():  # (what the model thread runs for the step)
            await model_done.wait()
            return "step"

        request = asyncio.ensure_future(entry.call(model_call()))
        await asyncio.sleep(0.01)
        for _ in range(2):
            request.cancel()
            await asyncio.sleep(0.01)
            assert entry.lock.locked() and not request.done()
        model_done.set()
        await asyncio.gather(request, return_exceptions=True)
        assert request.cancelled() and not entry.lock.locked()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def timed_policy(tiny_checkpoints):
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), n_action_steps=2,
                          open_loop_steps=2, control_period_s=0.05)
    with serving(spec, max_sessions=8, session_idle_timeout_s=60) as client:
        yield client


def test_a_robot_that_skips_steps_gets_a_new_plan_every_open_loop_steps_steps(timed_policy):
    """Step mode replans every ``open_loop_steps`` control steps: counted in steps, so a robot that skipped one is
    not served from a plan older than that (before, the count was of answers: step 2 came from step 0's plan)."""
    first = timed_policy.post("/sessions/skips/step", json={"observation": current(0), "step": 0}).json()
    assert first["replanned"] and first["plan_step"] == 0
    after_a_skip = timed_policy.post("/sessions/skips/step", json={"observation": current(2), "step": 2}).json()
    assert after_a_skip["replanned"] is True and after_a_skip["plan_step"] == 2, after_a_skip


@pytest.mark.parametrize("route", ["step", "chunk", "stateless"])
def test_actions_without_a_timestamp_are_valid_from_when_the_server_received_them(timed_policy, monkeypatch, route):
    """No timestamp: ``valid_until`` counts from the server's receive time, so the time a request waited behind a
    slow model call counts against it (before, from when the model got to it: 1.5 s of waiting came on top)."""
    pipeline = timed_policy.app.state.manager.deployments["policy"].pipeline
    predict_each, slow = pipeline.predict_each, [True]

    def slow_first_call(requests, **kwargs):
        if slow[0]:
            slow[0] = False
            time.sleep(1.5)
        return predict_each(requests, **kwargs)

    monkeypatch.setattr(pipeline, "predict_each", slow_first_call)
    ahead = threading.Thread(target=lambda: timed_policy.post("/predict/diffusion_policy", json={
        **PREDICT_REQUESTS["diffusion_policy"], "num_inference_steps": 3}))  # (another step count: a call of its own)
    ahead.start()
    time.sleep(0.3)  # (it is in its model call now)
    sent = time.time()
    if route == "step":
        reply, periods = timed_policy.post(f"/sessions/received-{route}/step", json={"observation": current(0)}), 1
    else:
        body = {"observation": current(0)} if route == "chunk" else PREDICT_REQUESTS["diffusion_policy"]
        session = {"session_id": f"received-{route}"} if route == "chunk" else {}
        reply, periods = timed_policy.post("/predict/diffusion_policy", json={**body, **session}), 2
    ahead.join()
    assert reply.status_code == 200 and reply.json()["timing_ms"]["queue"] > 800, reply.text
    assert sent <= reply.json()["valid_until"] - periods * 0.05 <= sent + 0.3, reply.json()["valid_until"] - sent


def test_a_chunk_sent_again_has_every_timing_its_schema_requires(timed_policy):
    """A request sent again gets its chunk again without a model call; its ``timing_ms`` still has every field the
    reply's schema requires (before, it had no ``preprocess``: a reply that broke its own schema)."""
    body = {"observation": current(0), "session_id": "sent-twice", "step": 0}
    first, again = (timed_policy.post("/predict/diffusion_policy", json=body) for _ in range(2))
    assert first.status_code == again.status_code == 200
    assert again.json()["action_chunk"] == first.json()["action_chunk"]
    required = timed_policy.get("/openapi.json").json()["components"]["schemas"]["ActionTiming"]["required"]
    assert set(required) <= set(again.json()["timing_ms"]), again.json()["timing_ms"]


def test_a_session_that_ends_is_freed_at_once_not_at_the_next_full_collection(tiny_checkpoints):
    """Every session referred to itself (its ``discard`` callback held it), so an evicted, expired, deleted or refused
    session, with the frames its history holds (GPU memory on a CUDA policy), stayed until Python's next full
    garbage collection: 2,665 of them after 10,241 abandoned on a live server. Now reference counting frees it
    when the store lets it go (checked with the collector off)."""
    import asyncio
    import gc
    import types
    import weakref

    from service.sessions import SessionStore
    from vla_foundry.pipelines import load_pipeline

    deployment = types.SimpleNamespace(name="policy", modality="action", status="ready",
                                       pipeline=load_pipeline(tiny_checkpoints["diffusion_policy"]))

    async def ok():
        return "ok"

    async def refused():
        raise ValueError("a refused first step")

    async def scenario() -> list:
        store = SessionStore(max_sessions=2, idle_timeout_s=60)
        ended = []
        for name in ("evicted", "deleted"):  # (both stepped once)
            entry = store.acquire(name, deployment)
            assert await entry.call(ok()) == "ok"
            ended.append(weakref.ref(entry))
        store.remove("deleted")
        for name in ("a", "b"):  # (two more: the oldest, "evicted", makes room)
            assert await store.acquire(name, deployment).call(ok()) == "ok"
        entry = store.acquire("first-step-refused", deployment)
        with pytest.raises(ValueError):
            await entry.call(refused())
        ended.append(weakref.ref(entry))
        del entry
        return ended

    gc.collect()
    gc.disable()
    try:
        ended = asyncio.run(scenario())
        assert [ref() for ref in ended] == [None, None, None]
    finally:
        gc.enable()
