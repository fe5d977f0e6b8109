"""Continuous batching (vla_foundry/continuous.py, models/kv_slots.py, models/hf_slots.py): every request's tokens
through the batcher equal its solo run (``complete`` / ``caption``), greedy and seeded, with requests joining
mid-decode, leaving early, with stop strings and different lengths, for our ``transformer`` and ``vlm`` and for HF
families (Llama and GPT-2 as ``transformer_hf``, Idefics3 and LLaVA as ``vlm_hf``); slots are freed; the cache stays
within its bound; an HF family that cannot decode in slots runs one request at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.factories import sharpen_hf
from vla_foundry.continuous import ContinuousBatcher
from vla_foundry.demo.hf_models import CAUSAL_LM_FAMILIES, build_tiny_causal_lm, build_tiny_idefics3, build_tiny_llava
from vla_foundry.models import hf_slots
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


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tiny_tokenizer):
    """Sharpened tiny HF models (see ``sharpen_hf``): Llama and GPT-2 causal LMs, Idefics3 and LLaVA captioners."""
    root = tmp_path_factory.mktemp("hf_slots")
    dirs = {f: sharpen_hf(build_tiny_causal_lm(root / f, tiny_tokenizer, family=f), "AutoModelForCausalLM")
            for f in CAUSAL_LM_FAMILIES}
    for name, build in (("idefics3", build_tiny_idefics3), ("llava", build_tiny_llava)):
        dirs[name] = sharpen_hf(build(root / name, tiny_tokenizer), "AutoModelForImageTextToText")
    return dirs


@pytest.fixture(scope="module")
def hf_pipelines(hf_dirs):
    return {name: load_pipeline(d) for name, d in hf_dirs.items()}


@pytest.fixture(params=["transformer", *CAUSAL_LM_FAMILIES])
def any_text(request, text, hf_pipelines):
    """The shared transformer fixture, and each HF causal LM family as ``transformer_hf``."""
    return text if request.param == "transformer" else hf_pipelines[request.param]


def slot_storage(batcher: ContinuousBatcher) -> tuple[torch.Tensor, torch.Tensor]:
    """The batcher's preallocated keys and values (ours keep them in a SlotKVCache, HF's in the decoder)."""
    decoder = batcher.decoder
    holder = getattr(decoder, "cache", decoder)
    return holder.keys, holder.values


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
def test_requests_joining_and_leaving_get_their_solo_tokens(any_text, sampling):
    text = any_text
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


def test_requests_with_different_sampling_settings_share_steps_and_keep_their_solo_tokens(any_text):
    """A step's rows are sampled in groups of the same settings (one top-k/top-p/softmax over a group's rows, then
    one draw in which each request's rows come from its own generator): requests of different temperatures, top-k
    and top-p, greedy among them, all decoding together, each get their solo tokens; two requests of the same
    settings share a group."""
    text = any_text
    batcher = text.continuous_batcher(max_sequences=8)
    rows = prompts(text.model.vocab_size, 7, seed=5)
    settings = {"greedy": SamplingParams(10, 0.0), "hot": SamplingParams(10, 1.5, 20, 0.9),
                "hot again": SamplingParams(10, 1.5, 20, 0.9), "cool": SamplingParams(10, 0.7, 0, 0.8),
                "full vocabulary": SamplingParams(10, 1.0, 0, 1.0), "top-k only": SamplingParams(10, 1.0, 5, 1.0),
                "two rows": SamplingParams(10, 1.5, 20, 0.9)}
    prompt_rows = {name: [rows[i]] for i, name in enumerate(settings)}
    prompt_rows["two rows"] = [rows[5], rows[6]]
    generations = {0: [(name, text.start_completion(prompt_token_ids=prompt_rows[name], sampling=s, seed=7 + i))
                       for i, (name, s) in enumerate(settings.items())]}
    outcomes = run_all(batcher, generations)
    assert outcomes["most decoding together"] == 8  # every row in the same steps
    for i, (name, s) in enumerate(settings.items()):
        solo = text.complete(prompt_token_ids=prompt_rows[name], sampling=s, seed=7 + i)
        assert [c.token_ids for c in outcomes[name].completions] == [c.token_ids for c in solo.completions], name


def test_a_request_whose_probabilities_turn_nan_fails_alone_in_a_shared_draw(text, monkeypatch):
    """Rows of the same settings are drawn together (``sampling.draw_groups``): a row with a NaN probability ends
    its own request with the error ``torch.multinomial`` would raise, and the request beside it keeps its solo
    tokens."""
    import vla_foundry.continuous as continuous

    batcher = text.continuous_batcher(max_sequences=2)
    rows = prompts(text.model.vocab_size, 2, seed=9)
    calls = {"n": 0}
    real = continuous.token_distribution

    def poisoned(logits, *args):  # from the third decode step on, the second request's row holds a NaN
        probs, token_ids = real(logits, *args)
        calls["n"] += 1
        if calls["n"] > 4 and probs.shape[0] == 2:
            probs[1, 3] = float("nan")
        return probs, token_ids

    monkeypatch.setattr(continuous, "token_distribution", poisoned)
    generations = {0: [(name, text.start_completion(prompt_token_ids=[rows[i]], sampling=SAMPLED, seed=i))
                       for i, name in enumerate(("fit", "poisoned"))]}
    outcomes = run_all(batcher, generations)
    assert isinstance(outcomes["poisoned"], RuntimeError) and "probability tensor" in str(outcomes["poisoned"])
    monkeypatch.setattr(continuous, "token_distribution", real)
    solo = text.complete(prompt_token_ids=[rows[0]], sampling=SAMPLED, seed=0)
    assert outcomes["fit"].completions[0].token_ids == solo.completions[0].token_ids
    assert sorted(batcher._free) == [0, 1]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_sequences_are_packed_into_the_lowest_slots_and_keep_their_tokens(any_text, sampling):
    """x, z and w's two rows take slots 0, 1, 2, 3; x ends, so w's second row moves into slot 0 (its cache copied)
    and the steps read slots 0…2 (a view), with w's rows at 2 and 0, reversed; then z ends and w's first row moves
    to 1. Every request's tokens stay its solo tokens."""
    text = any_text
    batcher = text.continuous_batcher(max_sequences=4)
    rows = prompts(text.model.vocab_size, 4, seed=3)

    def settings(n):
        return SamplingParams(n, sampling.temperature, sampling.top_k, sampling.top_p)

    requests = {"x": ([rows[0]], 3, 1), "z": ([rows[1]], 7, 2), "w": ([rows[2], rows[3]], 12, 3)}
    steps, moves = [], []
    decode, move = batcher.decoder.decode, batcher.decoder.move
    batcher.decoder.decode = lambda ids, slots, positions: steps.append(slots) or decode(ids, slots, positions)
    keys, values = slot_storage(batcher)

    def poisoned_move(src, dst, length):  # what the target slot held before must not matter: NaN everywhere
        keys[:, dst], values[:, dst] = float("nan"), float("nan")
        moves.append((src, dst))
        move(src, dst, length)

    batcher.decoder.move = poisoned_move
    outcomes = run_all(batcher, {0: [(name, text.start_completion(prompt_token_ids=prompt, sampling=settings(n),
                                                                  seed=seed))
                                     for name, (prompt, n, seed) in requests.items()]})
    for name, (prompt, n, seed) in requests.items():
        solo = text.complete(prompt_token_ids=prompt, sampling=settings(n), seed=seed)
        assert [c.token_ids for c in outcomes[name].completions] == [c.token_ids for c in solo.completions], name
    assert moves[:2] == [(3, 0), (2, 1)] and steps[0] == [0, 1, 2, 3] and [0, 1, 2] in steps and steps[-1] == [0, 1]
    assert sorted(batcher._free) == [0, 1, 2, 3]


