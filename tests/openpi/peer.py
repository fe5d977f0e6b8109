"""An openpi robot, written only against the real ``openpi-client`` package (run in its side environment).

``python peer.py BASE_URL`` talks to a live server the way openpi robots do and prints a JSON summary
of what it saw; any mismatch fails an ``assert`` (exit 1). It imports nothing from this repository.

1. ``WebsocketClientPolicy`` on ``/ws/diffusion_policy``: the metadata frame, two ``infer`` calls
   (the second reply carries ``server_timing.prev_total_ms``), a reset, then the first observation
   again with the same seed: the same actions.
2. ``ActionChunkBroker`` over the same policy: one action row per step, a new chunk after
   ``action_horizon`` steps, ``reset``.
3. HTTP: ``msgpack_numpy.packb`` bodies POSTed to ``/predict/diffusion_policy`` (a session, so the
   current step suffices) and the reply read with ``msgpack_numpy.unpackb``: the same actions as
   the websocket's first reply.
"""

from __future__ import annotations

import json
import sys
import urllib.request

import numpy as np
from openpi_client import action_chunk_broker, msgpack_numpy, websocket_client_policy

PROMPT = "put the block in the bin"


def observation(metadata: dict, seed: int) -> dict:
    """openpi's flat observation keys: one uint8 frame per camera, the state vector, the prompt."""
    rng = np.random.default_rng(seed)
    obs = {f"observation/{camera}": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
           for camera in metadata["cameras"]}
    state_dim = sum(p["dim"] for p in metadata["proprioception"])
    obs["observation/state"] = rng.uniform(-1, 1, state_dim).astype(np.float32)
    obs["prompt"] = PROMPT
    return obs


def http_body(metadata: dict, obs: dict, seed: int, session_id: str) -> dict:
    """The same observation in the HTTP body form, arrays left to openpi's packer."""
    state, start, lowdim = obs["observation/state"], 0, {}
    for p in metadata["proprioception"]:
        lowdim[p["field"]] = state[start:start + p["dim"]]
        start += p["dim"]
    images = {camera: obs[f"observation/{camera}"] for camera in metadata["cameras"]}
    return {"observation": {"images": images, "lowdim": lowdim, "language_instruction": PROMPT},
            "seed": np.int64(seed), "session_id": session_id}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=msgpack_numpy.packb(body), method="POST", headers={
        "Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["Content-Type"] == "application/msgpack", reply.headers["Content-Type"]
        return msgpack_numpy.unpackb(reply.read())


def main(base: str) -> dict:
    ws_url = base.replace("http://", "ws://") + "/ws/diffusion_policy?session_id=openpi-peer"
    policy = websocket_client_policy.WebsocketClientPolicy(host=ws_url)
    metadata = policy.get_server_metadata()
    # action_horizon: the actions executed per reply (the session's n_action_steps); each reply has chunk_length rows
    horizon, rows_per_reply, action_dim = metadata["action_horizon"], metadata["chunk_length"], metadata["action_dim"]
    assert horizon == metadata["n_action_steps"] <= rows_per_reply, metadata
    assert metadata["session_id"] == "openpi-peer", metadata

    first = policy.infer({**observation(metadata, 0), "seed": np.int64(3)})
    actions = first["actions"]
    assert isinstance(actions, np.ndarray), type(actions)
    assert actions.dtype == np.float32 and actions.shape == (rows_per_reply, action_dim), (actions.dtype, actions.shape)
    assert "infer_ms" in first["server_timing"] and "prev_total_ms" not in first["server_timing"], first
    second = policy.infer(observation(metadata, 1))
    assert isinstance(second["actions"], np.ndarray) and second["actions"].shape == (rows_per_reply, action_dim)
    assert second["server_timing"]["prev_total_ms"] > 0 and second["step"] > first["step"], second

    # The server's reset frame (openpi-client's own reset() only resets client state), on the client's socket.
    policy._ws.send(msgpack_numpy.packb({"endpoint": "reset"}))
    reset = msgpack_numpy.unpackb(policy._ws.recv())
    assert {k: reset[k] for k in ("reset", "session_id")} == {"reset": True, "session_id": "openpi-peer"}, reset
    assert reset["model"] == metadata["model"] and isinstance(reset["seed"], int), reset  # as the HTTP reset answers
    again = policy.infer({**observation(metadata, 0), "seed": np.int64(3)})
    assert again["step"] == 0 and np.array_equal(again["actions"], actions), (again["step"], again["actions"])

    broker = action_chunk_broker.ActionChunkBroker(policy, action_horizon=horizon)
    rows = [broker.infer(observation(metadata, 10 + i)) for i in range(horizon + 1)]
    assert all(isinstance(r["actions"], np.ndarray) and r["actions"].shape == (action_dim,) for r in rows)
    # a new chunk after action_horizon steps, which the session counted as the steps the robot took
    assert rows[horizon]["step"] - rows[0]["step"] == horizon, [r["step"] for r in rows]
    broker.reset()
    after_reset = broker.infer(observation(metadata, 20))
    assert after_reset["actions"].shape == (action_dim,)

    fresh = post(base + "/predict/diffusion_policy", http_body(metadata, observation(metadata, 0), 3, "openpi-http"))
    chunk = np.asarray(fresh["action_chunk"], np.float32)[fresh["first_action_index"]:]
    np.testing.assert_allclose(chunk, actions, atol=1e-6)
    return {"metadata_keys": sorted(metadata), "action_horizon": horizon, "chunk_length": rows_per_reply,
            "action_dim": action_dim,
            "actions_dtype": str(actions.dtype), "actions_shape": list(actions.shape),
            "server_timing": sorted(second["server_timing"]), "reset_step": again["step"],
            "broker_rows": len(rows), "http_session": fresh["session_id"], "http_actions": chunk.tolist(),
            "ws_actions": actions.tolist()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
