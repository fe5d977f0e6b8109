import pytest
import torch
import yaml

from vla_foundry import save_experiment
from vla_foundry.errors import CheckpointError, InvalidInputError
from vla_foundry.pipelines import load_pipeline
from vla_foundry.sampling import SamplingParams
from vla_foundry.tokenizer import load_tokenizer
from tests.factories import tiny_model, tiny_transformer_params

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints["transformer"])


def test_padded_batch_decodes_like_single_prompts(pipeline):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    together = pipeline.complete(prompt_token_ids=prompts, sampling=GREEDY, seed=0).completions
    for prompt, completion in zip(prompts, together):
        alone = pipeline.complete(prompt_token_ids=[prompt], sampling=GREEDY, seed=0).completions[0]
        assert completion.token_ids == alone.token_ids


@pytest.mark.parametrize("prompts", [[[5, 6, 7]], [[5, 6, 7, 8, 9, 10, 11], [12], [14, 15, 16]]])
def test_cache_and_no_cache_agree(pipeline, prompts):
    a = pipeline.complete(prompt_token_ids=prompts, sampling=GREEDY, use_cache=True).completions
    b = pipeline.complete(prompt_token_ids=prompts, sampling=GREEDY, use_cache=False).completions
    alone = [pipeline.complete(prompt_token_ids=[p], sampling=GREEDY).completions[0] for p in prompts]
    assert [c.token_ids for c in a] == [c.token_ids for c in b] == [c.token_ids for c in alone]


@pytest.mark.parametrize("temperature", [1e-320, 1e-30, 1e-6, 2e-5, 1e6])
def test_extreme_temperatures_sample_finite_tokens(pipeline, temperature):
    result = pipeline.complete(prompt_token_ids=[[5, 6, 7]], seed=0,
                               sampling=SamplingParams(max_new_tokens=4, temperature=temperature))
    assert all(0 <= t < 300 for t in result.completions[0].token_ids)
    if temperature < 1e-3:  # vanishing temperature is greedy
        greedy = pipeline.complete(prompt_token_ids=[[5, 6, 7]],
                                   sampling=SamplingParams(max_new_tokens=4, temperature=0))
        assert result.completions[0].token_ids == greedy.completions[0].token_ids


def test_text_prompts_seeds_and_usage(pipeline):
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    a = pipeline.complete(["the quick brown", "a robot"], sampling=sampling, seed=11)
    b = pipeline.complete(["the quick brown", "a robot"], sampling=sampling, seed=11)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert all(isinstance(c.text, str) for c in a.completions)
    assert a.prompt_tokens == sum(len(r) for r in a.prompt_token_ids)
    assert a.completion_tokens == sum(len(c.token_ids) for c in a.completions)
    first, second = (pipeline.complete(["the quick brown"], sampling=sampling) for _ in range(2))
    assert first.seed != second.seed


def test_eos_finishes_a_row_and_is_not_returned(pipeline):
    prompt = [[5, 6, 7]]
    greedy = pipeline.complete(prompt_token_ids=prompt, sampling=GREEDY).completions[0].token_ids
    pipeline.end_ids, saved = frozenset({greedy[2]}), pipeline.end_ids
    try:
        c = pipeline.complete(prompt_token_ids=prompt, sampling=GREEDY).completions[0]
    finally:
        pipeline.end_ids = saved
    assert c.token_ids == greedy[:2] and c.finish_reason == "stop"


def test_stop_strings_cut_the_text(pipeline):
    full = pipeline.complete(["the quick"], sampling=SamplingParams(max_new_tokens=10, temperature=0.0)).completions[0]
    assert full.finish_reason == "length"
    stop = full.text[3:5]
    cut = pipeline.complete(["the quick"], sampling=SamplingParams(max_new_tokens=10, temperature=0.0),
                            stop=[stop]).completions[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert len(cut.token_ids) < len(full.token_ids)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt_token_ids=[[1, 300]]), "prompt_token_ids"),
    (dict(prompt_token_ids=[[]]), "prompt_token_ids"),
    (dict(prompts=[]), "prompt"),
    (dict(prompts=["a"], prompt_token_ids=[[1]]), "prompt"),
    (dict(prompt_token_ids=[[1] * 60], sampling=SamplingParams(max_new_tokens=10)), "max_new_tokens"),
    (dict(prompts=["bad \ud800 surrogate"]), "prompt"),
    (dict(prompts=["the"], stop=[""]), "stop"),
])
def test_bad_inputs_name_their_field(pipeline, kwargs, field):
    with pytest.raises(InvalidInputError) as err:
        pipeline.complete(**kwargs)
    assert err.value.field == field


