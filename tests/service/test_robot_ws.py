"""``/ws/diffusion_policy``: the openpi robot protocol, with a plain ``websockets`` client on a live server."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.factories import POLICY_CAMERAS
from tests.service.live_server import live_server

FRAME_LIMIT = 200_000


def nd(array: np.ndarray, bytes_keys: bool = False) -> dict:
    """An array as str-keyed msgpack, or with openpi's bytes keys (``openpi_client.msgpack_numpy``'s form)."""
    array = np.ascontiguousarray(array)
    return typed({"__ndarray__": True, "data": array.tobytes(), "dtype": array.dtype.str,
                  "shape": list(array.shape)}, bytes_keys)


def typed(value: dict, bytes_keys: bool) -> dict:
    return {k.encode(): v for k, v in value.items()} if bytes_keys else value


def unpack_array(obj: dict) -> np.ndarray:
    """A reply's array: always openpi's exact form, so openpi's unpacker turns it into numpy."""
    assert set(obj) == {b"__ndarray__", b"data", b"dtype", b"shape"}, obj
    return np.frombuffer(obj[b"data"], dtype=obj[b"dtype"]).reshape(obj[b"shape"])


def flat_observation(seed: int = 0, bytes_keys: bool = False) -> dict:
    """openpi's flat keys: the current frame per camera, the state vector, the prompt."""
    rng = np.random.default_rng(seed)
    obs = {f"observation/{cam}": nd(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), bytes_keys)
           for cam in POLICY_CAMERAS}
    return {**obs, "observation/state": nd(np.array([0.1, 0.2], np.float32), bytes_keys),
            "prompt": "pick up the red block"}


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    import os

    os.environ["VLA_MAX_WS_FRAME_BYTES"] = str(FRAME_LIMIT)
    try:
        with live_server(["--checkpoint", f"{tiny_checkpoints['diffusion_policy']}=policy"],
                         tmp_path_factory.mktemp("demo")) as base:
            yield base.replace("http://", "ws://") + "/ws/diffusion_policy"
    finally:
        os.environ.pop("VLA_MAX_WS_FRAME_BYTES", None)


def open_ws(url: str):
    return connect(url, compression=None, max_size=None, open_timeout=30)


def infer(ws, observation: dict) -> dict:
    ws.send(msgpack.packb(observation, use_bin_type=True))
    return msgpack.unpackb(ws.recv(timeout=30))


def closed_with(ws, code: int, reason: str = "") -> str:
    """The error text frame, then the close code (and reason: ``field=<field>`` when the server names one)."""
    text = ws.recv(timeout=30)
    assert isinstance(text, str) and "Traceback" not in text
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    assert closed.value.rcvd.code == code, closed.value
    if reason:
        assert closed.value.rcvd.reason == reason
    return text


def test_openpi_exchange_metadata_actions_and_reset(server):
    with open_ws(server + "?session_id=arm-1") as ws:
        metadata = msgpack.unpackb(ws.recv(timeout=30))
        assert metadata["chunk_length"] == 3 and metadata["cameras"] == POLICY_CAMERAS
        assert metadata["action_horizon"] == metadata["n_action_steps"]  # what a robot executes per reply
        assert metadata["session_id"] == "arm-1" and metadata["model"] == "policy"
        first = infer(ws, {**flat_observation(0), "seed": 3})
        actions = unpack_array(first["actions"])
        assert actions.dtype == np.float32 and actions.shape == (3, 3)
        assert set(first["server_timing"]) >= {"infer_ms"} and "prev_total_ms" not in first["server_timing"]
        second = infer(ws, flat_observation(1))
        assert "prev_total_ms" in second["server_timing"] and second["step"] > first["step"]
        assert msgpack.unpackb(ws.send(msgpack.packb({"endpoint": "reset"})) or ws.recv(timeout=30))["reset"]
        again = infer(ws, {**flat_observation(0), "seed": 3})
        assert again["step"] == 0 and np.array_equal(unpack_array(again["actions"]), actions)
        infer(ws, {"endpoint": "reset"})
        openpi = infer(ws, {**flat_observation(0, bytes_keys=True), "seed": 3})  # the same frames, bytes keys
        assert np.array_equal(unpack_array(openpi["actions"]), actions)
        frames = {cam: nd(np.zeros((8, 8, 3), np.uint8)) for cam in POLICY_CAMERAS}
        nested = infer(ws, {"observation": {"images": frames,
                                            "lowdim": {"arm__pos": nd(np.zeros(2, np.float32))},
                                            "language_instruction": "pick"}})
        assert unpack_array(nested["actions"]).shape == (3, 3)


