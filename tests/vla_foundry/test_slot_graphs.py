"""Continuous batching's decode steps from captured graphs (vla_foundry/models/slot_graphs.py): on CPU one trace serves
every batch size and key length with exactly the eager step's logits and cache writes; the bucketed steps that CUDA
captures (run eagerly here, on the same padded static buffers) keep every request's solo tokens with padding rows in
the free slots; a trace that fails or differs leaves the steps eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.vla_foundry.test_continuous_batching import GREEDY, SAMPLED, prompts, run_all
from vla_foundry.models.kv_slots import PackedSlotStep
from vla_foundry.models import shared_traces, slot_graphs
from vla_foundry.models.shared_traces import SharedTrace
from vla_foundry.models.slot_graphs import SlotGraphs
from vla_foundry.pipelines import load_pipeline
from vla_foundry.sampling import SamplingParams


@pytest.fixture(scope="module")
def text(transformer_fixture):
    return load_pipeline(transformer_fixture)


@pytest.fixture(scope="module")
def vlm(fixtures_dir):
    return load_pipeline(fixtures_dir / "vlm_basic")


def record_steps(graphs: SlotGraphs) -> list[tuple[int, bool]]:
    """From now on, each step ``graphs`` is asked for: (its rows, whether a graph answered it) in the list returned."""
    decode, steps = graphs.decode, []

    def recorded(ids, span, positions):
        logits = decode(ids, span, positions)
        steps.append((len(positions), logits is not None))
        return logits

    graphs.decode = recorded
    return steps


def random_cache(decoder) -> None:
    generator = torch.Generator().manual_seed(1)
    for cache in (decoder.cache.keys, decoder.cache.values):
        cache.copy_(torch.randn(cache.shape, generator=generator))


@torch.inference_mode()
def test_one_trace_serves_every_shape_with_the_eager_steps_logits_and_writes(text):
    traced = text.model.slot_decoder(8, graphs=True)
    eager = text.model.slot_decoder(8, graphs=False)
    assert traced.mode == "traced" and eager.mode == "eager"
    random_cache(traced)
    random_cache(eager)
    trace = None
    for rows, start, positions in ((3, 0, [4, 0, 9]), (1, 0, [17]), (8, 0, list(range(30, 38))), (2, 5, [3, 60])):
        ids = torch.arange(rows) * 7 % text.model.vocab_size
        slots = list(range(start, start + rows))
        got = traced.decode(ids, slots, positions)
        want = eager.decode(ids, slots, positions)
        assert torch.equal(got, want), (rows, positions)
        assert torch.equal(traced.cache.keys, eager.cache.keys) and torch.equal(traced.cache.values, eager.cache.values)
        trace = trace or traced.graphs._trace
        assert traced.graphs._trace is trace  # one trace, whatever the shape
    assert isinstance(trace, SharedTrace)


def test_a_text_model_loaded_again_reuses_its_architectures_trace_and_is_freed(transformer_fixture, text):
    """TorchScript never frees a trace: a model loaded again (a reload, an unload and load) takes up the trace of
    its architecture with its own weights, and its predecessor's weights are not kept alive by it."""
    import gc
    import weakref

    with torch.inference_mode():
        text.model.slot_decoder(4, graphs=True).graphs.capture_all()
        traces = shared_traces.count()
        again = load_pipeline(transformer_fixture)
        with torch.no_grad():
            torch._foreach_mul_(list(again.model.parameters()), 1.5)  # another checkpoint of the same architecture
        traced, eager = again.model.slot_decoder(4, graphs=True), again.model.slot_decoder(4, graphs=False)
        random_cache(traced)
        random_cache(eager)
        ids = torch.tensor([3, 5])
        assert torch.equal(traced.decode(ids, [0, 1], [4, 9]), eager.decode(ids, [0, 1], [4, 9]))
        assert traced.mode == "traced" and shared_traces.count() == traces
    weights = [weakref.ref(t) for t in again.model.parameters()]
    del again, traced, eager
    gc.collect()
    assert not any(w() is not None for w in weights)


