"""The robot client (``vla_foundry_client``) against a real server on a loopback port.

One server serves the tiny test policy (cameras front/wrist with frames t-1 and t0, proprio
``arm__pos`` [2], actions ``arm__delta`` [2] + ``gripper`` [1], P = 1, F = 2, n_action_steps 2)
and an untrained demo policy for the example's loop (the loop is under test, not the policy).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml

from tests.factories import POLICY_CAMERAS
from tests.service.live_server import live_server
from vla_foundry.demo import policy as demo_policy
from vla_foundry.demo import reach_task as task
from vla_foundry_client import (ActionChunkBroker, HttpPolicyClient, PolicyServerError, WebsocketPolicyClient, pack,
                                unpack)

ROOT = Path(__file__).resolve().parents[2]
POLICY, DEMO = "tiny-policy", "demo-diffusion_policy"
INSTRUCTION = "pick up the red block"


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("robot-client")
    demo_policy.build(root / DEMO, progress=False, steps=1)  # untrained, built in seconds
    config = root / "deployments.yaml"
    config.write_text(yaml.safe_dump({"deployments": [
        {"name": POLICY, "checkpoint": str(tiny_checkpoints["diffusion_policy"]), "n_action_steps": 2,
         "num_inference_steps": 2},
        {"name": DEMO, "checkpoint": str(root / DEMO), "num_inference_steps": 2}]}))
    with live_server(["--config", str(config)], root / "demo") as base:
        yield base


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def current_step(seed: int = 0) -> dict:
    """What a robot in a session sends: one frame per camera, the current [2] position."""
    return {"images": {camera: frame(seed + i) for i, camera in enumerate(POLICY_CAMERAS)},
            "lowdim": {"arm__pos": np.array([0.1 * seed, 0.2], np.float32)}, "language_instruction": INSTRUCTION}


def whole_window(seed: int = 0) -> dict:
    """The stateless form of ``current_step(seed)`` at an episode's first step: the current frame and row
    repeated over the window (as a session pads a step it never saw)."""
    step = current_step(seed)
    return {"images": {camera: [image, image] for camera, image in step["images"].items()},
            "lowdim": {"arm__pos": np.stack([step["lowdim"]["arm__pos"]] * 2)}, "language_instruction": INSTRUCTION}


def session_info(base: str, session_id: str) -> dict:
    with HttpPolicyClient(base) as client:
        (info,) = [s for s in client.sessions() if s["session_id"] == session_id]
    return info


# ----------------------------------------------------------------------------- no server


def test_importing_the_client_imports_neither_torch_nor_the_server():
    check = ("import sys, vla_foundry_client; "
             "assert not {'torch', 'vla_foundry', 'service'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_arrays_round_trip_in_both_conventions_and_odd_dtypes_are_refused():
    value = {"image": frame(0), "rows": [np.arange(6, dtype=">f8").reshape(2, 3)[:, ::2], np.int16(3)],
             "png": b"\x89PNG"}
    binary, text = pack(value, binary=True), pack(value, binary=False)
    # msgpack data is a byte view of the array (packed straight into the message, no intermediate copy).
    assert binary["image"]["__ndarray__"] is True and bytes(binary["image"]["data"]) == value["image"].tobytes()
    assert isinstance(text["image"]["data"], str) and text["png"] == "iVBORw==" and text["rows"][1] == 3
    over_the_wire = msgpack.unpackb(msgpack.packb(binary, use_bin_type=True))
    assert isinstance(over_the_wire["image"]["data"], bytes)
    for packed in (binary, over_the_wire, text):
        out = unpack(packed)
        np.testing.assert_array_equal(out["image"], value["image"])
        np.testing.assert_array_equal(out["rows"][0], value["rows"][0])
        out["image"][0, 0, 0] = 1  # writable
    for bad in (np.zeros(2, np.complex64), np.array([object()])):
        with pytest.raises(ValueError, match="arrays cannot travel"):
            pack({"x": [bad]}, binary=True)
    with pytest.raises(ValueError, match="complex"):
        unpack({"dtype": "<c8", "shape": [1], "data": "AAAAAAAAAAA="})
    with pytest.raises(ValueError, match="bytes"):
        unpack({"__ndarray__": True, "dtype": "<f4", "shape": [2], "data": b"\0" * 4})


def test_the_example_loop_succeeds_with_an_expert_behind_the_broker():
    """The loop's wiring (observation, broker, simulator) with a client whose chunks come from the expert."""
    expert = task.expert_policy(chunk=4)

    class ExpertClient:
        session_id = "fake"

        def __init__(self):
            self.resets, self.requests = 0, []

        def infer(self, observation, **fields):
            self.requests.append((observation, fields))
            actions = expert({"images": observation["images"], "instruction": observation["language_instruction"]})
            return {"actions": actions, "n_action_steps": 2}

        def reset(self):
            self.resets += 1

    client = ExpertClient()
    assert load_example().run_episodes(client, episodes=3) == 1.0
    assert client.resets == 3 and len(client.requests) == 3 * task.EPISODE_STEPS // 2
    observation, fields = client.requests[1]
    assert observation["lowdim"][task.PROPRIO_FIELD].shape == (2,) and fields == {"step": 2}