def bad_frames(bytes_keys: bool) -> dict:
    """Frames each closed with 1008 (or 1009); the typed arrays in the spelling given."""
    def with_state(value):
        return msgpack.packb({**flat_observation(bytes_keys=bytes_keys), "observation/state": value})

    return {
        "text frame": ("a text frame", 1008),
        "not msgpack": (b"\xc1\xc1\xc1 definitely not msgpack", 1008),
        "ext type": (msgpack.packb(msgpack.ExtType(5, b"xyz")), 1008),
        "object dtype": (with_state(typed({"__ndarray__": True, "data": b"", "dtype": "|O", "shape": [0]},
                                          bytes_keys)), 1008),
        "malformed dtype": (with_state(typed({"__ndarray__": True, "data": b"", "dtype": ",", "shape": [0]},
                                             bytes_keys)), 1008),
        "complex dtype": (with_state(nd(np.zeros(2, np.complex64), bytes_keys)), 1008),
        "complex scalar": (with_state(typed({"__npgeneric__": True, "data": 1.0, "dtype": "<c8"}, bytes_keys)), 1008),
        "shape mismatch": (msgpack.packb({**flat_observation(bytes_keys=bytes_keys), "observation/front": typed({
            "__ndarray__": True, "data": b"\x00" * 10, "dtype": "|u1", "shape": [24, 40, 3]}, bytes_keys)}), 1008),
        "float frame": (msgpack.packb({**flat_observation(bytes_keys=bytes_keys),
                                       "observation/front": nd(np.zeros((24, 40, 3), np.float32), bytes_keys)}), 1008),
        "missing camera": (msgpack.packb({k: v for k, v in flat_observation(bytes_keys=bytes_keys).items()
                                          if k != "observation/wrist"}), 1008),
        "unknown key": (msgpack.packb({**flat_observation(), "observation/elbow": [0.5]}), 1008),
        "state twice": (msgpack.packb({**flat_observation(), "observation/arm__pos": [0.3, 0.4]}), 1008),
        "a list": (msgpack.packb([1, 2, 3]), 1008),
        "over the limit": (b"\x00" * (FRAME_LIMIT + 1), 1009),
        # over VLA_MAX_BODY_KEYS (10,000 by default): refused while unpacking, with the reason in a text frame
        "too many keys": (msgpack.packb({**flat_observation(), **{f"k{i}": 0 for i in range(10_001)}}), 1009),
    }


ARRAY_CASES = ("object dtype", "malformed dtype", "complex dtype", "complex scalar", "shape mismatch", "float frame",
               "missing camera")
BAD_FRAMES = {**bad_frames(False), **{f"{case} (bytes keys)": bad_frames(True)[case] for case in ARRAY_CASES}}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frames_close_that_connection_only(server, case):
    frame, code = BAD_FRAMES[case]
    with open_ws(server + "?session_id=bystander") as other:
        msgpack.unpackb(other.recv(timeout=30))
        before = infer(other, {**flat_observation(5), "seed": 1})
        with open_ws(server) as ws:
            msgpack.unpackb(ws.recv(timeout=30))
            ws.send(frame)
            if case == "over the limit":  # the server closes before reading the frame: no text frame
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=30)
                assert closed.value.rcvd.code == 1009
            else:
                reasons = {"missing camera": "field=observation.images.wrist", "unknown key": "field=observation/elbow",
                           "state twice": "field=observation/arm__pos"}
                text = closed_with(ws, code, next((r for c, r in reasons.items() if case.startswith(c)), ""))
                if case == "unknown key":  # what may be sent instead: the cameras and the fields
                    assert all(name in text for name in (*POLICY_CAMERAS, "arm__pos")), text
        after = infer(other, {**flat_observation(6), "seed": 1})  # the other session carries on
        assert after["step"] > before["step"]


