"""Policy sampling from captured graphs (``policy_graphs.py``): every answer equals eager sampling.

On CPU the graphs are TorchScript traces; tests/test_gpu.py checks the CUDA graphs per bucket.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.factories import tiny_model, tiny_policy_params
from tests.vla_foundry.test_diffusion_policy import TINY_VIT, in_memory_pipeline, observation
from tests.vla_foundry.test_policy_batching import fixture_requests, mixed_requests
from vla_foundry.models import policy_graphs, shared_traces
from vla_foundry.params.clip import ViTBackboneParams
from vla_foundry.params.diffusion import NoiseSchedulerParams
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.action import PolicyRequest

ATOL = 1e-5


def assert_same_chunks(outs, expected):
    for out, want in zip(outs, expected, strict=True):
        np.testing.assert_allclose(out.action_chunk, want.action_chunk, atol=ATOL)


@pytest.fixture(scope="module")
def clip_pipelines(tiny_checkpoints):
    """The tiny CLIP-backbone policy twice: sampling from graphs, and eagerly."""
    path = tiny_checkpoints["diffusion_policy"]
    return load_pipeline(path), load_pipeline(path, traced_sampling=False)


def test_the_fixture_samples_through_graphs_give_the_fixture_actions(policy_fixture):
    pipeline = load_pipeline(policy_fixture)
    assert pipeline.io()["sampling_graphs"] == "traced"
    requests, expected = fixture_requests(policy_fixture)
    for _ in range(2):  # captured on the first call, replayed on the second
        outs = pipeline.predict_each(requests, num_inference_steps=10)
        for out, want in zip(outs, expected):
            for field, values in want.items():
                np.testing.assert_allclose(out.actions[field], values, atol=ATOL)
    assert len(pipeline.graphs) == 1


@pytest.mark.parametrize("steps", [1, 5])
def test_graph_sampling_equals_eager_for_mixed_batches(clip_pipelines, steps):
    traced, eager = clip_pipelines
    assert (traced.io()["sampling_graphs"], eager.io()["sampling_graphs"]) == ("traced", "eager")
    requests = mixed_requests(traced.robot_io)  # prompts of several lengths, explicit noise, past action rows
    for batch in (requests[:1], requests[:3], requests, requests[:3]):
        assert_same_chunks(traced.predict_each(batch, num_inference_steps=steps),
                           eager.predict_each(batch, num_inference_steps=steps))
    single = requests[0]
    np.testing.assert_allclose(traced.predict([single.sample], num_inference_steps=steps, seed=3)["action_chunk"],
                               eager.predict([single.sample], num_inference_steps=steps, seed=3)["action_chunk"],
                               atol=ATOL)


def test_a_padded_batch_never_replays_the_graph_of_an_unpadded_one(clip_pipelines):
    """Two prompts of one length and two of different lengths make inputs of the same shape, one padded and one
    not: a graph captured without padding (where a library may skip the mask) must not answer a padded batch."""
    traced, eager = clip_pipelines
    io = traced.robot_io
    same = [PolicyRequest(observation(io, seed=i, instruction="pick up the red block now"), seed=i) for i in range(2)]
    mixed = [PolicyRequest(observation(io, seed=i, instruction=text), seed=i)
             for i, text in enumerate(["go", "pick up the red block now"])]
    assert traced.prepare([r.sample for r in same]).input_ids.shape == \
        traced.prepare([r.sample for r in mixed]).input_ids.shape
    for batch in (same, mixed, same):
        assert_same_chunks(traced.predict_each(batch, num_inference_steps=3),
                           eager.predict_each(batch, num_inference_steps=3))


def test_a_vit_policy_samples_through_graphs():
    model = tiny_model(tiny_policy_params(ViTBackboneParams(**TINY_VIT)))
    traced, eager = (in_memory_pipeline(model, "none", traced_sampling=on) for on in (True, False))
    requests = [PolicyRequest(observation(traced.robot_io, seed=i), seed=i) for i in range(3)]
    assert_same_chunks(traced.predict_each(requests), eager.predict_each(requests))
    assert len(traced.graphs) == 1 and len(eager.graphs) == 0


def test_a_ddpm_policy_samples_eagerly():
    params = tiny_policy_params(ViTBackboneParams(**TINY_VIT), use_flow_matching_scheduler=False,
                                noise_scheduler=NoiseSchedulerParams(num_timesteps=10))
    pipeline = in_memory_pipeline(tiny_model(params), "none")
    assert pipeline.io()["sampling_graphs"] == "eager"
    out = pipeline.predict_each([PolicyRequest(observation(pipeline.robot_io), seed=1)], num_inference_steps=10)
    assert out[0].action_chunk.shape == (4, 3) and len(pipeline.graphs) == 0


def test_a_failed_capture_samples_eagerly_and_is_not_retried(clip_pipelines, tiny_checkpoints, monkeypatch):
    traced = load_pipeline(tiny_checkpoints["diffusion_policy"])
    eager = clip_pipelines[1]
    attempts = []

    def broken_trace(sampler, key, example):
        attempts.append(len(example))
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(policy_graphs, "shared_trace", broken_trace)
    requests = [PolicyRequest(observation(traced.robot_io, seed=i), seed=i) for i in range(2)]
    for _ in range(2):
        assert_same_chunks(traced.predict_each(requests), eager.predict_each(requests))
    assert len(attempts) == 1 and len(traced.graphs) == 0


def test_a_graph_that_differs_from_eager_never_serves(tiny_checkpoints, clip_pipelines, monkeypatch):
    traced, eager = load_pipeline(tiny_checkpoints["diffusion_policy"]), clip_pipelines[1]
    real_trace = policy_graphs.shared_trace
    monkeypatch.setattr(policy_graphs, "shared_trace", lambda sampler, key, example: (
        lambda *tensors: real_trace(sampler, key, example)(*tensors) + 1e-3))
    requests = [PolicyRequest(observation(traced.robot_io), seed=5)]
    assert_same_chunks(traced.predict_each(requests), eager.predict_each(requests))
    assert len(traced.graphs) == 0


def test_captures_are_bounded_and_later_shapes_sample_eagerly(tiny_checkpoints, clip_pipelines, monkeypatch):
    monkeypatch.setattr(policy_graphs, "MAX_GRAPHS_PER_POLICY", 2)
    pipeline, eager = load_pipeline(tiny_checkpoints["diffusion_policy"]), clip_pipelines[1]
    for batch_size in (1, 2, 3, 1):
        requests = [PolicyRequest(observation(pipeline.robot_io, seed=i), seed=i) for i in range(batch_size)]
        assert_same_chunks(pipeline.predict_each(requests, num_inference_steps=2),
                           eager.predict_each(requests, num_inference_steps=2))
    assert len(pipeline.graphs) == 2


def test_policies_of_one_architecture_share_their_traces_and_are_freed(tiny_checkpoints, clip_pipelines):
    """TorchScript never frees a trace, so a policy loaded again (a reload, an unload and load) must not trace
    anew: its graphs reuse the process's traces of that architecture with its own weights, its answers equal its
    own eager sampling, and nothing of an unloaded policy stays alive with the traces."""
    import gc
    import weakref

    import torch

    eager = clip_pipelines[1]
    requests = [PolicyRequest(observation(eager.robot_io, seed=i), seed=i) for i in range(3)]
    first = load_pipeline(tiny_checkpoints["diffusion_policy"])
    first.predict_each(requests, num_inference_steps=3)
    traces = shared_traces.count()
    weights = [weakref.ref(t) for t in first.model.parameters()]
    del first
    gc.collect()
    assert not any(w() is not None for w in weights)  # the traces hold none of its weights
    second = load_pipeline(tiny_checkpoints["diffusion_policy"])  # another checkpoint of the same architecture
    with torch.no_grad():
        for t in second.model.parameters():
            t.add_(0.01)
    changed = load_pipeline(tiny_checkpoints["diffusion_policy"], traced_sampling=False)
    changed.model.load_state_dict(second.model.state_dict())
    assert_same_chunks(second.predict_each(requests, num_inference_steps=3),
                       changed.predict_each(requests, num_inference_steps=3))
    assert len(second.graphs) == 1 and shared_traces.count() == traces  # nothing traced anew


def test_cuda_buckets():
    assert [policy_graphs.cuda_bucket(b) for b in (1, 2, 3, 5, 9, 17, 32, 33)] == [1, 2, 4, 8, 16, 32, 32, None]


def test_warmup_captures_every_batch_size_so_requests_never_wait_for_a_capture(tiny_checkpoints, clip_pipelines,
                                                                               monkeypatch):
    """Four camera frames per sample (pixel rows = 4 × batch): warm-up grows the sample to each batch size; every
    prompt is padded to the longest allowed, so instructions of any length replay the warm-up's graphs."""
    pipeline, eager = load_pipeline(tiny_checkpoints["diffusion_policy"]), clip_pipelines[1]
    pipeline.warmup(max_batch_size=3)
    assert len(pipeline.graphs) == 3
    monkeypatch.setattr(policy_graphs, "shared_trace", lambda *args: pytest.fail("captured while serving"))
    for batch_size in (1, 2, 3):
        instructions = ["go", "pick up the red block now", "warm up"]
        requests = [PolicyRequest(observation(pipeline.robot_io, seed=i, instruction=instructions[i]), seed=i)
                    for i in range(batch_size)]
        assert_same_chunks(pipeline.predict_each(requests), eager.predict_each(requests))