# ----------------------------------------------------------------------------- HTTP


def test_http_msgpack_and_json_give_the_same_actions(server):
    replies = {}
    for wire in ("msgpack", "json"):
        with HttpPolicyClient(server, model=POLICY, format=wire) as client:
            io = client.metadata()
            replies[wire] = client.infer(whole_window(1), seed=5)
    assert io["cameras"] == POLICY_CAMERAS and io["n_action_steps"] == 2 and io["model"] == POLICY
    msgpack_reply, json_reply = replies["msgpack"], replies["json"]
    chunk = msgpack_reply["action_chunk"]
    assert chunk.dtype == np.float32 and chunk.shape == (4, 3) and msgpack_reply["first_action_index"] == 1
    np.testing.assert_array_equal(chunk, json_reply["action_chunk"])
    for field in ("arm__delta", "gripper"):
        np.testing.assert_array_equal(msgpack_reply["actions"][field], json_reply["actions"][field])
    assert msgpack_reply["seed"] == json_reply["seed"] == 5


def test_metadata_without_a_model_needs_a_single_policy(server):
    with HttpPolicyClient(server) as client, pytest.raises(ValueError, match=f"{POLICY}, {DEMO}"):
        client.metadata()


@pytest.mark.parametrize("n_action_steps, inferences, last_step", [(None, 3, 4), (3, 2, 3)])
def test_session_broker_sends_only_the_current_step(server, n_action_steps, inferences, last_step):
    session_id = f"broker-{n_action_steps}"
    with HttpPolicyClient(server, model=POLICY, session_id=session_id) as client:
        broker = ActionChunkBroker(client, n_action_steps=n_action_steps)
        broker.reset()  # the session does not exist yet: nothing to forget
        actions = []
        for step in range(6):
            actions.append(broker.act(current_step(step)))
            reply = broker.last_reply
            assert actions[-1].shape == (3,) and reply["session_id"] == session_id
            np.testing.assert_array_equal(actions[-1], reply["action_chunk"][1 + step - reply["step"]])
    assert broker.inferences == inferences and reply["step"] == last_step  # the step the broker sent
    info = session_info(server, session_id)
    assert info["plans"] == inferences and info["last_step"] == last_step


def test_a_broker_goes_on_after_a_lost_reply(server, monkeypatch):
    """The server answers a chunk whose reply never arrives (a timeout): the control step passes without an action,
    and the robot's next observations are the next steps' (before, the broker sent the answered step again with each
    new observation, which the session refused for good: 409 on ``step``)."""
    with HttpPolicyClient(server, model=POLICY, session_id="lossy", format="json") as client:
        call, lose = client._call, [False]

        def lossy(*args, **kwargs):
            reply = call(*args, **kwargs)
            if lose[0]:
                lose[0] = False
                raise TimeoutError("timed out")  # (the server acted; its reply was lost)
            return reply

        monkeypatch.setattr(client, "_call", lossy)
        broker = ActionChunkBroker(client)
        broker.act(current_step(0))
        broker.act(current_step(1))
        lose[0] = True
        with pytest.raises(TimeoutError):
            broker.act(current_step(2))
        for step in range(3, 7):
            assert broker.act(current_step(step)).shape == (3,)
        assert broker.last_reply["step"] == 5


def test_session_step_and_seeded_reset(server):
    with HttpPolicyClient(server, model=POLICY, session_id="stepper", format="json") as client:
        assert client.reset() == {"session_id": "stepper", "reset": False}  # not created yet
        replies = [client.step(current_step(i)) for i in range(3)]
        assert [r["replanned"] for r in replies] == [True, False, True]  # open_loop_steps = n_action_steps = 2
        assert [r["step"] for r in replies] == [0, 1, 2] and replies[0]["action"].shape == (3,)
        seeded = []
        for _ in range(2):
            assert client.reset(seed=3)["seed"] == 3
            seeded.append(client.step(current_step(0))["action"])
        np.testing.assert_array_equal(*seeded)


# ----------------------------------------------------------------------------- websocket


