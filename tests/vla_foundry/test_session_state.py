"""A robot session that moves between processes (``PolicySession.export`` / ``restore``): restored at every step, it
serves exactly the actions of a session that never moved, in chunk mode and in step mode, and what it carries stays
bounded however long the episode runs."""

from __future__ import annotations

import numpy as np
import pytest

from vla_foundry.pipelines import load_pipeline
from vla_foundry.robotics.session import PolicySession


@pytest.fixture(scope="module")
def policy(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints["diffusion_policy"])


def observation(policy, step: int) -> tuple[dict, dict]:
    """Step ``step``'s frames (one per camera) and proprioception rows, different at every step."""
    rng = np.random.default_rng(step)
    io = policy.robot_io
    images = {c: rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for c in io.camera_names}
    lowdim = {f: rng.normal(size=io.field_dims[f]).astype(np.float32) for f in io.proprioception_fields}
    return images, lowdim


def plain(value) -> bool:
    """Only what a store can write without pickling: dicts of str/int keys, lists, numbers, strings, None, arrays."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, np.ndarray))


def moved(policy, session: PolicySession) -> PolicySession:
    state = session.export()
    assert plain(state)
    return PolicySession.restore(policy, state)


def test_a_chunk_mode_session_restored_at_every_request_gives_the_actions_of_one_that_never_moved(policy):
    staying, moving = PolicySession(policy, seed=7), PolicySession(policy, seed=7)
    instruction = "pick up the red block"
    for step in (0, 2, 4, 5, 9, 13, 14):  # the robot executes a few actions of each chunk, sometimes one
        images, lowdim = observation(policy, step)
        expected = staying.chunk(images, lowdim, instruction, step=step, num_inference_steps=3)
        moving = moved(policy, moving)
        got = moving.chunk(images, lowdim, instruction, step=step, num_inference_steps=3)
        np.testing.assert_array_equal(got.action_chunk, expected.action_chunk)
        assert got.seed == expected.seed
    assert moving.info() == staying.info()


def test_a_step_mode_session_restored_at_every_step_replans_and_hands_out_its_plan_alike(policy):
    staying = PolicySession(policy, seed=3, open_loop_steps=3)
    moving = PolicySession(policy, seed=3, open_loop_steps=3)
    for step in [*range(8), 12, 13, 14]:  # a jump out of the plan replans too
        images, lowdim = observation(policy, step)
        expected = staying.step(images, lowdim, "pick", step=step, num_inference_steps=2)
        moving = moved(policy, moving)
        got = moving.step(images, lowdim, "pick", step=step, num_inference_steps=2)
        np.testing.assert_array_equal(got.action, expected.action)
        assert (got.replanned, got.plan_step, got.seed) == (expected.replanned, expected.plan_step, expected.seed)


def test_a_step_sent_again_to_a_restored_session_gets_its_answer_and_moves_nothing(policy):
    """Another process (a replica) that gets a step sent again (its reply lost on the way back) answers it as the
    session did, without recording or planning anything."""
    session = PolicySession(policy, seed=3, open_loop_steps=2)
    for step in (0, 1):
        first = session.step(*observation(policy, step), "pick", step=step, num_inference_steps=2)
    elsewhere = moved(policy, session)
    again = elsewhere.step(*observation(policy, 99), "pick", step=1, num_inference_steps=2)
    np.testing.assert_array_equal(again.action, first.action)
    assert (again.step, again.replanned, again.plan_step, again.valid_until) == (
        first.step, first.replanned, first.plan_step, first.valid_until)
    assert elsewhere.info() == session.info() and elsewhere.steps_served == session.steps_served


def test_what_a_session_carries_stays_bounded_however_long_the_episode(policy):
    session = PolicySession(policy, seed=0, open_loop_steps=4)
    sizes = {}
    for step in range(120):
        session.step(*observation(policy, step), "pick", step=step, num_inference_steps=1)
        if step in (30, 119):
            state = session.export()
            history = state["history"]
            sizes[step] = sum(a.nbytes for t in (*history["frames"].values(), *history["lowdim"].values(),
                                                 history["actions"]) for a in t.values())
            span = session.history.span
            assert all(len(t) <= span + 2 for t in (*history["frames"].values(), *history["lowdim"].values()))
    assert sizes[119] <= 1.05 * sizes[30]  # (the plan's future actions vary a little with where it started)
