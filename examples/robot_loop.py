"""A robot loop against the served demo policy, on the simulated reach task.

Start a server with the demo policy, then run the loop::

    vla-foundry serve                                  # the demo pack, demo-diffusion_policy among it
    python examples/robot_loop.py --episodes 20        # HTTP + msgpack
    python examples/robot_loop.py --transport websocket

Each control step the robot sends only what it sees now: the camera frame, its current (2,)
position and the instruction. The server's session keeps the history the policy needs, and
``ActionChunkBroker`` asks for a new chunk every ``n_action_steps`` steps. The robot is
``vla_foundry.demo.reach_task`` (numpy only): move the agent onto the target the instruction names.

The client (``vla_foundry_client``) needs only numpy, msgpack and websockets; the simulated
robot comes from the ``vla_foundry`` package, so this example runs where that is installed.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# Run from a checkout without reinstalling: the client package sits beside examples/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vla_foundry.demo import reach_task as task  # noqa: E402  (numpy only: the simulated robot)
from vla_foundry_client import ActionChunkBroker, HttpPolicyClient, WebsocketPolicyClient  # noqa: E402


def connect(url: str, transport: str, model: Optional[str] = None):
    """A policy client with a session of its own, so the robot can send only the current step."""
    if transport == "websocket":
        return WebsocketPolicyClient(url, model=model)  # the connection is the session
    return HttpPolicyClient(url, model=model, session_id=f"robot-loop-{uuid.uuid4().hex[:8]}")


def observe(state: task.ReachState) -> dict:
    """What the robot sends at a step: the current frame and position, and the instruction."""
    return {"images": {task.CAMERA: task.render(state)},
            "lowdim": {task.PROPRIO_FIELD: state.agent},
            "language_instruction": task.instruction(state.goal)}


def run_episodes(client, episodes: int, seed: int = 0, steps: int = task.EPISODE_STEPS) -> float:
    """Success rate of ``episodes`` reach-task episodes driven by the policy behind ``client``."""
    broker = ActionChunkBroker(client)
    rng = np.random.default_rng(seed)
    successes = 0
    for _ in range(episodes):
        state = task.sample_state(rng)
        broker.reset()  # a new episode: the session must not remember the last one
        for _ in range(steps):
            state = task.step(state, broker.act(observe(state)))
        successes += task.success(state)
    return successes / episodes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (http:// or ws://)")
    parser.add_argument("--transport", choices=["http", "websocket"], default="http")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--model", default=None, help="the policy deployment (default: the one served)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the episodes' start states")
    args = parser.parse_args(argv)
    with connect(args.url, args.transport, args.model) as client:
        rate = run_episodes(client, args.episodes, seed=args.seed)
    print(f"success rate: {rate:.2f} over {args.episodes} episodes ({args.transport})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