def test_a_policy_without_language_pads_and_keys_by_its_samples():
    model = tiny_model(tiny_policy_params(ViTBackboneParams(**TINY_VIT)))
    traced, eager = (in_memory_pipeline(model, "none", traced_sampling=on) for on in (True, False))
    traced.warmup(max_batch_size=2)
    assert len(traced.graphs) == 2
    for batch_size in (1, 2, 3):
        requests = [PolicyRequest(observation(traced.robot_io, seed=i), seed=i) for i in range(batch_size)]
        assert_same_chunks(traced.predict_each(requests), eager.predict_each(requests))
    traced.graphs.wait()  # batch 3 is new: captured in the background
    assert len(traced.graphs) == 3


def test_a_serving_policy_never_waits_for_a_capture(tiny_checkpoints, clip_pipelines, monkeypatch):
    """After warm-up, a new shape at the warmed-up step count samples eagerly at once while its trace is made on
    the capture thread, then replays it; another step count samples eagerly and is never traced (a client naming
    step counts would stall every robot for each: 60 steps took 15 s to trace on the 2-core CPU)."""
    import threading

    pipeline, eager = load_pipeline(tiny_checkpoints["diffusion_policy"]), clip_pipelines[1]
    pipeline.warmup(max_batch_size=1)
    assert len(pipeline.graphs) == 1
    release, traced_on, real_trace = threading.Event(), [], policy_graphs.shared_trace

    def slow_trace(sampler, key, example):
        traced_on.append(threading.current_thread().name)
        assert release.wait(30)
        return real_trace(sampler, key, example)

    monkeypatch.setattr(policy_graphs, "shared_trace", slow_trace)
    requests = [PolicyRequest(observation(pipeline.robot_io, seed=i), seed=i) for i in range(2)]
    assert_same_chunks(pipeline.predict_each(requests), eager.predict_each(requests))  # eager, the trace held
    assert len(pipeline.graphs) == 1
    release.set()
    pipeline.graphs.wait()
    assert len(pipeline.graphs) == 2 and traced_on == ["policy-graph-capture"]
    monkeypatch.setattr(policy_graphs, "shared_trace", lambda *args: pytest.fail("captured while serving"))
    assert_same_chunks(pipeline.predict_each(requests), eager.predict_each(requests))  # the new graph
    other = pipeline.num_inference_steps - 1
    assert_same_chunks(pipeline.predict_each(requests, num_inference_steps=other),
                       eager.predict_each(requests, num_inference_steps=other))
    pipeline.graphs.wait()
    assert len(pipeline.graphs) == 2