def test_evaluate_matches_the_batch_handler(pipeline):
    ids = [[5, 6, 7, 8], [9, 10]]
    out = pipeline.evaluate(input_ids=ids, seed=3)
    padded = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    direct = pipeline.batch_handler.compute_loss(pipeline.model, {"input_ids": padded, "attention_mask": mask})
    assert out["loss"] == pytest.approx(direct.loss.item(), abs=1e-6)
    assert out["num_tokens"] == 4 and out["num_samples"] == 2 and out["seed"] == 3
    texts = pipeline.evaluate(texts=["the quick brown fox"], seed=0)
    assert texts["num_samples"] == 1 and texts["loss"] > 0
    with pytest.raises(InvalidInputError, match="at least 2 tokens"):
        pipeline.evaluate(input_ids=[[5]])
    with pytest.raises(InvalidInputError, match="no token to predict"):
        pipeline.evaluate(input_ids=[[5, 6, 7]], attention_mask=[[1, 0, 0]])
    with pytest.raises(InvalidInputError, match="0 or 1"):
        pipeline.evaluate(input_ids=[[5, 6, 7]], attention_mask=[[1, 2, 1]])


def test_no_tokenizer_means_token_ids_only(transformer_fixture):
    p = load_pipeline(transformer_fixture)
    assert p.tokenizer is None and p.io()["accepts"] == ["prompt_token_ids"]
    with pytest.raises(InvalidInputError, match="no tokenizer.*prompt_token_ids"):
        p.complete(["hello"])
    assert len(p.complete(prompt_token_ids=[[1, 2]], sampling=GREEDY).completions[0].token_ids) == 6


