import json

import numpy as np
import pytest

from vla_foundry.demo import reach_task as rt

PIXEL = 2.0 / rt.IMAGE_SIZE  # world units per pixel


def test_render_places_every_object_where_the_world_says():
    for seed in range(20):
        state = rt.sample_state(np.random.default_rng(seed))
        image = rt.render(state)
        assert image.shape == (rt.IMAGE_SIZE, rt.IMAGE_SIZE, 3) and image.dtype == np.uint8
        assert np.abs(rt.locate(image, rt.AGENT_COLOR) - state.agent).max() < 1.5 * PIXEL
        assert len(state.targets) == rt.NUM_TARGETS and state.goal in state.targets
        for color, xy in state.targets.items():
            assert np.abs(rt.locate(image, rt.COLORS[color]) - xy).max() < 1.5 * PIXEL
        for absent in set(rt.COLORS) - set(state.targets):
            with pytest.raises(ValueError, match="no pixel"):
                rt.locate(image, rt.COLORS[absent])


def test_render_orientation_and_locate_without_the_colour():
    # x grows to the right, y grows upwards.
    state = rt.ReachState(agent=np.array([0.0, 0.0], np.float32), goal="red",
                          targets={"red": np.array([0.7, 0.7], np.float32), "blue": np.array([-0.7, -0.7], np.float32)})
    image = rt.render(state)
    red = np.all(image == rt.COLORS["red"], axis=-1)
    rows, cols = np.nonzero(red)
    assert rows.max() < rt.IMAGE_SIZE // 2 and cols.min() > rt.IMAGE_SIZE // 2  # top right
    with pytest.raises(ValueError, match="no pixel"):
        rt.locate(image, (1, 2, 3))


def test_sample_state_respects_its_constraints():
    for seed in range(100):
        state = rt.sample_state(np.random.default_rng(seed))
        points = list(state.targets.values())
        assert all(np.linalg.norm(a - b) >= 0.6 for i, a in enumerate(points) for b in points[i + 1:])
        assert all(np.abs(t).max() <= 0.8 for t in state.targets.values())
        assert np.abs(state.agent).max() <= 0.9 and state.agent.dtype == np.float32
        assert min(np.linalg.norm(state.agent - t) for t in state.targets.values()) >= 0.5
        assert state.goal in rt.COLORS and not rt.success(state)


def test_expert_reaches_the_goal_from_any_start():
    for seed in range(100):
        start = rt.sample_state(np.random.default_rng(seed))
        states, actions = rt.expert_episode(start, rt.EPISODE_STEPS)
        assert len(states) == rt.EPISODE_STEPS + 1 and actions.shape == (rt.EPISODE_STEPS, 2)
        assert np.abs(actions).max() <= rt.MAX_STEP
        assert rt.success(states[-1])
        assert np.abs(actions[-1]).max() < 1e-6  # arrived, so it stands still
    assert np.array_equal(start.agent, states[0].agent)  # step returns new states, it does not mutate


def test_step_clips_the_action_and_the_world():
    state = rt.ReachState(agent=np.array([0.9, 0.0], np.float32), goal="red",
                          targets={"red": np.zeros(2, np.float32), "blue": np.ones(2, np.float32)})
    moved = rt.step(state, np.array([1.0, -1.0]))
    np.testing.assert_allclose(moved.agent, [1.0, -rt.MAX_STEP])
    np.testing.assert_allclose(state.agent, [0.9, 0.0])


def test_rollout_separates_the_expert_from_random_actions():
    # Success is judged at the end of the episode. Measured over 300 episodes (3 seeds): expert 1.00,
    # random 0.00-0.02.
    expert = rt.rollout(rt.expert_policy(), np.random.default_rng(0), episodes=100)
    random = rt.rollout(rt.random_policy(np.random.default_rng(1)), np.random.default_rng(0), episodes=100)
    assert expert >= 0.95
    assert random <= 0.1