def test_a_slot_moves_its_cached_positions_and_zeroes_the_rest():
    from vla_foundry.models.kv_slots import SlotKVCache

    cache = SlotKVCache(n_layers=2, num_slots=3, max_len=6, n_heads=2, head_dim=3, dtype=torch.float32,
                        device=torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    cache.keys[:, 0], cache.values[:, 0] = float("nan"), float("nan")
    before_keys, before_values = cache.keys[:, 2].clone(), cache.values[:, 2].clone()
    cache.move(2, 0, 4)
    torch.testing.assert_close(cache.keys[:, 0, :4], before_keys[:, :4])
    torch.testing.assert_close(cache.values[:, 0, :4], before_values[:, :4])
    assert not cache.keys[:, 0, 4:].any() and not cache.values[:, 0, 4:].any()


def test_packed_slots_are_read_as_a_view_and_slots_apart_as_a_gather():
    from vla_foundry.models.kv_slots import SlotKVCache

    cache = SlotKVCache(n_layers=1, num_slots=5, max_len=6, n_heads=2, head_dim=3, dtype=torch.float32,
                        device=torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    new = torch.randn(3, 1, 2, 3)
    packed_keys, _ = cache.batch([1, 2, 3], [4, 2, 5]).update(0, new, new)
    assert packed_keys.data_ptr() == cache.keys[0, 1].data_ptr()  # a view: no copy per step
    apart_keys, apart_values = cache.batch([0, 2, 4], [1, 1, 1]).update(0, new, new)
    assert apart_keys.data_ptr() != cache.keys[0, 0].data_ptr()
    torch.testing.assert_close(apart_keys, cache.keys[0, [0, 2, 4], :2])
    torch.testing.assert_close(apart_values[:, 1], new[:, 0])  # this step's keys and values at their positions


def test_a_lone_sequence_decodes_from_its_slot_or_the_solo_way_until_another_joins(any_text, monkeypatch):
    """Where the decoder replays a trace (or graphs), a lone sequence decodes from its slot from its first step (a
    step of one from the trace costs less than the solo eager step); where it runs eagerly, it decodes the solo way
    on its own cache and moves into its slot when another joins. Its tokens are its solo run's either way."""
    text = any_text
    batcher = text.continuous_batcher(max_sequences=3)
    decode, batched_steps = batcher.decoder.decode, []
    monkeypatch.setattr(batcher.decoder, "decode", lambda *a: batched_steps.append(len(a[1])) or decode(*a))
    rows = prompts(text.model.vocab_size, 2, seed=4)
    arrivals = {0: [("first", text.start_completion(prompt_token_ids=[rows[0]], sampling=SAMPLED, seed=1))],
                5: [("second", text.start_completion(prompt_token_ids=[rows[1]], sampling=SAMPLED, seed=2))]}
    outcomes = run_all(batcher, arrivals)
    lengths = []
    for name, row, seed in (("first", rows[0], 1), ("second", rows[1], 2)):
        solo = text.complete(prompt_token_ids=[row], sampling=SAMPLED, seed=seed)
        assert outcomes[name].completions[0].token_ids == solo.completions[0].token_ids
        lengths.append(len(solo.completions[0].token_ids))
    # A step admits (prefill: token 1), then decodes: the first's token k (k > 1) comes at step k - 2, the second's
    # at step k + 3.
    first, second = lengths
    assert first > 7, "the first must still run when the second joins"
    # steps 0-4: the first alone (from its slot, or on its own cache: no batched step); from step 5 both in their
    # slots until the first ends; then the other alone, in its slot
    shared = min(first - 2, second + 3) - 4
    alone_first = [1] * 5 if batcher.decoder.mode != "eager" else []
    assert batched_steps == alone_first + [2] * shared + [1] * (max(first - 2, second + 3) - 4 - shared)


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


@pytest.mark.parametrize("sampling", [SamplingParams(16, 0.0), SamplingParams(16, 1.0, 20, 0.9),
                                      SamplingParams(16, 1.0, 0, 1.0)], ids=["greedy", "top-k", "full vocabulary"])
def test_a_row_that_ends_before_the_others_frees_its_slot_and_each_keeps_its_solo_tokens(tiny_text, sampling):
    """A request of two prompts whose first row meets a stop string early: that row's slot goes to a waiting
    request at once, while the second row decodes on; both rows keep their solo tokens (the ended row's draws go
    on as alone, so the second row's later draws are its solo ones), and so does the request that took the slot."""
    prompts_ = ["the quick brown", "a robot"]
    free = tiny_text.complete(prompts_, sampling=sampling, seed=3)
    first, second = (c.text for c in free.completions)
    # a stop string early in the first row's text that the second row's never shows
    stop = next(first[i:i + 2] for i in range(1, len(first) - 1) if first[i:i + 2] not in second)
    alone = tiny_text.complete(prompts_, sampling=sampling, seed=3, stop=[stop])
    ended, long = alone.completions
    assert ended.finish_reason == "stop" and long.finish_reason == "length"
    assert len(ended.token_ids) + 2 < len(long.token_ids)  # the first row ends steps before the second

    batcher = tiny_text.continuous_batcher(max_sequences=2)
    outcomes: dict = {}
    mine = tiny_text.start_completion(prompts_, sampling=sampling, seed=3, stop=[stop])
    waiting = tiny_text.start_completion(["robots"], sampling=SamplingParams(4, 1.0, 0, 1.0), seed=4)
    batcher.submit(mine, lambda out: outcomes.__setitem__("mine", out))
    batcher.submit(waiting, lambda out: outcomes.__setitem__("waiting", out))
    joined_while_mine_ran = False
    while batcher.active:
        batcher.step()
        joined_while_mine_ran |= "mine" not in outcomes and batcher.waiting_sequences == 0
        assert batcher.running_sequences <= 2
    assert joined_while_mine_ran  # the ended row's slot was taken before the request of two rows finished
    assert [(c.text, c.token_ids, c.finish_reason) for c in outcomes["mine"].completions] == \
        [(c.text, c.token_ids, c.finish_reason) for c in alone.completions]
    solo = tiny_text.complete(["robots"], sampling=SamplingParams(4, 1.0, 0, 1.0), seed=4)
    assert outcomes["waiting"].completions[0].token_ids == solo.completions[0].token_ids
    assert sorted(batcher._free) == [0, 1]


@pytest.mark.parametrize("captioner", ["vlm", "idefics3", "llava"])
def test_caption_requests_with_their_images_get_their_solo_tokens(captioner, vlm, hf_pipelines):
    pipeline = vlm if captioner == "vlm" else hf_pipelines[captioner]
    batcher = pipeline.continuous_batcher(max_sequences=4)
    assert batcher is not None
    rng = np.random.default_rng(0)
    size = getattr(pipeline.model, "image_size", 32)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    if captioner == "vlm":  # the fixture has no tokenizer: token ids
        prompts = {"a": {"prompt_token_ids": [[5, 6]]}, "b": {"prompt_token_ids": [[7, 8, 9, 10]]},
                   "c": {"prompt_token_ids": [[3], [4, 5]]}}
    else:
        prompts = {"a": {"prompts": ["a robot"]}, "b": {"prompts": ["the quick brown fox jumps over"]},
                   "c": {"prompts": ["what", "a red block"]}}
    requests = {"a": [[images[0]]], "b": [[images[1]]], "c": [[images[2]], [images[0]]]}
    for sampling in (GREEDY, SAMPLED):
        generations = {0: [("a", pipeline.start_caption(requests["a"], **prompts["a"], sampling=sampling, seed=1))],
                       3: [(name, pipeline.start_caption(requests[name], **prompts[name], sampling=sampling, seed=2))
                           for name in ("b", "c")]}
        outcomes = run_all(batcher, generations)
        assert outcomes["most decoding together"] >= 3
        for name, seed in (("a", 1), ("b", 2), ("c", 2)):
            solo = pipeline.caption(requests[name], **prompts[name], sampling=sampling, seed=seed)
            assert [c.token_ids for c in outcomes[name].completions] == [c.token_ids for c in solo.completions]


def test_an_hf_captioner_never_samples_its_image_placeholder_in_a_batch_either(hf_dirs):
    """``vlm_hf``'s ``generate`` never samples the image placeholder; the batcher masks it out alike. Here the
    placeholder is made every step's most likely token, so greedy decoding would pick it if it could."""
    pipeline = load_pipeline(hf_dirs["idefics3"])
    placeholder = pipeline.model.image_token_id
    with torch.no_grad():
        head = pipeline.model.model.get_output_embeddings()
        head.weight[placeholder] = head.weight.abs().max(0).values * 50
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batcher = pipeline.continuous_batcher(max_sequences=2)
    outcomes = run_all(batcher, {0: [("a", pipeline.start_caption([[image]], ["a"], sampling=GREEDY, seed=0))]})
    solo = pipeline.caption([[image]], ["a"], sampling=GREEDY, seed=0)
    tokens = outcomes["a"].completions[0].token_ids
    assert tokens == solo.completions[0].token_ids and placeholder not in tokens and len(tokens) == 12


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
    outcomes, running = [], set()
    rows = prompts(text.model.vocab_size, 3, seed=2)
    generation = text.start_completion(prompt_token_ids=rows, sampling=SAMPLED, seed=5,
                                       on_text=lambda *delta: running.add(batcher.running_sequences))
    batcher.submit(generation, outcomes.append)
    assert not batcher.active  # answered at once, not queued for slots it can never have
    assert running == {3} and batcher.running_sequences == 0  # its rows counted as running while they decoded
    solo = text.complete(prompt_token_ids=rows, sampling=SAMPLED, seed=5)
    assert [c.token_ids for c in outcomes[0].completions] == [c.token_ids for c in solo.completions]


def test_the_cache_never_exceeds_its_configured_memory(any_text):
    text = any_text
    per_slot = text.model.slot_bytes()
    if text.model.params.type == "transformer":  # what it is made of: K and V of every layer, full context, fp32
        p = text.model.params
        assert per_slot == 2 * p.n_layers * text.model.max_seq_len * p.hidden_dim * 4
    batcher = text.continuous_batcher(max_sequences=16, max_cache_bytes=3 * per_slot + 1)
    keys, values = slot_storage(batcher)
    assert batcher.num_slots == 3 and keys.nbytes + values.nbytes == batcher.cache_bytes <= 3 * per_slot + 1
    with pytest.raises(ValueError, match="does not fit"):
        text.continuous_batcher(max_sequences=4, max_cache_bytes=per_slot - 1)


def test_a_request_of_more_rows_than_slots_caches_only_what_the_cap_leaves_beside_the_slots(text):
    """A request of more sequences than slots runs by itself with a cache of its own, which came on top of the
    capped one whatever its size (64 prompts on a batcher capped at one slot held 124 times the cap). It now runs
    only when its rows, at their longest, fit in what the cap leaves beside the slots; else it is refused, naming
    what to lower."""
    from vla_foundry.errors import InvalidInputError

    per_token = text.model.slot_bytes() // text.model.max_seq_len
    rows = prompts(text.model.vocab_size, 3, seed=2)  # (a solo run pads them to the longest)
    longest = max(len(r) for r in rows)
    room = 3 * (longest + SAMPLED.max_new_tokens)  # tokens: exactly what the three rows cache by their last token
    batcher = text.continuous_batcher(max_sequences=2, max_cache_bytes=2 * text.model.slot_bytes() + room * per_token)
    assert batcher.num_slots == 2 and batcher.alone_bytes == room * per_token
    outcomes = []
    batcher.submit(text.start_completion(prompt_token_ids=rows, sampling=SAMPLED, seed=5), outcomes.append)
    solo = text.complete(prompt_token_ids=rows, sampling=SAMPLED, seed=5)
    assert [c.token_ids for c in outcomes[0].completions] == [c.token_ids for c in solo.completions]

    one_more = SamplingParams(SAMPLED.max_new_tokens + 1, SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p)
    batcher.submit(text.start_completion(prompt_token_ids=rows, sampling=one_more, seed=5), outcomes.append)
    refused = outcomes[1]
    assert isinstance(refused, InvalidInputError) and refused.field == "max_new_tokens"
    assert f"at most {SAMPLED.max_new_tokens} new tokens" in str(refused) and not batcher.active
    many = [rows[0]] * (room // len(rows[0]) + 1)  # more prompts than fit, even with no new token
    batcher.submit(text.start_completion(prompt_token_ids=many, sampling=SAMPLED, seed=5), outcomes.append)
    assert isinstance(outcomes[2], InvalidInputError) and outcomes[2].field == "prompt"
    assert "up to 2 always fit" in str(outcomes[2])
    assert batcher.running_sequences == 0 and sorted(batcher._free) == [0, 1]


def test_an_hf_family_that_cannot_decode_in_slots_runs_one_request_at_a_time(tmp_path, tiny_tokenizer):
    """Mistral with a sliding window keeps a cache of sliding layers, which slots do not model."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4, max_position_embeddings=64)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    pipeline = load_pipeline(tmp_path)
    assert pipeline.model.slot_bytes() is None and pipeline.continuous_batcher(4) is None
    # It still generates (random weights may well pick the end of text early: up to 12 tokens, at least one).
    completion = pipeline.complete(["a robot"], sampling=GREEDY, seed=0).completions[0]
    assert 1 <= len(completion.token_ids) <= 12 and completion.finish_reason in ("length", "stop")


def test_an_hf_family_whose_step_in_slots_differs_from_its_step_alone_runs_one_request_at_a_time(hf_dirs,
                                                                                                   monkeypatch):
    """The check made once per model: two prompts decoded in one step must give the logits each gets alone."""
    decode = hf_slots.HFSlotDecoder.decode
    monkeypatch.setattr(hf_slots.HFSlotDecoder, "decode", lambda self, *a: decode(self, *a) * 1.01)
    assert load_pipeline(hf_dirs["llama"]).continuous_batcher(4) is None
    monkeypatch.setattr(hf_slots.HFSlotDecoder, "decode", decode)
    assert load_pipeline(hf_dirs["llama"]).continuous_batcher(4) is not None


def test_each_admission_is_announced_after_its_own_first_tokens_before_the_next_prefill(text, monkeypatch):
    """``step(admitted=...)`` is called once per admitted generation, right after its first tokens are sampled and
    before the next prompt is prefilled (a model process reports each first token then, instead of after the
    step's other prefills)."""
    batcher = text.continuous_batcher(max_sequences=4)
    events: list = []
    real_prefill = text.model.prefill

    def prefill(ids, **inputs):
        events.append("prefill")
        return real_prefill(ids, **inputs)

    monkeypatch.setattr(text.model, "prefill", prefill)
    for i, ids in enumerate(prompts(text.model.vocab_size, 3, seed=4)):
        generation = text.start_completion(prompt_token_ids=[ids], sampling=GREEDY, seed=0)
        stopping = generation.stopping
        generation.stopping = lambda last, i=i, stopping=stopping: events.append(f"token {i}") or stopping(last)
        batcher.submit(generation, lambda out: None)
    batcher.step(admitted=lambda: events.append("admitted"))
    assert events[:9] == ["prefill", "token 0", "admitted", "prefill", "token 1", "admitted",
                          "prefill", "token 2", "admitted"]
    assert events[9:] == ["token 0", "token 1", "token 2"]  # then the decode step: no more announcements


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


def test_what_a_previous_sequence_left_in_a_slot_never_reaches_the_next(any_text):
    """A slot's positions past a new prompt are zeroed: even NaN left there (masked, but 0 × NaN is NaN) cannot
    reach the sequence that takes the slot next."""
    text = any_text
    batcher = text.continuous_batcher(max_sequences=2)
    for storage in slot_storage(batcher):
        storage.fill_(float("nan"))
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
    assert batcher.expected_wait_s(rows=2) == 0.0  # more rows than slots: it runs by itself at once


def test_the_expected_wait_of_several_rows_is_until_enough_running_sequences_could_end(text):
    batcher = text.continuous_batcher(max_sequences=3)
    for prompt, max_new in (([1, 2, 3], 12), ([4, 5], 6)):
        batcher.submit(text.start_completion(prompt_token_ids=[prompt], sampling=SamplingParams(max_new), seed=0),
                       lambda out: None)
    for _ in range(3):
        batcher.step()
    assert batcher.running_sequences == 2 and batcher.step_seconds > 0
    assert batcher.expected_wait_s(rows=1) == 0.0  # the free slot
    assert batcher.expected_wait_s(rows=2) == pytest.approx(2 * batcher.step_seconds)  # the short one's 6 - 4 left
    assert batcher.expected_wait_s(rows=3) == pytest.approx(8 * batcher.step_seconds)  # then the long one's 12 - 4
    batcher.fail_all(RuntimeError("done"))
    assert batcher.expected_wait_s() == 0.0  # a free slot: it joins at the next step


def test_an_hf_family_whose_trial_raises_runs_one_request_at_a_time_and_still_loads(hf_dirs, monkeypatch):
    """A family whose cache does not fit slots may fail anywhere in the trial (Mllama's empty cross-attention
    layers, DeepSeek-V3's latent keys and values of two sizes): it generates one request at a time, never fails."""
    def broken(self, slot, present):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(hf_slots.HFSlotDecoder, "store_prompt", broken)
    pipeline = load_pipeline(hf_dirs["llama"])
    assert pipeline.continuous_batcher(4) is None
    assert len(pipeline.complete(["a robot"], sampling=GREEDY, seed=0).completions[0].token_ids) == 12


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope"},
                                  {"rope_type": "default", "mrope_section": [2, 2, 4]}])
def test_hf_positions_that_depend_on_the_batch_or_on_images_run_one_request_at_a_time(hf_dirs, rope):
    """Rotary scaling chosen from the batch's longest position (``dynamic``, ``longrope``) and multimodal positions
    would make a sequence's step depend on its neighbours or its images, which the short text-only trial cannot
    show: the configuration alone refuses them."""
    pipeline = load_pipeline(hf_dirs["llama"])
    pipeline.model.model.config.rope_parameters = {**(pipeline.model.model.config.rope_parameters or {}), **rope}
    assert hf_slots.slot_layout(pipeline.model) is None


def test_a_caption_whose_images_are_not_laid_out_one_per_row_runs_alone_with_its_solo_tokens(hf_pipelines):
    """LLaVA's processor lays out pixel_values one per image: a row of two images cannot be sliced per row."""
    pipeline = hf_pipelines["llava"]
    batcher = pipeline.continuous_batcher(max_sequences=4)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    requests = {"pair": [[images[0], images[1]]], "uneven": [[images[2]], [images[0], images[1]]],
                "single": [[images[2]]]}
    generations = {name: pipeline.start_caption(rows, ["what"], sampling=SAMPLED, seed=3)
                   for name, rows in requests.items()}
    assert [g.shares_steps for g in generations.values()] == [False, False, True]
    outcomes = run_all(batcher, {0: [("single", generations["single"])],
                                 2: [("pair", generations["pair"]), ("uneven", generations["uneven"])]})
    for name, rows in requests.items():
        solo = pipeline.caption(rows, ["what"], sampling=SAMPLED, seed=3)
        assert [c.token_ids for c in outcomes[name].completions] == [c.token_ids for c in solo.completions], name