def test_tokenizer_sources(tmp_path, tiny_tokenizer):
    model = tiny_model(tiny_transformer_params(vocab_size=len(tiny_tokenizer)))
    save_experiment(model, tmp_path / "bundled", tokenizer=tiny_tokenizer)
    tok, source = load_tokenizer(tmp_path / "bundled")
    assert source.endswith("tokenizer") and tok.encode("the fox") == tiny_tokenizer.encode("the fox")

    # config.yaml data.tokenizer: a path relative to the experiment
    save_experiment(model, tmp_path / "named")
    tiny_tokenizer.save_pretrained(str(tmp_path / "named" / "my_tok"))
    config = yaml.safe_load((tmp_path / "named" / "config.yaml").read_text())
    config["data"] = {"tokenizer": "my_tok"}
    (tmp_path / "named" / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_pipeline(tmp_path / "named").tokenizer_source.endswith("my_tok")

    # a name that is neither a path nor cached: token ids only, with a warning
    config["data"] = {"tokenizer": "debug"}
    (tmp_path / "named" / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_pipeline(tmp_path / "named").tokenizer is None

    # a deployment override wins, and a bad override is an error
    p = load_pipeline(tmp_path / "named", tokenizer=str(tmp_path / "bundled" / "tokenizer"))
    assert p.tokenizer is not None
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_pipeline(tmp_path / "named", tokenizer=str(tmp_path / "nowhere"))


def test_evaluation_uses_the_runs_z_loss(tmp_path):
    model = tiny_model(tiny_transformer_params())
    save_experiment(model, tmp_path / "plain")
    save_experiment(model, tmp_path / "zloss", training_config={"hparams": {"z_loss_coefficient": 0.5}})
    ids = [[5, 6, 7, 8]]
    plain = load_pipeline(tmp_path / "plain").evaluate(input_ids=ids)["loss"]
    with_z = load_pipeline(tmp_path / "zloss")
    assert with_z.batch_handler.z_loss_coefficient == 0.5
    logits = model(torch.tensor([[5, 6, 7]])).logits[0]
    z = torch.logsumexp(logits, -1).pow(2).mean().item()
    assert with_z.evaluate(input_ids=ids)["loss"] == pytest.approx(plain + 0.5 * z, rel=1e-5)


def test_hf_end_of_turn_ids_end_generation(tiny_checkpoints):
    """An HF model's generation_config.eos_token_id (e.g. an end-of-turn token) ends a completion too."""
    from vla_foundry.pipelines.text import TextPipeline

    loaded = load_pipeline(tiny_checkpoints["transformer_hf"])
    prompt = [[5, 6, 7]]
    greedy = loaded.complete(prompt_token_ids=prompt, sampling=GREEDY).completions[0].token_ids
    loaded.model.model.generation_config.eos_token_id = [loaded.eos_token_id, greedy[1]]  # as a chat model's
    pipeline = TextPipeline(loaded.model, loaded.tokenizer)
    assert pipeline.end_ids == {loaded.eos_token_id, greedy[1]} and greedy[1] in pipeline.io()["end_token_ids"]
    c = pipeline.complete(prompt_token_ids=prompt, sampling=GREEDY).completions[0]
    assert c.token_ids == greedy[:1] and c.finish_reason == "stop"


@pytest.mark.parametrize("model_type", ["transformer", "transformer_hf"])
def test_each_batched_evaluation_equals_its_solo_evaluation(tiny_checkpoints, model_type):
    """Evaluations of different lengths, with and without attention masks, as texts or ids, in one forward pass:
    each loss (over its own tokens) equals the one it gets alone; a bad one fails alone."""
    from vla_foundry.pipelines.text import TextEvaluation

    pipeline = load_pipeline(tiny_checkpoints[model_type])
    evaluations = [TextEvaluation(input_ids=[[5, 6, 7, 8, 9, 10, 11]], seed=1),
                   TextEvaluation(input_ids=[[3, 4, 5], [9, 8, 7, 6]], attention_mask=[[1, 1, 0], [1, 1, 1, 1]],
                                  seed=2),
                   TextEvaluation(input_ids=[[1]], seed=3),  # too short: its own failure
                   TextEvaluation(texts=["the robot picks up the red block"], seed=4)]
    together = pipeline.evaluate_each(evaluations)
    assert isinstance(together[2], InvalidInputError) and together[2].field == "input_ids"
    for e, out in zip(evaluations, together):
        if e.seed == 3:
            continue
        alone = pipeline.evaluate(e.input_ids, e.attention_mask, e.texts, e.seed)
        assert out["loss"] == pytest.approx(alone["loss"], abs=1e-5)
        assert (out["num_tokens"], out["num_samples"], out["seed"]) == \
               (alone["num_tokens"], alone["num_samples"], alone["seed"])


def metaspace_tokenizer():
    """A sentencepiece-style tokenizer (▁ marks a word's leading space; the decoder drops the first one), where a
    token's text depends on its position: the case incremental decoding must get right besides byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.factories import TOKENIZER_TEXT

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TOKENIZER_TEXT, trainers.BpeTrainer(vocab_size=200, special_tokens=["<eos>", "<unk>"],
                                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_incremental_text_equals_decoding_everything_at_every_step(tiny_tokenizer, kind):
    """The tracker decodes a short window per step; at every step its settled text is what decoding all the tokens
    (eos dropped, a trailing incomplete character left out) gives, the streamed deltas add up to the final text,
    and a stop string ends the row at the step where it first appears in that text."""
    import numpy as np

    from vla_foundry.pipelines.text import CompletionTracker

    tokenizer = tiny_tokenizer if kind == "byte_level" else metaspace_tokenizer()
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(0)
    for trial in range(150):
        ids = rng.integers(0, len(tokenizer), size=60).tolist()
        stop = [] if trial % 2 else [tokenizer.decode(ids[5:7]).strip("\ufffd ")[:2] or "zz"]
        deltas, reasons = [], []
        tracker = CompletionTracker(1, tokenizer, frozenset({eos}), stop,
                                    lambda row, text, tokens, reason, deltas=deltas, reasons=reasons: (
                                        deltas.append(text), reasons.append(reason)))
        ended = None
        for n, token in enumerate(ids, start=1):
            done = tracker.append(range(1), [token])[0]
            visible = ids[:n][:-1] if ids[n - 1] == eos else ids[:n]
            whole = tokenizer.decode(visible, skip_special_tokens=True).rstrip("\ufffd")
            if eos not in ids[:n - 1] and (ended is None):
                assert tracker._settle(0) == whole, (kind, trial, n)
                expected_done = ids[n - 1] == eos or any(s in whole for s in stop)
                assert done == expected_done, (kind, trial, n)
                if done:
                    ended = n
        completion = tracker.finish()[0]
        assert "".join(d for d in deltas if d) == completion.text
        assert reasons[-1] == completion.finish_reason
        if ended is not None:
            assert completion.finish_reason == "stop" and len(completion.token_ids) <= ended


def test_a_tokenizer_that_cleans_up_spaces_finds_the_stop_strings_the_clean_up_forms_and_streams_the_final_text(
        tiny_tokenizer):
    """Clean-up rewrites text across tokens (" 'm" → "'m"): a stop string that only the clean-up forms still ends the
    row (a window's text alone would never show it), and the streamed text holds back what the clean-up may still
    rewrite, so that it adds up to the final text (" I '" would become " I'm" one token later)."""
    import copy

    from vla_foundry.pipelines.text import CompletionTracker

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.clean_up_tokenization_spaces = True  # as a WordPiece tokenizer has it (forced here on a BPE one)
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert tokenizer.decode(tokenizer.encode(" I 'm", add_special_tokens=False)) == " I'm"
    ids = tokenizer.encode(" I 'm here do n't go", add_special_tokens=False)
    for stop in (["I'm"], ["here"]):
        deltas: list = []
        tracker = CompletionTracker(1, tokenizer, frozenset({tokenizer.eos_token_id}), stop,
                                    lambda row, text, tokens, reason, deltas=deltas: deltas.append(text))
        done = [tracker.append(range(1), [t])[0] for t in ids]
        assert any(done), "the stop string was missed"
        completion = tracker.finish()[0]
        assert completion.finish_reason == "stop" and stop[0] not in completion.text
        assert "".join(d for d in deltas if d) == completion.text == (" " if stop == ["I'm"] else " I'm ")


def test_prompt_ids_encode_on_an_unpadded_copy_of_the_tokenizer(tiny_checkpoints):
    """``prompt_ids`` (what a server calls off the model thread) gives the rows ``complete`` runs, checked for
    length, from a copy of the tokenizer with padding and truncation off even when the original was left padded
    (as an HF processor leaves it): encoding then never changes the copy's settings, which concurrent threads
    must not do."""
    import pytest

    from vla_foundry.errors import InvalidInputError
    from vla_foundry.sampling import SamplingParams

    text = load_pipeline(tiny_checkpoints["transformer"])
    text.tokenizer._tokenizer.enable_padding(length=32)
    ids = text.prompt_ids(["the robot", "picks up"], sampling=SamplingParams(max_new_tokens=4))
    assert ids == [text.tokenizer.encode(p, add_special_tokens=True) for p in ("the robot", "picks up")]
    assert text._front_tokenizer is not text.tokenizer
    assert text._front_tokenizer._tokenizer.padding is None and text._front_tokenizer._tokenizer.truncation is None
    with pytest.raises(InvalidInputError) as long:
        text.prompt_ids(["word " * 5000], sampling=SamplingParams(max_new_tokens=4))
    assert long.value.field == "prompt"


def test_every_bit_of_a_seed_counts_on_the_cpu():
    """torch's CPU generator keeps a seed's low 32 bits: seeds that differ above them must still draw differently,
    and seeds below 2^32 draw what torch draws for them."""
    import torch

    from vla_foundry.pipelines.text import make_generator

    cpu = torch.device("cpu")
    draws = {seed: torch.randn(4, generator=make_generator(cpu, seed)) for seed in (1, 1 + 2**32, 1 + 2**62, 2**63 - 1)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)
    assert torch.equal(draws[1], torch.randn(4, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.randn(4, generator=make_generator(cpu, 1 + 2**62)), draws[1 + 2**62])  # reproducible


def test_a_long_stop_string_costs_a_stream_per_token_what_the_unsent_text_holds(tiny_tokenizer):
    """The tail held back as a possible start of a stop string is looked for in the text not sent yet only: with
    stop strings of 4,000 characters that never match, a token costs a few prefix checks, not one per character
    of the text so far (streaming was quadratic in the completion's length). The stream still adds up."""
    from vla_foundry.pipelines.text import CompletionTracker

    class Counted(str):  # a stop string that counts the prefixes taken of it
        taken = 0

        def __getitem__(self, key):
            Counted.taken += 1
            return str.__getitem__(self, key)

    ids = tiny_tokenizer.encode("the quick brown fox jumps over the lazy dog " * 30, add_special_tokens=False)[:400]
    deltas = []
    tracker = CompletionTracker(1, tiny_tokenizer, frozenset({tiny_tokenizer.eos_token_id}),
                                [Counted(c * 4000) for c in "ZYXW"], lambda row, text, *_: deltas.append(text))
    for token in ids:
        assert tracker.append(range(1), [token]) == [False]
    assert "".join(d for d in deltas if d) == tracker.finish()[0].text
    assert Counted.taken < 20 * len(ids)  # (2,812 here; 564,480 before, one per character of the text so far)