def refused_upgrade(status: int, url: str, **options) -> dict:
    """The upgrade request's HTTP reply (the connection is never accepted): its status, and its error."""
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        connect(url, compression=None, max_size=None, open_timeout=30, **options)
    assert refused.value.response.status_code == status
    return json.loads(refused.value.response.body)["error"]


def test_unknown_deployment_is_refused(server):
    """Refused before the upgrade, as an HTTP reply in the error shape: openpi's client reads the first frame as
    msgpack, and a text frame sent after accepting reached it as a TypeError."""
    error = refused_upgrade(404, server + "?model=nope")
    assert "nope" in error["message"] and error["field"] == "model"


@pytest.mark.parametrize("path", ["/", "/ws", "/ws/transformer", "/ws/nope?model=x",
                                  "/docs-assets/redoc.standalone.js", "/static/app.js"])
def test_a_websocket_at_another_path_is_refused_404_naming_the_robot_websockets(server, path):
    """openpi's client connects to ``/`` unless given a path: every other path than ``/ws/<policy type>`` got a bare
    403 with no body, which reads as an auth or origin refusal. Now 404 in the error shape, naming the endpoint; the
    static files' folders too (their mounts took the upgrade, and a bare 403 came back)."""
    base = server.split("/ws/")[0]
    error = refused_upgrade(404, base + path)
    assert "/ws/diffusion_policy" in error["message"] and "WebsocketClientPolicy" in error["message"], error


def test_a_page_of_another_origin_cannot_connect(server):
    """Browsers let any page open a websocket (no CORS check), so one from another origin is refused before the
    upgrade (403, field origin); robots' clients send no Origin."""
    error = refused_upgrade(403, server, origin="https://evil.example")
    assert "another origin" in error["message"] and error["field"] == "origin"


def test_reset_seed_is_checked_and_connection_sessions_end_with_it(server):
    import httpx

    with open_ws(server) as ws:
        session_id = msgpack.unpackb(ws.recv(timeout=30))["session_id"]
        ws.send(msgpack.packb({"endpoint": "reset", "seed": "x"}))
        assert "seed" in closed_with(ws, 1008)
    base = server.replace("ws://", "http://").rsplit("/ws/", 1)[0]
    live = {s["session_id"] for s in httpx.get(base + "/sessions").json()["sessions"]}
    assert session_id not in live  # an unnamed connection's session is dropped when it closes


def test_a_connection_whose_session_was_deleted_is_told_to_connect_again(server):
    """DELETE /sessions/{id} while a robot's connection holds it: its next frame is told the session was deleted and
    that its id is free (not to reset it, which would find nothing: 404)."""
    import httpx

    base = server.replace("ws://", "http://").rsplit("/ws/", 1)[0]
    with open_ws(server + "?session_id=deleted-arm") as ws:
        msgpack.unpackb(ws.recv(timeout=30))
        infer(ws, flat_observation(0))
        assert httpx.delete(base + "/sessions/deleted-arm").status_code == 200
        ws.send(msgpack.packb(flat_observation(1)))
        text = closed_with(ws, 1008)
        assert "was deleted" in text and "connect again" in text and "/reset" not in text, text
    with open_ws(server + "?session_id=deleted-arm") as ws:  # as it says: a new session under the id
        msgpack.unpackb(ws.recv(timeout=30))
        assert infer(ws, flat_observation(0))["step"] == 0


