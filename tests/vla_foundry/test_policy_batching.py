"""``ActionPipeline.predict_each``: several robots' requests in one model call, each answered exactly as alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.factories import POLICY_ACTIONS, tiny_model, tiny_policy_params
from tests.vla_foundry.test_diffusion_policy import TINY_VIT, in_memory_pipeline, observation
from vla_foundry.params.clip import ViTBackboneParams
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.action import PolicyRequest
from vla_foundry.robotics.observations import RawObservation

ATOL = 1e-5


def fixture_requests(policy_fixture) -> tuple[list[PolicyRequest], list[dict]]:
    """The fixture's two recorded samples (sample 0 with its past action row) and their expected actions."""
    raw = load_file(str(policy_fixture / "expected" / "preprocess.safetensors"))
    out = load_file(str(policy_fixture / "expected" / "generate_actions_steps10.safetensors"))
    cases = json.loads((policy_fixture / "expected" / "cases.json").read_text())["preprocess"]
    requests, expected = [], []
    for b, instruction in enumerate(cases["language_instructions"]):
        images = {f"{cam}_t{i}": raw[f"input.raw_image.{b}.{cam}_t{i}"].numpy()
                  for cam in ("scene_left", "wrist_right") for i in (-1, 0)}
        proprio = {f: raw[f"input.raw_lowdim.{b}.{f}"][:2].numpy() for f in cases["proprioception_fields"]}
        past = ({f: raw[f"input.raw_lowdim.{b}.{f}"][:1].numpy() for f in cases["action_fields"]}
                if bool(out["input.past_mask"][b, 0]) else None)
        requests.append(PolicyRequest(RawObservation(images, proprio, instruction, past),
                                      noise=out["input.initial_noise"][b].numpy()))
        expected.append({f: out[f"output.denormalized.{f}"][b].numpy() for f in cases["action_fields"]})
    return requests, expected


def test_the_fixture_samples_batched_give_the_fixture_actions(policy_fixture):
    pipeline = load_pipeline(policy_fixture)
    requests, expected = fixture_requests(policy_fixture)
    outs = pipeline.predict_each(requests, num_inference_steps=10)
    for out, want in zip(outs, expected):
        for field, values in want.items():
            np.testing.assert_allclose(out.actions[field], values, atol=ATOL)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints["diffusion_policy"])


def mixed_requests(io) -> list[PolicyRequest]:
    """Different seeds, prompts, frame sizes, one with its own noise, one with a past action row."""
    rng = np.random.default_rng(7)
    requests = [PolicyRequest(observation(io, seed=i, instruction=["go", "pick up the red block now", "stop"][i % 3],
                                          size=[(24, 40), (30, 30)][i % 2]), seed=100 + i) for i in range(6)]
    requests[2].noise = rng.standard_normal((io.action_steps, io.action_dim)).astype(np.float32)
    sample = requests[4].sample
    requests[4].sample = RawObservation(sample.images, sample.lowdim, sample.instruction,
                                        {f: rng.uniform(-1, 1, (io.past_steps, d)).astype(np.float32)
                                         for f, d in POLICY_ACTIONS.items()})
    return requests


def test_each_batched_answer_equals_its_solo_answer(tiny_pipeline):
    requests = mixed_requests(tiny_pipeline.robot_io)
    batched = tiny_pipeline.predict_each(requests, num_inference_steps=5)
    for request, out in zip(requests, batched):
        solo = tiny_pipeline.predict([request.sample], num_inference_steps=5, seed=request.seed, noise=request.noise)
        assert out.seed == request.seed
        np.testing.assert_allclose(out.action_chunk, solo["action_chunk"][0], atol=ATOL)
    # a request's answer does not depend on its neighbours or its place in the batch
    again = tiny_pipeline.predict_each(requests[::-1][:3], num_inference_steps=5)
    for out, original in zip(again, batched[::-1][:3]):
        np.testing.assert_allclose(out.action_chunk, original.action_chunk, atol=ATOL)


def test_a_batch_without_seeds_reports_a_fresh_seed_each(tiny_pipeline):
    requests = [PolicyRequest(observation(tiny_pipeline.robot_io, seed=i)) for i in range(3)]
    outs = tiny_pipeline.predict_each(requests)
    seeds = [out.seed for out in outs]
    assert len(set(seeds)) == 3
    replay = tiny_pipeline.predict([requests[1].sample], seed=seeds[1])
    np.testing.assert_allclose(outs[1].action_chunk, replay["action_chunk"][0], atol=ATOL)


def test_ddpm_policies_draw_each_requests_step_noise_from_its_own_seed():
    """A DDPM-trained policy draws noise at every consecutive step: from each request's own generator."""
    policy = tiny_model(tiny_policy_params(ViTBackboneParams(**TINY_VIT), use_flow_matching_scheduler=False))
    pipeline = in_memory_pipeline(policy, "none")
    requests = [PolicyRequest(observation(pipeline.robot_io, seed=i, instruction=""), seed=i) for i in range(3)]
    batched = pipeline.predict_each(requests, num_inference_steps=10)  # T = 10: every step is a DDPM step
    for request, out in zip(requests, batched):
        solo = pipeline.predict([request.sample], num_inference_steps=10, seed=request.seed)
        np.testing.assert_allclose(out.action_chunk, solo["action_chunk"][0], atol=ATOL)


