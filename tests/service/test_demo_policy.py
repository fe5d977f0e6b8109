"""The demo policy solves its task when driven through the HTTP API.

``demo-diffusion_policy`` is trained by the project on the synthetic reach task (move the
agent to the target the instruction names); this is the trained one the package ships
(``vla_foundry/demo/pack``), which ``vla-foundry demo --rebuild`` retrains. A robot loop on a
real server (loopback port) sends the camera frame, the position history and the executed action, executes
``n_action_steps`` of each returned chunk, and must end at the named target far more often
than random actions do.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.service.live_server import live_server
from vla_foundry.demo import ensure_demo_pack
from vla_foundry.demo import policy as demo_policy
from vla_foundry.demo import reach_task as task

EPISODES = 40


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """Only the policy member, as the package ships it."""
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_pack(root, progress=False, members=["demo-diffusion_policy"])
    return root


def http_policy(client: httpx.Client, info: dict):
    """A reach-task policy that asks the server: the JSON a robot would send, the chunk it executes."""
    calls = [0]

    def policy(obs: dict) -> np.ndarray:
        sample = demo_policy.observation_from(obs)
        frame = sample.images[f"{task.CAMERA}_t0"]
        body = {"observation": {
            "images": {task.CAMERA: {"dtype": "|u1", "shape": list(frame.shape),
                                     "data": base64.b64encode(frame.tobytes()).decode()}},
            "lowdim": {k: v.tolist() for k, v in sample.lowdim.items()},
            "language_instruction": sample.instruction},
            "past_actions": {k: v.tolist() for k, v in sample.past_actions.items()}, "seed": calls[0]}
        calls[0] += 1
        response = client.post("/predict/diffusion_policy", json=body)
        assert response.status_code == 200, response.text
        payload = response.json()
        first, n = payload["first_action_index"], payload["n_action_steps"]
        assert n == info["io"]["n_action_steps"]
        return np.array(payload["actions"][task.ACTION_FIELD][first:first + n], np.float32)

    return policy


def test_demo_policy_reaches_the_named_target_over_http(demo_dir):
    member = demo_dir / "demo-diffusion_policy"
    with live_server(["--checkpoint", str(member)], demo_dir) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            info = client.get("/models/demo-diffusion_policy").json()
            assert info["status"] == "ready" and info["demo"]["random_weights"] is False
            assert info["io"]["cameras"] == [task.CAMERA] and info["io"]["uses_language"] is True
            trained = task.rollout(http_policy(client, info), np.random.default_rng(2024), episodes=EPISODES,
                                   execute=info["io"]["n_action_steps"])
    random = task.rollout(task.random_policy(np.random.default_rng(7)), np.random.default_rng(2024),
                          episodes=EPISODES)
    print(f"demo policy success {trained:.2f}, random {random:.2f}")
    assert trained >= 0.6 and trained >= random + 0.5, (trained, random)