def test_a_trace_that_fails_or_differs_leaves_the_steps_eager(text, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no tracing here")

    monkeypatch.setattr(slot_graphs, "shared_trace", broken)
    with torch.inference_mode():
        decoder = text.model.slot_decoder(4, graphs=True)
        assert decoder.graphs.decode(torch.zeros(2, dtype=torch.long), slice(0, 2), [3, 1]) is None
    assert decoder.mode == "eager"

    # a "trace" whose logits are off by a little
    monkeypatch.setattr(slot_graphs, "shared_trace", lambda step, key, example: lambda *inputs: step(*inputs) + 1e-3)
    with torch.inference_mode():
        decoder = text.model.slot_decoder(4, graphs=True)
        assert decoder.graphs.decode(torch.zeros(2, dtype=torch.long), slice(0, 2), [3, 1]) is None
    assert decoder.mode == "eager"


@pytest.mark.parametrize("mode", ["eager", "traced", "cuda_graph"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("model", ["transformer", "vlm"])
def test_requests_joining_and_leaving_keep_their_solo_tokens_in_every_decode_mode(model, mode, sampling, text, vlm):
    """``cuda_graph`` here runs each bucket's padded step eagerly on its static buffers: padding rows write into
    free slots that later requests take, and each bucket is checked against the eager step when made."""
    pipeline = text if model == "transformer" else vlm
    batcher = pipeline.continuous_batcher(max_sequences=6, graphs=mode != "eager")
    batch_sizes, results = [], []
    if mode != "eager":
        graphs = batcher.decoder.graphs = SlotGraphs(batcher.decoder.step, batcher.decoder.cache, mode=mode)
        decode = graphs.decode

        def recorded(ids, span, positions):
            batch_sizes.append(len(positions))
            results.append(decode(ids, span, positions))
            return results[-1]

        graphs.decode = recorded
    rows = prompts(pipeline.model.vocab_size, 8, seed=7)
    prompt_rows = {"a": [rows[0]], "b": [rows[1]], "c": [rows[2], rows[3]], "d": [rows[4]], "e": [rows[5]],
                   "f": [rows[6]], "g": [rows[7]]}
    lengths = {"a": 12, "b": 3, "c": 9, "d": 12, "e": 1, "f": 7, "g": 5}
    arrivals = {0: ["a", "b"], 2: ["c"], 4: ["d", "e"], 5: ["f", "g"]}  # f, g wait for slots: b and e leave early
    image = np.random.default_rng(0).integers(0, 256, (vlm.model.image_size,) * 2 + (3,), dtype=np.uint8)

    def run(name, solo: bool):
        settings = SamplingParams(lengths[name], sampling.temperature, sampling.top_k, sampling.top_p)
        seed = 50 + list(lengths).index(name)
        if model == "transformer":
            call = text.complete if solo else text.start_completion
            return call(prompt_token_ids=prompt_rows[name], sampling=settings, seed=seed)
        call = vlm.caption if solo else vlm.start_caption
        return call([[image]] * len(prompt_rows[name]), prompt_token_ids=prompt_rows[name], sampling=settings,
                    seed=seed)

    outcomes = run_all(batcher, {step: [(name, run(name, solo=False)) for name in names]
                                 for step, names in arrivals.items()})
    assert outcomes["most decoding together"] >= 4
    for name in lengths:
        solo = run(name, solo=True)
        assert [c.token_ids for c in outcomes[name].completions] == [c.token_ids for c in solo.completions], name
    if mode != "eager":
        assert results and all(logits is not None for logits in results)  # every batched step ran from the graphs
        assert batcher.decode_mode == mode
    if mode == "cuda_graph":
        assert set(batch_sizes) - set(graphs.batch_buckets())  # some steps were padded up to their bucket
        assert all(bucket is not None for bucket in graphs._buckets.values())


def test_bucketed_steps_pad_into_the_free_slots_and_round_the_keys_up(text):
    graphs = SlotGraphs(PackedSlotStep(text.model), text.model.slot_decoder(6).cache, mode="cuda_graph")
    assert graphs.batch_buckets() == [1, 2, 4, 6]
    with torch.inference_mode():
        logits = graphs.decode(torch.tensor([1, 2, 3]), slice(0, 3), [5, 40, 2])
        assert logits.shape == (3, text.model.vocab_size)
        assert graphs.decode(torch.tensor([1, 2]), slice(2, 4), [5, 7]) is None  # padding needs the slots after
    assert text.model.max_seq_len == 64
    bucket = graphs._buckets[(4, 64)]  # 3 rows → 4, 41 keys → 64
    assert bucket.positions.tolist() == [5, 40, 2, 0] and bucket.keys.shape[1:3] == (4, 64)


def test_buckets_made_at_warm_up_serve_outside_inference_mode_and_failed_ones_report_eager(text, monkeypatch):
    decoder = text.model.slot_decoder(4)
    graphs = decoder.graphs = SlotGraphs(decoder.step, decoder.cache, mode="cuda_graph")
    with torch.inference_mode():
        graphs.capture_all()  # as ContinuousBatcher.warmup does
    assert len(graphs._buckets) == 3 and graphs.mode == "cuda_graph"
    with torch.no_grad():  # the static buffers are plain tensors, not inference ones
        assert graphs.decode(torch.tensor([1, 2, 3]), slice(0, 3), [4, 5, 6]).shape == (3, text.model.vocab_size)

    def fails(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr("vla_foundry.models.slot_graphs._Bucket", fails)
    failing = SlotGraphs(decoder.step, decoder.cache, mode="cuda_graph")
    assert failing.decode(torch.tensor([1]), slice(0, 1), [2]) is None
    assert failing.mode == "eager"


@pytest.mark.parametrize("mode", ["traced", "cuda_graph"])
def test_a_lone_request_replays_the_one_row_graph(text, mode):
    """A lone sequence decodes from its slot through the one-row graph (on a GPU an eager step is bound by kernel
    launches; on the CPU a step of one from the trace took 0.69 ms against 0.94 ms for the solo eager step, one
    torch thread, bench/decode_steps.py); both requests get their solo tokens."""
    batcher = text.continuous_batcher(max_sequences=4, graphs=True)
    graphs = batcher.decoder.graphs = SlotGraphs(batcher.decoder.step, batcher.decoder.cache, mode=mode)
    rows_per_step = record_steps(graphs)
    settings = SamplingParams(10, SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p)
    lone, joiner = prompts(text.model.vocab_size, 2, seed=3)
    run = {name: (prompt, seed) for name, prompt, seed in (("lone", [lone], 11), ("joiner", [joiner], 12))}
    outcomes = run_all(batcher, {0: [("lone", text.start_completion(prompt_token_ids=run["lone"][0],
                                                                     sampling=settings, seed=11))],
                                 4: [("joiner", text.start_completion(prompt_token_ids=run["joiner"][0],
                                                                       sampling=settings, seed=12))]})
    for name, (prompt, seed) in run.items():
        solo = text.complete(prompt_token_ids=prompt, sampling=settings, seed=seed)
        assert [c.token_ids for c in outcomes[name].completions] == [c.token_ids for c in solo.completions], name
    # The lone request's first 4 steps (its prefill gave its first token) from the one-row graph, then both
    # together: every step from a graph
    assert rows_per_step[:5] == [(1, True)] * 4 + [(2, True)] and all(ok for _, ok in rows_per_step)
    assert batcher.decode_mode == mode