@pytest.mark.parametrize("value", [3e38, 1e13])
def test_a_request_far_outside_the_statistics_fails_alone(tiny_pipeline, value):
    """Finite numbers far outside the statistics (3e38 in a joint position overflows inside the model; 1e13 gave
    the model's saturated output, the same as 1e6) are refused as a session refuses them when it records them:
    that request gets an InvalidInputError naming its field, its neighbours their own answers, from one call."""
    from vla_foundry.errors import InvalidInputError

    requests = mixed_requests(tiny_pipeline.robot_io)[:3]
    bad = requests[1].sample
    huge = {field: np.full_like(values, value) for field, values in bad.lowdim.items()}
    requests[1].sample = RawObservation(bad.images, huge, bad.instruction, bad.past_actions)
    outs = tiny_pipeline.predict_each(requests, num_inference_steps=5)
    field = f"observation.lowdim.{next(iter(huge))}"
    assert isinstance(outs[1], InvalidInputError) and outs[1].field == field, outs[1]
    for i in (0, 2):
        solo = tiny_pipeline.predict([requests[i].sample], num_inference_steps=5, seed=requests[i].seed,
                                     noise=requests[i].noise)
        np.testing.assert_allclose(outs[i].action_chunk, solo["action_chunk"][0], atol=ATOL)
    with pytest.raises(InvalidInputError, match="far outside") as alone:
        tiny_pipeline.predict([requests[1].sample], num_inference_steps=5, seed=1)
    assert alone.value.field == field


def test_past_actions_far_outside_the_statistics_fail_alone_naming_their_field(tiny_pipeline):
    """A past action the robot sent, normalized beyond the policy's bound: that request is refused naming the action
    field (the second one here, to check the columns' fields), its neighbours answered."""
    from vla_foundry.errors import InvalidInputError

    requests = mixed_requests(tiny_pipeline.robot_io)[3:6]  # the middle one sends past action rows
    sample = requests[1].sample
    fields = list(POLICY_ACTIONS)
    past = {f: v.copy() for f, v in sample.past_actions.items()}
    past[fields[1]][:] = 1e13
    requests[1].sample = RawObservation(sample.images, sample.lowdim, sample.instruction, past)
    outs = tiny_pipeline.predict_each(requests, num_inference_steps=5)
    assert isinstance(outs[1], InvalidInputError) and outs[1].field == f"past_actions.{fields[1]}", outs[1]
    assert not isinstance(outs[0], Exception) and not isinstance(outs[2], Exception)


def test_noise_that_overflows_the_model_fails_alone(tiny_pipeline):
    """Explicit noise of 1e30 makes the actions infinite: that request fails (naming the observation or the
    noise), its neighbours do not."""
    from vla_foundry.errors import InvalidInputError

    requests = mixed_requests(tiny_pipeline.robot_io)[:3]
    r = tiny_pipeline.robot_io
    requests[1].noise = np.full((r.action_steps, r.action_dim), 1e30, np.float32)
    outs = tiny_pipeline.predict_each(requests, num_inference_steps=5)
    assert isinstance(outs[1], InvalidInputError) and "NaN or infinite" in str(outs[1])
    assert not isinstance(outs[0], Exception) and not isinstance(outs[2], Exception)


def evaluations(io) -> list:
    """Three clients' evaluations: different seeds and sample counts, one scoring every row."""
    from vla_foundry.pipelines.action import PolicyEvaluation

    rng = np.random.default_rng(3)
    window = lambda: {f: rng.uniform(-1, 1, (io.action_steps, d)).astype(np.float32)  # noqa: E731
                      for f, d in POLICY_ACTIONS.items()}
    return [PolicyEvaluation([r.sample for r in mixed_requests(io)[start:start + n]], [window() for _ in range(n)],
                             seed=seed, condition_on_past=past)
            for start, n, seed, past in ((0, 1, 11, True), (1, 3, 12, False), (4, 2, 13, True))]


def test_each_batched_evaluation_equals_its_solo_evaluation(tiny_pipeline):
    batch = evaluations(tiny_pipeline.robot_io)
    together = tiny_pipeline.evaluate_each(batch)
    for evaluation, out in zip(batch, together):
        alone = tiny_pipeline.evaluate(evaluation.samples, evaluation.action_windows, seed=evaluation.seed,
                                       condition_on_past=evaluation.condition_on_past)
        assert out["loss"] == pytest.approx(alone["loss"], abs=1e-5)
        assert (out["timesteps"], out["num_action_rows"], out["num_samples"], out["seed"]) == \
               (alone["timesteps"], alone["num_action_rows"], alone["num_samples"], alone["seed"])
    assert together[0]["num_action_rows"] < together[1]["num_action_rows"] / 3  # past rows scored only in [1]


def test_an_evaluation_whose_loss_overflows_fails_alone(tiny_pipeline):
    from vla_foundry.errors import InvalidInputError

    batch = evaluations(tiny_pipeline.robot_io)
    batch[1].action_windows = [{f: np.full_like(v, 1e20) for f, v in w.items()} for w in batch[1].action_windows]
    outs = tiny_pipeline.evaluate_each(batch)
    assert isinstance(outs[1], InvalidInputError) and outs[1].field == "samples"
    assert all(isinstance(outs[i], dict) for i in (0, 2))
