"""A tiny synthetic reaching task for training and testing a small diffusion policy.

The world is the square [-1, 1]^2. It holds ``NUM_TARGETS`` targets near its corners, each of a
different colour drawn from ``COLORS``, and a point agent. An episode's language instruction
names the goal target by its colour ("move to the red target"); the agent must move there by
emitting 2-D position deltas, at most ``MAX_STEP`` per axis per control step. The episode
succeeds when, after its last step, the agent is within ``SUCCESS_RADIUS`` of the named target
(touching it), so passing by does not count.

The policy observes a ``IMAGE_SIZE`` x ``IMAGE_SIZE`` camera image (``CAMERA``) that shows the
targets and the agent, the agent's past positions (``PROPRIO_FIELD``) and the instruction. The
image and instruction hold everything needed: ``expert_policy`` solves the task from them alone.
Where the target is can only be seen in the image; with more than one target, which one to
reach is only said by the instruction.

``training_windows`` turns scripted expert episodes into training samples laid out the way VLA
Foundry's robotics batches are (current frame, a proprio history, an action window reaching
``past`` steps back and ``future`` steps ahead), and ``compute_stats`` writes the statistics in
VLA Foundry's ``stats.json`` format, used to normalise the low-dimensional fields.

Only numpy is used, so the task can be generated and evaluated without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from vla_foundry.robotics.stats import field_stats

IMAGE_SIZE = 32  # rendered camera height and width, pixels
CAMERA = "scene"
PROPRIO_FIELD = "agent__xy"
ACTION_FIELD = "agent__delta_xy"
COLORS = {"red": (230, 40, 40), "blue": (40, 90, 230), "green": (40, 200, 60), "yellow": (230, 210, 40)}
# Targets per episode, each of a different colour. The demo policy trains on one: with two, a few minutes of
# CPU training teach it to reach a target but not yet to pick the named one (it reached the named one in about
# 55% of episodes, as often as ignoring the instruction does).
NUM_TARGETS = 1
MAX_STEP = 0.25  # largest |delta| per axis per control step, world units
SUCCESS_RADIUS = 0.3  # the agent's disc touches the target's ((3.5 + 2) px ≈ 0.34)
EPISODE_STEPS = 10  # the expert needs at most 6

BACKGROUND = 30
AGENT_COLOR = (255, 255, 255)
TARGET_RADIUS_PX = 3.5
AGENT_RADIUS_PX = 2.0
# Targets sit near the corners of the scene (one per corner at most, jittered): the camera must show
# which colour is where, and the instruction which colour to reach.
TARGET_SPOTS = ((-0.6, -0.6), (-0.6, 0.6), (0.6, -0.6), (0.6, 0.6))
TARGET_JITTER = 0.1  # targets lie in [-0.7, 0.7]^2, at least 1.0 apart
AGENT_RANGE = 0.9
MIN_AGENT_TARGET_DISTANCE = 0.5  # no episode starts already solved or with the agent hiding a target


# An observation is {"images": {CAMERA: (H, W, 3) uint8}, "agent_xy_history": [(2,), ...],
# "instruction": str}; a policy maps it to a (K, 2) chunk of deltas to execute from now on.
Policy = Callable[[dict], np.ndarray]


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class ReachState:
    agent: np.ndarray  # (2,) float32 world position
    targets: dict[str, np.ndarray]  # colour name -> (2,) float32 world position
    goal: str  # colour name of the target to reach


def instruction(goal: str) -> str:
    return f"move to the {goal} target"


def goal_from_instruction(text: str) -> str:
    """The colour named in an instruction made by ``instruction``."""
    named = [color for color in COLORS if color in text.split()]
    if len(named) != 1:
        raise ValueError(f"instruction {text!r} names {len(named)} known colours, expected exactly one")
    return named[0]


def _uniform_point(rng: np.random.Generator, half_width: float) -> np.ndarray:
    return rng.uniform(-half_width, half_width, size=2).astype(np.float32)


def sample_state(rng: np.random.Generator, num_targets: int = NUM_TARGETS) -> ReachState:
    """A random start: ``num_targets`` targets of distinct random colours near distinct corners, the agent away
    from all of them, the goal one of them."""
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[:num_targets]]
    spots = rng.permutation(len(TARGET_SPOTS))[:num_targets]
    targets = {color: (np.asarray(TARGET_SPOTS[spot], np.float32) + _uniform_point(rng, TARGET_JITTER))
               for color, spot in zip(colors, spots)}
    while True:
        agent = _uniform_point(rng, AGENT_RANGE)
        if all(np.linalg.norm(agent - target) >= MIN_AGENT_TARGET_DISTANCE for target in targets.values()):
            break
    goal = colors[rng.integers(len(colors))]
    return ReachState(agent=agent, targets=targets, goal=goal)


# Pixel (row, col) covers [row, row + 1) x [col, col + 1) in pixel coordinates; its centre is at +0.5.
# World x grows with the column, world y grows upwards (y = +1 is the top row).
def _world_to_pixel(xy: np.ndarray) -> tuple[float, float]:
    """(row, col) continuous pixel coordinates of a world point."""
    return (1.0 - float(xy[1])) / 2.0 * IMAGE_SIZE, (float(xy[0]) + 1.0) / 2.0 * IMAGE_SIZE


def _pixel_to_world(row: float, col: float) -> np.ndarray:
    return np.array([col / IMAGE_SIZE * 2.0 - 1.0, 1.0 - row / IMAGE_SIZE * 2.0], dtype=np.float32)


_PIXEL_ROWS, _PIXEL_COLS = np.meshgrid(np.arange(IMAGE_SIZE) + 0.5, np.arange(IMAGE_SIZE) + 0.5, indexing="ij")


def _disc_mask(center_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """(H, W) bool: the pixels whose centres lie within ``radius_px`` of the world point."""
    row, col = _world_to_pixel(center_xy)
    return (_PIXEL_ROWS - row) ** 2 + (_PIXEL_COLS - col) ** 2 <= radius_px ** 2


def render(state: ReachState) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) uint8 camera image: target discs, with the agent drawn on top."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.uint8)
    for color, position in state.targets.items():
        image[_disc_mask(position, TARGET_RADIUS_PX)] = COLORS[color]
    # Drawn last so the agent stays visible when it sits on a target (it is smaller than a target,
    # so a target is never fully hidden either).
    image[_disc_mask(state.agent, AGENT_RADIUS_PX)] = AGENT_COLOR
    return image


def locate(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """(2,) float32 world position of the centroid of the pixels with exactly colour ``rgb``."""
    rows, cols = np.nonzero(np.all(image == np.asarray(rgb, dtype=image.dtype), axis=-1))
    if rows.size == 0:
        raise ValueError(f"no pixel of colour {tuple(rgb)} in the image")
    return _pixel_to_world(rows.mean() + 0.5, cols.mean() + 0.5)


def expert_action(state: ReachState) -> np.ndarray:
    """(2,) float32 delta straight toward the goal, clipped per axis; about zero once arrived."""
    delta = state.targets[state.goal] - state.agent
    return np.clip(delta, -MAX_STEP, MAX_STEP).astype(np.float32)


def step(state: ReachState, action: np.ndarray) -> ReachState:
    """The state after applying ``action`` (clipped to the step limit; the agent stays in the world)."""
    delta = np.clip(np.asarray(action, dtype=np.float32), -MAX_STEP, MAX_STEP)
    return replace(state, agent=np.clip(state.agent + delta, -1.0, 1.0).astype(np.float32))


def success(state: ReachState) -> bool:
    return bool(np.linalg.norm(state.agent - state.targets[state.goal]) < SUCCESS_RADIUS)


def expert_episode(state: ReachState, steps: int) -> tuple[list[ReachState], np.ndarray]:
    """Roll the expert: ``steps + 1`` states and the (steps, 2) actions, action k taken from state k."""
    states, actions = [state], []
    for _ in range(steps):
        actions.append(expert_action(states[-1]))
        states.append(step(states[-1], actions[-1]))
    return states, np.stack(actions).reshape(steps, 2).astype(np.float32)


def training_windows(num_episodes: int, past: int, future: int, rng: np.random.Generator) -> list[dict]:
    """One training sample per step of ``num_episodes`` expert episodes of ``EPISODE_STEPS`` steps.

    Each sample is ``{"images": {CAMERA: (H, W, 3) uint8 current frame}, "lowdim": {PROPRIO_FIELD:
    (past + 1, 2) agent positions at t - past .. t, ACTION_FIELD: (past + 1 + future, 2) expert actions
    at t - past .. t + future}, "instruction": str}``, so row ``past`` of the actions is the action to
    take now. Positions before the episode repeat the first one (the agent stood still); actions
    outside the episode are zero (nothing moved before it, and the expert has arrived after it).
    """
    windows = []
    for _ in range(num_episodes):
        states, actions = expert_episode(sample_state(rng), EPISODE_STEPS)
        positions = np.stack([s.agent for s in states[:EPISODE_STEPS]])  # (EPISODE_STEPS, 2)
        padded_positions = np.concatenate([np.repeat(positions[:1], past, axis=0), positions])
        zeros = np.zeros((1, 2), dtype=np.float32)
        padded_actions = np.concatenate([np.repeat(zeros, past, axis=0), actions, np.repeat(zeros, future, axis=0)])
        text = instruction(states[0].goal)
        for t in range(EPISODE_STEPS):
            # Index t of the episode is index t + past of the padded arrays.
            windows.append({
                "images": {CAMERA: render(states[t])},
                "lowdim": {
                    PROPRIO_FIELD: padded_positions[t:t + past + 1].astype(np.float32),
                    ACTION_FIELD: padded_actions[t:t + past + 1 + future].astype(np.float32),
                },
                "instruction": text,
            })
    return windows


def compute_stats(windows: list[dict], past: int) -> dict[str, dict]:
    """``stats.json`` statistics of every lowdim field over ``windows`` (see ``vla_foundry.robotics.stats``)."""
    fields = {f: np.stack([w["lowdim"][f] for w in windows]) for f in windows[0]["lowdim"]}  # (N, Ts, d) each
    for f, x in fields.items():
        if x.ndim != 3 or x.shape[1] < past + 1:
            raise ValueError(f"field {f!r} has windows of shape {x.shape[1:]}, expected (>= {past + 1}, d)")
    return field_stats(fields)


def observe(state: ReachState, history: list[np.ndarray]) -> dict:
    """What a policy sees: the camera image, the agent positions so far (oldest first), the instruction."""
    return {
        "images": {CAMERA: render(state)},
        "agent_xy_history": [p.copy() for p in history],
        "instruction": instruction(state.goal),
    }


def rollout(policy: Policy, rng: np.random.Generator, episodes: int, steps: int = EPISODE_STEPS,
            execute: int = 4) -> float:
    """Fraction of ``episodes`` random episodes that end with the agent at the goal.

    The policy is queried for a (K, 2) chunk of deltas, the first ``min(K, execute)`` are executed, and
    it is queried again until ``steps`` actions have run. Success is judged after the last step: the
    agent must reach the named target and stay there, so passing by both targets does not count.
    """
    successes = 0
    for _ in range(episodes):
        state = sample_state(rng)
        history = [state.agent]
        executed = 0
        while executed < steps:
            chunk = np.asarray(policy(observe(state, history)), dtype=np.float32)
            if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != 2:
                raise ValueError(f"a policy must return a (K, 2) chunk with K >= 1, got shape {chunk.shape}")
            for action in chunk[:min(execute, steps - executed)]:
                state = step(state, action)
                history.append(state.agent)
                executed += 1
        successes += success(state)
    return successes / episodes


def random_policy(rng: np.random.Generator, chunk: int = 4) -> Policy:
    """A baseline that ignores its observation: uniform deltas in [-MAX_STEP, MAX_STEP], shape (chunk, 2)."""
    def policy(observation: dict) -> np.ndarray:
        return rng.uniform(-MAX_STEP, MAX_STEP, size=(chunk, 2)).astype(np.float32)
    return policy


def expert_policy(chunk: int = 4) -> Policy:
    """The expert acting from pixels and the instruction only, showing the image holds all it needs.

    Positions come from ``locate`` on the image (colour centroids), then the expert is rolled ``chunk``
    steps ahead on that reconstructed state, so the chunk stops at the target instead of overshooting.
    """
    def policy(observation: dict) -> np.ndarray:
        image = observation["images"][CAMERA]
        goal = goal_from_instruction(observation["instruction"])
        seen = ReachState(agent=locate(image, AGENT_COLOR), targets={goal: locate(image, COLORS[goal])}, goal=goal)
        return expert_episode(seen, chunk)[1]
    return policy