def test_rollout_hands_the_policy_its_observation_and_executes_part_of_each_chunk():
    calls = []

    def still(observation):
        calls.append(observation)
        return np.zeros((6, 2), np.float32)

    assert rt.rollout(still, np.random.default_rng(0), episodes=1, steps=10, execute=4) == 0.0
    assert len(calls) == 3  # 4 + 4 + 2 actions
    assert [len(c["agent_xy_history"]) for c in calls] == [1, 5, 9]
    assert calls[0]["images"][rt.CAMERA].shape == (rt.IMAGE_SIZE, rt.IMAGE_SIZE, 3)
    assert rt.goal_from_instruction(calls[0]["instruction"]) in rt.COLORS
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        rt.rollout(lambda observation: np.zeros(2), np.random.default_rng(0), episodes=1)


def test_training_windows_layout_and_padding():
    past, future = 2, 5
    windows = rt.training_windows(3, past, future, np.random.default_rng(0))
    assert len(windows) == 3 * rt.EPISODE_STEPS
    first = windows[0]
    assert first["images"][rt.CAMERA].shape == (rt.IMAGE_SIZE, rt.IMAGE_SIZE, 3)
    assert first["images"][rt.CAMERA].dtype == np.uint8
    proprio, actions = first["lowdim"][rt.PROPRIO_FIELD], first["lowdim"][rt.ACTION_FIELD]
    assert proprio.shape == (past + 1, 2) and proprio.dtype == np.float32
    assert actions.shape == (past + 1 + future, 2) and actions.dtype == np.float32
    assert (proprio == proprio[past]).all()  # copy padding: the agent stood at its start
    assert (actions[:past] == 0).all() and np.abs(actions[past]).max() > 0  # zero padding, then the first move
    assert first["instruction"] in {rt.instruction(c) for c in rt.COLORS}

    # Row `past` of the actions moves the agent from this window's position to the next window's.
    for now, later in zip(windows[:rt.EPISODE_STEPS - 1], windows[1:rt.EPISODE_STEPS]):
        position, next_position = now["lowdim"][rt.PROPRIO_FIELD][past], later["lowdim"][rt.PROPRIO_FIELD][past]
        np.testing.assert_allclose(position + now["lowdim"][rt.ACTION_FIELD][past], next_position, atol=1e-6)
        np.testing.assert_array_equal(later["lowdim"][rt.PROPRIO_FIELD][:past], now["lowdim"][rt.PROPRIO_FIELD][1:])
    assert (windows[rt.EPISODE_STEPS - 1]["lowdim"][rt.ACTION_FIELD][past + 1:] == 0).all()  # past the end


def test_compute_stats_format_and_values():
    past, future = 1, 3
    windows = rt.training_windows(4, past, future, np.random.default_rng(0))
    stats = rt.compute_stats(windows, past)
    assert set(stats) == {rt.PROPRIO_FIELD, rt.ACTION_FIELD}
    summaries = ["mean", "std", "min", "max"] + [f"percentile_{q}" for q in (1, 2, 5, 95, 98, 99)]
    for field, steps in [(rt.PROPRIO_FIELD, past + 1), (rt.ACTION_FIELD, past + 1 + future)]:
        assert set(stats[field]) == {*summaries, *(f"{s}_per_timestep" for s in summaries), "count"}
        assert stats[field]["count"] == len(windows)
        for s in summaries:
            assert np.shape(stats[field][s]) == (2,)
            assert np.shape(stats[field][f"{s}_per_timestep"]) == (steps, 2)
    json.dumps(stats)  # plain Python numbers only

    x = np.stack([w["lowdim"][rt.ACTION_FIELD] for w in windows]).astype(np.float64)  # (N, Ts, 2)
    action_stats = stats[rt.ACTION_FIELD]
    np.testing.assert_allclose(action_stats["mean"], x.reshape(-1, 2).mean(0))
    np.testing.assert_allclose(action_stats["std"], x.reshape(-1, 2).std(0))
    np.testing.assert_allclose(action_stats["percentile_98"], np.percentile(x.reshape(-1, 2), 98, axis=0))
    np.testing.assert_allclose(action_stats["max_per_timestep"], x.max(0))
    np.testing.assert_allclose(action_stats["percentile_5_per_timestep"], np.percentile(x, 5, axis=0))
