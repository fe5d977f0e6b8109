"""Continuous batching (vla_foundry/continuous.py, models/kv_slots.py): every request's tokens through the batcher
equal its solo run (``complete`` / ``caption``), greedy and seeded, with requests joining mid-decode, leaving
early, with stop strings and different lengths; slots are freed; the cache stays within its bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_foundry.continuous import ContinuousBatcher
from vla_foundry.pipelines import load_pipeline
from vla_foundry.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def text(transformer_fixture):
    return load_pipeline(transformer_fixture)


@pytest.fixture(scope="module")
def tiny_text(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints["transformer"])  # with a tokenizer: stop strings and streamed text


@pytest.fixture(scope="module")
def vlm(fixtures_dir):
    return load_pipeline(fixtures_dir / "vlm_basic")


def run_all(batcher: ContinuousBatcher, arrivals: dict[int, list], max_steps: int = 500) -> dict:
    """Submit ``arrivals[step]`` (name, generation) before that step; step until all are done; name → outcome."""
    outcomes: dict = {}
    step = 0
    while step < max_steps and (batcher.active or any(k >= step for k in arrivals)):
        for name, generation in arrivals.get(step, []):
            batcher.submit(generation, lambda out, name=name: outcomes.__setitem__(name, out))
        batcher.step()
        outcomes["most decoding together"] = max(outcomes.get("most decoding together", 0),
                                                 batcher.running_sequences)
        step += 1
    assert not batcher.active
    return outcomes


def prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(2, 9))).tolist() for _ in range(n)]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_requests_joining_and_leaving_get_their_solo_tokens(text, sampling):
    batcher = text.continuous_batcher(max_sequences=6)
    rows = prompts(text.model.vocab_size, 8)
    requests = {  # name: (prompt rows, max_new_tokens): different lengths, one request of two rows
        "a": ([rows[0]], 12), "b": ([rows[1]], 3), "c": ([rows[2], rows[3]], 9), "d": ([rows[4]], 12),
        "e": ([rows[5]], 1), "f": ([rows[6]], 7), "g": ([rows[7]], 5)}
    arrivals = {0: ["a", "b"], 2: ["c"], 4: ["d", "e"], 5: ["f", "g"]}  # f, g wait for slots: b and e leave early

    def settings(n):
        return SamplingParams(n, sampling.temperature, sampling.top_k, sampling.top_p)

    generations = {step: [(name, text.start_completion(prompt_token_ids=requests[name][0],
                                                       sampling=settings(requests[name][1]), seed=100 + i))
                          for i, name in enumerate(names)]
                   for step, names in arrivals.items()}
    seeds = {name: 100 + i for names in arrivals.values() for i, name in enumerate(names)}
    outcomes = run_all(batcher, generations)
    assert outcomes["most decoding together"] >= 4  # requests really shared steps
    for name, (rows_, n) in requests.items():
        solo = text.complete(prompt_token_ids=rows_, sampling=settings(n), seed=seeds[name])
        got = outcomes[name]
        assert [c.token_ids for c in got.completions] == [c.token_ids for c in solo.completions], name
        assert [c.finish_reason for c in got.completions] == [c.finish_reason for c in solo.completions]
        assert (got.prompt_tokens, got.completion_tokens, got.seed) == (solo.prompt_tokens, solo.completion_tokens,
                                                                        solo.seed)
    assert sorted(batcher._free) == list(range(6))  # every slot back


def test_stop_strings_streams_and_eos_end_a_request_as_they_do_alone(tiny_text):
    batcher = tiny_text.continuous_batcher(max_sequences=4)
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0)
    solo = tiny_text.complete(["the quick brown", "a robot"], sampling=sampling, seed=3)
    stop = [solo.completions[0].text[2:4]] if len(solo.completions[0].text) > 4 else ["e"]
    streamed: dict = {"alone": [], "batched": []}

    def sink(key):
        return lambda row, text_delta, ids, reason: streamed[key].append((row, text_delta, ids, reason))

    alone = tiny_text.complete(["the quick brown", "a robot"], sampling=sampling, seed=3, stop=stop,
                               on_text=sink("alone"))
    other = tiny_text.start_completion(["robots"], sampling=sampling, seed=4)
    mine = tiny_text.start_completion(["the quick brown", "a robot"], sampling=sampling, seed=3, stop=stop,
                                      on_text=sink("batched"))
    outcomes = run_all(batcher, {0: [("other", other)], 1: [("mine", mine)]})
    assert [(c.text, c.token_ids, c.finish_reason) for c in outcomes["mine"].completions] == \
        [(c.text, c.token_ids, c.finish_reason) for c in alone.completions]
    assert streamed["batched"] == streamed["alone"] and streamed["alone"]


def test_caption_requests_with_their_images_get_their_solo_tokens(vlm):
    batcher = vlm.continuous_batcher(max_sequences=4)
    rng = np.random.default_rng(0)
    size = vlm.model.image_size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    requests = {"a": ([[images[0]]], [[5, 6]]), "b": ([[images[1]]], [[7, 8, 9, 10]]),
                "c": ([[images[2]], [images[0]]], [[3], [4, 5]])}
    for sampling in (GREEDY, SAMPLED):
        generations = {0: [("a", vlm.start_caption(*requests["a"][:1], prompt_token_ids=requests["a"][1],
                                                   sampling=sampling, seed=1))],
                       3: [(name, vlm.start_caption(requests[name][0], prompt_token_ids=requests[name][1],
                                                    sampling=sampling, seed=2)) for name in ("b", "c")]}
        outcomes = run_all(batcher, generations)
        for name, seed in (("a", 1), ("b", 2), ("c", 2)):
            solo = vlm.caption(requests[name][0], prompt_token_ids=requests[name][1], sampling=sampling, seed=seed)
            assert [c.token_ids for c in outcomes[name].completions] == [c.token_ids for c in solo.completions]


def test_a_cancelled_or_failing_request_frees_its_slots_and_leaves_the_others_alone(text):
    batcher = text.continuous_batcher(max_sequences=3)
    rows = prompts(text.model.vocab_size, 3, seed=1)
    gone = {"flag": False}
    outcomes: dict = {}
    keep = text.start_completion(prompt_token_ids=[rows[0]], sampling=GREEDY, seed=0)
    leaving = text.start_completion(prompt_token_ids=[rows[1], rows[2]], sampling=GREEDY, seed=0)
    batcher.submit(keep, lambda out: outcomes.__setitem__("keep", out))
    batcher.submit(leaving, lambda out: outcomes.__setitem__("leaving", out), cancelled=lambda: gone["flag"])
    batcher.step()
    assert batcher.running_sequences == 3 and not batcher._free
    gone["flag"] = True
    batcher.step()  # the client left: its two slots are free at the next step
    assert batcher.running_sequences == 1 and len(batcher._free) == 2 and "leaving" not in outcomes

    def broken(last_ids):
        raise RuntimeError("the stream's client went away")

    failing = text.start_completion(prompt_token_ids=[rows[1]], sampling=GREEDY, seed=0)
    failing.stopping = broken
    batcher.submit(failing, lambda out: outcomes.__setitem__("failing", out))
    while batcher.active:
        batcher.step()
    assert isinstance(outcomes["failing"], RuntimeError)
    solo = text.complete(prompt_token_ids=[rows[0]], sampling=GREEDY, seed=0)
    assert outcomes["keep"].completions[0].token_ids == solo.completions[0].token_ids
    assert sorted(batcher._free) == [0, 1, 2]


def test_a_request_of_more_rows_than_slots_runs_alone_the_solo_way(text):
    batcher = text.continuous_batcher(max_sequences=2)
    outcomes = []
    rows = prompts(text.model.vocab_size, 3, seed=2)
    batcher.submit(text.start_completion(prompt_token_ids=rows, sampling=SAMPLED, seed=5), outcomes.append)
    assert not batcher.active  # answered at once, not queued for slots it can never have
    solo = text.complete(prompt_token_ids=rows, sampling=SAMPLED, seed=5)
    assert [c.token_ids for c in outcomes[0].completions] == [c.token_ids for c in solo.completions]


def test_the_cache_never_exceeds_its_configured_memory(text):
    p = text.model.params
    per_slot = 2 * p.n_layers * text.model.max_seq_len * p.hidden_dim * 4  # float32
    batcher = text.continuous_batcher(max_sequences=16, max_cache_bytes=3 * per_slot + 1)
    assert batcher.num_slots == 3 and batcher.cache.nbytes <= 3 * per_slot + 1
    with pytest.raises(ValueError, match="does not fit"):
        text.continuous_batcher(max_sequences=4, max_cache_bytes=per_slot - 1)


def test_hf_models_cannot_join_a_running_batch(tiny_checkpoints):
    assert load_pipeline(tiny_checkpoints["transformer_hf"]).continuous_batcher(4) is None


def test_a_long_prompt_does_not_stall_the_running_sequences(text):
    """The prefill budget: a step admits prompts until their tokens pass it; a longer one gets a step of its own."""
    batcher = text.continuous_batcher(max_sequences=4, prefill_tokens=8)
    short = text.start_completion(prompt_token_ids=[[1, 2, 3]], sampling=GREEDY)
    longs = [text.start_completion(prompt_token_ids=[list(range(1, 11))], sampling=GREEDY) for _ in range(2)]
    outcomes: list = []
    for g in (short, *longs):
        batcher.submit(g, outcomes.append)
    batcher.step()
    assert batcher.running_sequences == 1  # 3 tokens fit; the next 10 would pass the budget of 8
    batcher.step()
    assert batcher.running_sequences == 2  # the first long one alone in its step
    batcher.step()
    assert batcher.running_sequences == 3
    with torch.inference_mode():
        while batcher.active:
            batcher.step()
    assert len(outcomes) == 3


def test_what_a_previous_sequence_left_in_a_slot_never_reaches_the_next(text):
    """A slot's positions past a new prompt are zeroed: even NaN left there (masked, but 0 × NaN is NaN) cannot
    reach the sequence that takes the slot next."""
    batcher = text.continuous_batcher(max_sequences=2)
    batcher.cache.keys.fill_(float("nan"))
    batcher.cache.values.fill_(float("nan"))
    rows = prompts(text.model.vocab_size, 2, seed=3)
    generations = {0: [(str(i), text.start_completion(prompt_token_ids=[row], sampling=SAMPLED, seed=i))
                       for i, row in enumerate(rows)]}
    outcomes = run_all(batcher, generations)
    for i, row in enumerate(rows):
        solo = text.complete(prompt_token_ids=[row], sampling=SAMPLED, seed=i)
        assert outcomes[str(i)].completions[0].token_ids == solo.completions[0].token_ids


def test_a_generation_too_late_to_start_ends_while_waiting_and_the_running_ones_go_on(text):
    batcher = text.continuous_batcher(max_sequences=1)
    outcomes: dict = {}
    late = {"now": False}
    batcher.submit(text.start_completion(prompt_token_ids=[[1, 2, 3]], sampling=GREEDY, seed=0),
                   lambda out: outcomes.__setitem__("running", out))
    batcher.submit(text.start_completion(prompt_token_ids=[[4, 5]], sampling=GREEDY, seed=0),
                   lambda out: outcomes.__setitem__("waiting", out),
                   too_late=lambda: TimeoutError("its deadline passed") if late["now"] else None)
    batcher.step()
    assert batcher.running_sequences == 1 and batcher.waiting_sequences == 1
    late["now"] = True
    batcher.step()
    assert isinstance(outcomes["waiting"], TimeoutError) and batcher.waiting_sequences == 0
    while batcher.active:
        batcher.step()
    solo = text.complete(prompt_token_ids=[[1, 2, 3]], sampling=GREEDY, seed=0)
    assert outcomes["running"].completions[0].token_ids == solo.completions[0].token_ids


def test_the_expected_wait_is_none_with_a_free_slot_else_until_a_running_sequence_could_end(text):
    batcher = text.continuous_batcher(max_sequences=1)
    batcher.submit(text.start_completion(prompt_token_ids=[[1, 2, 3]], sampling=GREEDY, seed=0), lambda out: None)
    for _ in range(3):
        batcher.step()
    assert batcher.step_seconds > 0 and batcher.running_sequences == 1
    # the one slot is taken by a sequence with 12 - 4 = 8 tokens still to make (at most)
    assert batcher.expected_wait_s() == pytest.approx(8 * batcher.step_seconds)
    batcher.fail_all(RuntimeError("done"))
    assert batcher.expected_wait_s() == 0.0  # a free slot: it joins at the next step