def test_serving_without_warm_up_never_waits_and_a_closed_policy_is_freed(tiny_checkpoints, clip_pipelines,
                                                                         monkeypatch):
    """A deployment that skips warm-up still serves (``serving``): no call is traced in it, not even the first
    shape. Closed (unloaded), its background captures hold nothing of it: its weights are freed."""
    import gc
    import threading
    import weakref

    pipeline, eager = load_pipeline(tiny_checkpoints["diffusion_policy"]), clip_pipelines[1]
    pipeline.serving()
    model_thread = threading.current_thread().name
    traced_on, real_trace = [], policy_graphs.shared_trace

    def recording_trace(sampler, key, example):
        traced_on.append(threading.current_thread().name)
        return real_trace(sampler, key, example)

    monkeypatch.setattr(policy_graphs, "shared_trace", recording_trace)
    requests = [PolicyRequest(observation(pipeline.robot_io, seed=i), seed=i) for i in range(2)]
    for steps in (None, pipeline.num_inference_steps - 1):  # the default step count, then another
        assert_same_chunks(pipeline.predict_each(requests, num_inference_steps=steps),
                           eager.predict_each(requests, num_inference_steps=steps))
    pipeline.graphs.wait()
    assert traced_on == ["policy-graph-capture"] and model_thread not in traced_on and len(pipeline.graphs) == 1
    weights = [weakref.ref(t) for t in pipeline.model.parameters()]
    pipeline.close()
    del pipeline
    gc.collect()
    assert not any(w() is not None for w in weights)  # nothing of it stays with the capture thread