def test_websocket_metadata_infer_and_reset(server):
    with WebsocketPolicyClient(server, model=POLICY) as ws:
        assert ws.metadata["model"] == POLICY and ws.metadata["cameras"] == POLICY_CAMERAS
        assert ws.session_id.startswith("ws-") and ws.metadata["chunk_length"] == 3
        assert ws.metadata["action_horizon"] == ws.metadata["n_action_steps"]
        with HttpPolicyClient(server, model=POLICY) as http:  # the same metadata over HTTP (it said F+1 there)
            assert {k: v for k, v in http.metadata().items() if k != "session_id"} == {
                k: v for k, v in ws.metadata.items() if k != "session_id"}
        assert ws.reset(seed=7)["reset"] is True
        reply = ws.infer(current_step(2))
        actions = reply["actions"]
        assert actions.dtype == np.float32 and actions.shape == (3, 3) and reply["step"] == 0
        assert reply["n_action_steps"] == 2 and reply["server_timing"]["infer_ms"] > 0
        # openpi's flat keys and another reset replay the same first plan.
        ws.reset(seed=7)
        flat = {f"observation/{camera}": image for camera, image in current_step(2)["images"].items()}
        flat.update({"observation/state": current_step(2)["lowdim"]["arm__pos"], "prompt": INSTRUCTION})
        np.testing.assert_array_equal(ws.infer(flat)["actions"], actions)
        # A session's first step padded by the server = the stateless request with the step repeated.
        with HttpPolicyClient(server, model=POLICY) as http:
            stateless = http.infer(whole_window(2), seed=7)
        np.testing.assert_allclose(stateless["action_chunk"][1:], actions, atol=1e-6)
        # The broker executes websocket chunks from row 0.
        ws.reset(seed=7)
        broker = ActionChunkBroker(ws)
        executed = [broker.act(current_step(2 + i)) for i in range(4)]
        assert broker.inferences == 2
        np.testing.assert_array_equal(executed[0], actions[0])
        np.testing.assert_array_equal(executed[1], actions[1])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("wire", ["msgpack", "json"])
def test_http_refusal_names_the_field(server, wire):
    observation = whole_window()
    del observation["images"]["wrist"]
    with HttpPolicyClient(server, model=POLICY, format=wire) as client:
        with pytest.raises(PolicyServerError) as refused:
            client.infer(observation)
        assert refused.value.status == 422 and refused.value.type == "invalid_value"
        assert refused.value.field == "observation.images.wrist" and "wrist" in refused.value.message
        assert client.infer(whole_window())["action_chunk"].shape == (4, 3)  # the connection still serves


def test_websocket_refusal_closes_with_the_message(server):
    observation = current_step()
    del observation["images"]["wrist"]
    with WebsocketPolicyClient(server, model=POLICY) as ws:
        with pytest.raises(PolicyServerError) as refused:
            ws.infer(observation)
        assert refused.value.status == 1008 and refused.value.type == "invalid_value"
        assert "wrist" in refused.value.message and refused.value.field == "observation.images.wrist"
        with pytest.raises(PolicyServerError) as closed:  # the server closed the connection
            ws.infer(current_step())
        # (not this observation's fault: before, the earlier refusal's type and field came again)
        assert (closed.value.status, closed.value.type, closed.value.field) == (1008, "connection_closed", None)
        assert "closed earlier" in closed.value.message and "reconnect" in closed.value.message
    with pytest.raises(PolicyServerError, match="no-such-policy") as unknown:  # refused before the upgrade
        WebsocketPolicyClient(server, model="no-such-policy")
    assert (unknown.value.status, unknown.value.type, unknown.value.field) == (404, "not_found", "model")


def test_a_refused_upgrade_s_retry_after_reaches_the_websocket_client():
    """A 503 before the upgrade (a deployment loading, the server draining) carries Retry-After: the HTTP client
    reported it and the websocket client dropped it (None), so a robot's reconnect loop had no pace to keep."""
    import threading

    from websockets.sync.server import serve

    def refuse(connection, request):
        response = connection.respond(503, '{"error": {"type": "unavailable", "message": "still loading"}}')
        response.headers["Retry-After"] = "5"
        return response

    with serve(lambda ws: None, "127.0.0.1", 0, process_request=refuse) as stub:
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        port = stub.socket.getsockname()[1]
        with pytest.raises(PolicyServerError) as refused:
            WebsocketPolicyClient(f"http://127.0.0.1:{port}", model=POLICY, timeout=10)
        stub.shutdown()
    assert (refused.value.status, refused.value.type, refused.value.retry_after) == (503, "unavailable", 5.0)


# ----------------------------------------------------------------------------- the example


def load_example():
    spec = importlib.util.spec_from_file_location("robot_loop", ROOT / "examples" / "robot_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_example_runs_against_the_demo_policy(server, transport, capsys):
    assert load_example().main(["--url", server, "--transport", transport, "--model", DEMO, "--episodes", "2"]) == 0
    assert f"over 2 episodes ({transport})" in capsys.readouterr().out