def test_concurrent_robots_share_calls_and_get_their_solo_actions(server):
    """8 robots on their own connections, 3 frames each, all at once: their frames share model calls
    (server_timing.batch_size > 1) and each robot's actions equal those of the same episode run alone."""
    import threading

    def episode(robot: int, results: dict) -> None:
        with open_ws(f"{server}?session_id=ws-fleet-{robot}") as ws:
            msgpack.unpackb(ws.recv(timeout=30))
            replies = [infer(ws, {**flat_observation(10 * robot + i), "seed": 500 + robot}) for i in range(3)]
            infer(ws, {"endpoint": "reset"})  # the session is named: leave it clean for the solo replay
        results[robot] = replies

    together: dict = {}
    threads = [threading.Thread(target=episode, args=(r, together)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    alone: dict = {}
    for robot in range(8):
        episode(robot, alone)
    sizes = [reply["server_timing"]["batch_size"] for replies in together.values() for reply in replies]
    assert len(together) == 8 and max(sizes) > 1, sizes
    for robot in range(8):
        assert [r["step"] for r in together[robot]] == [r["step"] for r in alone[robot]]
        for mine, solo in zip(together[robot], alone[robot]):
            np.testing.assert_allclose(unpack_array(mine["actions"]), unpack_array(solo["actions"]), atol=1e-5)


def test_a_frame_sent_again_with_its_step_gets_its_answer(server):
    """A robot that reconnects after losing a reply sends its frame again with its ``step``: it gets the actions it
    got, and the session plans once (the next frame's seed is the session's seed + 1)."""
    with open_ws(server + "?session_id=ws-again") as ws:
        msgpack.unpackb(ws.recv(timeout=30))
        assert msgpack.unpackb(ws.send(msgpack.packb({"endpoint": "reset", "seed": 40})) or ws.recv(timeout=30))
        first = infer(ws, {**flat_observation(0), "step": 0})
    with open_ws(server + "?session_id=ws-again") as ws:  # reconnected, the same session
        msgpack.unpackb(ws.recv(timeout=30))
        again = infer(ws, {**flat_observation(0), "step": 0})
        assert np.array_equal(unpack_array(again["actions"]), unpack_array(first["actions"]))
        assert (again["step"], again["seed"], again["valid_until"]) == (0, 40, first["valid_until"])
        assert infer(ws, {**flat_observation(2), "step": 2})["seed"] == 41
        infer(ws, {"endpoint": "reset"})  # leave the named session clean


def test_an_empty_session_id_is_the_connections_own_session_and_ends_with_it(tiny_checkpoints):
    """``?session_id=`` names no session: the connection gets its own, which ends with it, as with no
    ``session_id`` (before, it outlived the connection, counting against VLA_MAX_SESSIONS until it expired)."""
    import time

    from service import DeploymentSpec
    from tests.service.conftest import serving

    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))) as client:
        for query in ("", "?session_id="):
            with client.websocket_connect("/ws/diffusion_policy" + query) as ws:
                own = msgpack.unpackb(ws.receive_bytes())["session_id"]
                ws.send_bytes(msgpack.packb(flat_observation(0), use_bin_type=True))
                assert "step" in msgpack.unpackb(ws.receive_bytes())
            deadline = time.monotonic() + 5
            while client.get("/sessions").json()["sessions"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert own.startswith("ws-") and client.get("/sessions").json()["sessions"] == [], query


@pytest.mark.parametrize("size", [FRAME_LIMIT * 2, 32 * 1024 * 1024], ids=["a little over", "far over"])
def test_the_python_client_reports_a_frame_over_the_limit_as_1009(server, size):
    """The server closes 1009 while the client still sends a frame over VLA_MAX_WS_FRAME_BYTES; the client's send
    then breaks, and it reported 1006 (a lost connection) without reading the close frame that said why."""
    from vla_foundry_client import PolicyServerError, WebsocketPolicyClient

    with WebsocketPolicyClient(server.replace("/ws/diffusion_policy", ""), model="policy", timeout=30) as robot:
        with pytest.raises(PolicyServerError) as info:
            robot.infer({**flat_observation(), "observation/state": np.zeros(size, np.uint8)})
    assert (info.value.status, info.value.type) == (1009, "payload_too_large"), info.value
