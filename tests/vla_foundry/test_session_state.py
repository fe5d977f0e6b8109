"""A robot session that moves between processes (``PolicySession.export`` / ``restore``): restored at every step, it
serves exactly the actions of a session that never moved, in chunk mode and in step mode, and what it carries stays
bounded however long the episode runs."""

from __future__ import annotations

import time

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
    session did, without recording or planning anything; the same step with another observation is refused."""
    from vla_foundry.errors import StaleObservationError

    session = PolicySession(policy, seed=3, open_loop_steps=2)
    for step in (0, 1):
        first = session.step(*observation(policy, step), "pick", step=step, num_inference_steps=2)
    elsewhere = moved(policy, session)
    with pytest.raises(StaleObservationError) as other:  # another observation for that step: its answer stands
        elsewhere.step(*observation(policy, 99), "pick", step=1, num_inference_steps=2)
    assert other.value.field == "step" and "another observation" in str(other.value)
    with pytest.raises(StaleObservationError):
        elsewhere.step(*observation(policy, 1), "place", step=1, num_inference_steps=2)  # another instruction
    again = elsewhere.step(*observation(policy, 1), "pick", step=1, num_inference_steps=2)
    np.testing.assert_array_equal(again.action, first.action)
    assert (again.step, again.replanned, again.plan_step, again.valid_until) == (
        first.step, first.replanned, first.plan_step, first.valid_until)
    assert elsewhere.info() == session.info() and elsewhere.steps_served == session.steps_served
    # a step answered for a request that named none: no later request naming it is its resend (its observation was
    # not hashed, so another one must not get its answer)
    unnamed = elsewhere.step(*observation(policy, 2), "pick", num_inference_steps=2)
    with pytest.raises(StaleObservationError):
        elsewhere.step(*observation(policy, 50), "pick", step=unnamed.step, num_inference_steps=2)


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


def test_a_chunk_sent_again_gets_its_answer_on_a_restored_session_and_moves_nothing(policy):
    """Chunk mode: the last request sent again with its step and timestamp gets its chunk (also from a session
    restored elsewhere, as a replica that did not serve it), records and plans nothing; another timestamp for that
    step is refused, naming ``step``; the next request plans as if the first had been sent once."""
    from vla_foundry.errors import StaleObservationError

    session, twin = PolicySession(policy, seed=5), PolicySession(policy, seed=5)
    now = time.time()
    first = session.chunk(*observation(policy, 0), "pick", step=0, timestamp=now, num_inference_steps=2)
    twin.chunk(*observation(policy, 0), "pick", step=0, timestamp=now, num_inference_steps=2)
    elsewhere = moved(policy, session)
    with pytest.raises(StaleObservationError) as changed:  # the same step and timestamp, another observation
        elsewhere.chunk(*observation(policy, 99), "pick", step=0, timestamp=now, num_inference_steps=2)
    assert changed.value.field == "step"
    again = elsewhere.chunk(*observation(policy, 0), "pick", step=0, timestamp=now, seed=123, num_inference_steps=2)
    assert first.timing_ms and again.timing_ms == {"preprocess": 0.0}  # a replay ran no model: no model times
    np.testing.assert_array_equal(again.action_chunk, first.action_chunk)
    assert (again.step, again.seed, again.valid_until, again.timestamp) == (
        first.step, first.seed, first.valid_until, first.timestamp)
    assert elsewhere.info() == session.info() and elsewhere.history.last_step == 0
    with pytest.raises(StaleObservationError) as other:
        elsewhere.chunk(*observation(policy, 0), "pick", step=0, timestamp=now + 0.01, num_inference_steps=2)
    assert other.value.field == "step"
    later = elsewhere.chunk(*observation(policy, 2), "pick", step=2, num_inference_steps=2)
    expected = twin.chunk(*observation(policy, 2), "pick", step=2, num_inference_steps=2)
    np.testing.assert_array_equal(later.action_chunk, expected.action_chunk)
    assert later.seed == expected.seed == 5 + 1


def test_a_step_refuses_a_row_the_model_would_overflow_on_and_moves_nothing(policy):
    """A step that only hands out its plan checks its proprioception row as the model call would (without the
    model): refused, the session is as before, and its next steps are those of a session that never got it."""
    from vla_foundry.errors import InvalidInputError

    session, clean = PolicySession(policy, seed=2, open_loop_steps=3), PolicySession(policy, seed=2, open_loop_steps=3)
    for s in (session, clean):
        s.step(*observation(policy, 0), "pick", step=0, num_inference_steps=2)
    before = session.export()
    images, lowdim = observation(policy, 1)
    field = policy.robot_io.proprioception_fields[0]
    with pytest.raises(InvalidInputError) as refused:
        session.step(images, {**lowdim, field: np.full_like(lowdim[field], 3e38)}, "pick", step=1)
    assert refused.value.field == f"observation.lowdim.{field}"
    np.testing.assert_equal(session.export(), before)  # nothing recorded, counted or planned
    for step in (1, 2, 3, 4):  # step 3 replans on a window that holds step 1's row and 2's
        got = session.step(*observation(policy, step), "pick", step=step, num_inference_steps=2)
        expected = clean.step(*observation(policy, step), "pick", step=step, num_inference_steps=2)
        np.testing.assert_array_equal(got.action, expected.action)
        assert got.replanned == expected.replanned


def test_the_row_check_refuses_what_the_model_overflows_on_and_passes_what_it_takes(tiny_checkpoints, policy):
    """The check runs without the model, yet refuses rows the model call would refuse and passes real ones: the
    bound is far below where the model overflows (float32), and follows the model's dtype (float16 overflows on
    rows that float32 takes)."""
    from vla_foundry.errors import InvalidInputError
    from vla_foundry.pipelines.action import PolicyRequest
    from vla_foundry.robotics.observations import RawObservation

    io = policy.robot_io
    field = io.proprioception_fields[0]
    d = io.field_dims[field]

    def request(value: float) -> PolicyRequest:
        frame = np.zeros((24, 40, 3), np.uint8)
        lowdim = {f: np.zeros((io.past_steps + 1, io.field_dims[f]), np.float32) for f in io.proprioception_fields}
        lowdim[field] = np.full((io.past_steps + 1, d), value, np.float32)
        return PolicyRequest(RawObservation({n: frame for n in io.image_names}, lowdim, "pick"), seed=0)

    half = load_pipeline(tiny_checkpoints["diffusion_policy"], traced_sampling=False, dtype="float16")
    for value in (0.5, 50.0):  # real rows pass, the model takes them
        policy.check_magnitudes(field, np.full((1, d), value, np.float32), "x")
        assert not isinstance(policy.predict_each([request(value)])[0], Exception)
    for value in (1e30, 3e38):  # the model overflows on these: the check refuses them first
        assert isinstance(policy.predict_each([request(value)])[0], InvalidInputError)
        with pytest.raises(InvalidInputError, match="far outside the range"):
            policy.check_magnitudes(field, np.full((1, d), value, np.float32), f"observation.lowdim.{field}")
    policy.check_magnitudes(field, np.full((1, d), 1e6, np.float32), "x")  # float32 takes it
    assert not isinstance(policy.predict_each([request(1e6)])[0], Exception)
    assert isinstance(half.predict_each([request(1e6)])[0], InvalidInputError)  # float16 overflows on it
    with pytest.raises(InvalidInputError):
        half.check_magnitudes(field, np.full((1, d), 1e6, np.float32), "x")
    half.check_magnitudes(field, np.full((1, d), 1000.0, np.float32), "x")  # float16 takes it: passed
    assert not isinstance(half.predict_each([request(1000.0)])[0], Exception)
