"""The caption pipeline on our ``vlm`` (placeholders, broadcasting, images, batching) and streaming
(``on_text``) for captions and text completions."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.caption import CaptionPipeline, broadcast_rows
from vla_foundry.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
LONG_GREEDY = SamplingParams(max_new_tokens=14, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0)


def image(seed, size=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoints):
    p = load_pipeline(tiny_checkpoints["vlm"])
    assert isinstance(p, CaptionPipeline)
    return p


@pytest.fixture(scope="module")
def text_pipeline(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints["transformer"])


def tokens(result):
    return [c.token_ids for c in result.completions]


# ---------------------------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize("n_images", [1, 2])
def test_placeholders_come_before_the_prompt(pipeline, n_images):
    model, tok = pipeline.model, pipeline.tokenizer
    assert tok.bos_token_id is None  # so the row starts with the placeholders
    image_token, per_image = model.image_token_id, model.tokens_per_image
    prompts = ["the quick brown fox", "a"]
    images = [[image(i + 10 * k) for k in range(n_images)] for i in range(2)]
    inputs = pipeline.processor.encode(prompts, None, images)
    for prompt, row in zip(prompts, inputs.ids):
        n = per_image * n_images
        assert row.count(image_token) == n
        assert row[:n] == [image_token] * n
        assert row[n:] == tok.encode(prompt, add_special_tokens=False)
    shape = (2, 3, 32, 32) if n_images == 1 else (2, n_images, 3, 32, 32)
    assert tuple(inputs.image_inputs["pixel_values"].shape) == shape


def test_prompt_token_ids_with_the_image_token_are_refused(pipeline):
    image_token = pipeline.model.image_token_id
    with pytest.raises(InvalidInputError) as err:
        pipeline.caption([[image(0)]], prompt_token_ids=[[5, image_token, 6]], sampling=GREEDY)
    assert err.value.field == "prompt_token_ids"
    ok = pipeline.caption([[image(0)]], prompt_token_ids=[[5, 6]], sampling=GREEDY)
    assert ok.prompt_token_ids == [[image_token] * pipeline.model.tokens_per_image + [5, 6]]


# ---------------------------------------------------------------------------------------------- broadcasting


def test_broadcast_rows():
    a, b, c = [image(0)], [image(1)], [image(2)]
    assert broadcast_rows(["p"], [a, b, c]) == (["p"] * 3, [a, b, c])
    prompts, images = broadcast_rows(["p", "q"], [a])
    assert prompts == ["p", "q"] and images == [a, a]
    assert broadcast_rows(None, [a, b]) == ([None, None], [a, b])
    assert broadcast_rows(["p", "q"], [a, b]) == (["p", "q"], [a, b])
    for field in ("prompt", "texts"):
        with pytest.raises(InvalidInputError) as err:
            broadcast_rows(["p", "q"], [a, b, c], field)
        assert err.value.field == field and "2 prompts and 3 image lists" in str(err.value)


def test_caption_broadcasts_prompts_and_images(pipeline):
    imgs = [[image(0)], [image(1)], [image(2)]]
    one_prompt = pipeline.caption(imgs, ["a robot"], sampling=GREEDY)
    assert tokens(one_prompt) == tokens(pipeline.caption(imgs, ["a robot"] * 3, sampling=GREEDY))
    assert len(one_prompt.completions) == 3
    prompts = ["a robot", "the quick brown fox"]
    one_image = pipeline.caption(imgs[:1], prompts, sampling=GREEDY)
    assert tokens(one_image) == [tokens(pipeline.caption(imgs[:1], [p], sampling=GREEDY))[0] for p in prompts]
    with pytest.raises(InvalidInputError) as err:
        pipeline.caption(imgs, prompts, sampling=GREEDY)
    assert err.value.field == "prompt"
    no_prompt = pipeline.caption(imgs[:2], sampling=GREEDY)  # image-only captions
    assert no_prompt.prompt_token_ids == [[pipeline.model.image_token_id] * pipeline.model.tokens_per_image] * 2
    assert tokens(no_prompt) == tokens(pipeline.caption(imgs[:2], ["", ""], sampling=GREEDY))
    with pytest.raises(InvalidInputError) as err:
        pipeline.caption(imgs, prompt_token_ids=[[5], [6]], sampling=GREEDY)
    assert err.value.field == "prompt_token_ids"


# ---------------------------------------------------------------------------------------------- images


def test_images_of_any_size_are_resized_to_the_model(pipeline):
    processor = pipeline.processor
    odd = [image(0, (24, 40)), image(1, (64, 48))]
    pixels = processor.image_inputs([[im] for im in odd])["pixel_values"]
    assert tuple(pixels.shape) == (2, 3, 32, 32)
    for got, im in zip(pixels, odd):
        resized = np.array(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC))
        manual = (torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
        assert torch.allclose(got, manual, atol=1e-6)
    exact = image(2)
    unchanged = processor.image_inputs([[exact]])["pixel_values"][0]
    assert torch.allclose(unchanged, (torch.from_numpy(exact).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5)
    result = pipeline.caption([[im] for im in odd], ["a", "b"], sampling=GREEDY)
    assert [len(t) for t in tokens(result)] == [8, 8]


def test_two_images_per_caption(pipeline):
    image_token, per_image = pipeline.model.image_token_id, pipeline.model.tokens_per_image
    imgs = [[image(0), image(1, (20, 30))], [image(2), image(3)]]
    result = pipeline.caption(imgs, ["a robot", "the"], sampling=GREEDY)
    assert [r.count(image_token) for r in result.prompt_token_ids] == [2 * per_image] * 2
    assert all(len(t) == 8 for t in tokens(result))
    alone = [tokens(pipeline.caption([im], [p], sampling=GREEDY))[0] for im, p in zip(imgs, ["a robot", "the"])]
    assert tokens(result) == alone
    with pytest.raises(InvalidInputError) as err:  # every caption of one request has the same camera count
        pipeline.caption([[image(0)], [image(1), image(2)]], ["a", "b"], sampling=GREEDY)
    assert err.value.field == "images"
    with pytest.raises(InvalidInputError) as err:
        pipeline.caption([[]], ["a"], sampling=GREEDY)
    assert err.value.field == "images"


# ---------------------------------------------------------------------------------------------- batching


def test_greedy_padded_batch_equals_solo_and_cache_equals_no_cache(pipeline):
    imgs = [[image(0)], [image(1)], [image(2)]]
    prompts = ["the quick brown fox jumps", "a", "shall i compare"]
    batch = pipeline.caption(imgs, prompts, sampling=LONG_GREEDY, use_cache=True)
    assert len({len(r) for r in batch.prompt_token_ids}) == 3
    no_cache = pipeline.caption(imgs, prompts, sampling=LONG_GREEDY, use_cache=False)
    solos = [tokens(pipeline.caption([im], [p], sampling=LONG_GREEDY))[0] for im, p in zip(imgs, prompts)]
    solos_no_cache = [tokens(pipeline.caption([im], [p], sampling=LONG_GREEDY, use_cache=False))[0]
                      for im, p in zip(imgs, prompts)]
    assert tokens(batch) == tokens(no_cache) == solos == solos_no_cache
    assert len({tuple(s) for s in solos}) == 3


def test_seeded_sampling_is_reproducible(pipeline):
    imgs = [[image(0)], [image(1)]]
    a = pipeline.caption(imgs, ["a", "b"], sampling=SAMPLED, seed=5)
    b = pipeline.caption(imgs, ["a", "b"], sampling=SAMPLED, seed=5)
    c = pipeline.caption(imgs, ["a", "b"], sampling=SAMPLED, seed=6)
    assert tokens(a) == tokens(b) != tokens(c)


# ---------------------------------------------------------------------------------------------- streaming


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, row, text, token_ids, finish_reason):
        self.events.append((row, text, list(token_ids), finish_reason))

    def check(self, result, stop=()):
        """Deltas add up to each final completion; the finish reason comes once, last; no stop string is
        ever visible."""
        for row, completion in enumerate(result.completions):
            events = [e for e in self.events if e[0] == row]
            assert events, row
            assert [e[3] for e in events[:-1]] == [None] * (len(events) - 1)
            assert events[-1][3] == completion.finish_reason
            streamed = ""
            for e in events:
                assert isinstance(e[1], str)
                streamed += e[1]
                assert not any(s in streamed for s in stop), (streamed, stop)
            assert streamed == completion.text
            assert sum((e[2] for e in events), []) == completion.token_ids


def clean_stop(text, start=2):
    """A 2-character stop string from ``text`` (after ``start``) without undecodable bytes in it."""
    for i in range(start, len(text) - 1):
        s = text[i:i + 2]
        if "\ufffd" not in s and s.strip():
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("use_cache", [True, False])
def test_caption_streaming(pipeline, use_cache):
    imgs = [[image(0)], [image(1)]]
    prompts = ["the quick brown fox", "a"]
    rec = Recorder()
    result = pipeline.caption(imgs, prompts, sampling=LONG_GREEDY, use_cache=use_cache, on_text=rec)
    assert tokens(result) == tokens(pipeline.caption(imgs, prompts, sampling=LONG_GREEDY))
    assert len([e for e in rec.events if e[0] == 0]) > 2  # it really streamed
    rec.check(result)
    # with a stop string taken from row 0's caption
    stop = clean_stop(result.completions[0].text)
    rec = Recorder()
    cut = pipeline.caption(imgs, prompts, sampling=LONG_GREEDY, stop=[stop], use_cache=use_cache, on_text=rec)
    rec.check(cut, stop=[stop])
    full = result.completions[0].text
    assert cut.completions[0].finish_reason == "stop"
    assert cut.completions[0].text == full[:full.index(stop)]


def test_text_completion_streaming(text_pipeline):
    prompts = ["the quick", "a robot picks", "shall"]
    rec = Recorder()
    result = text_pipeline.complete(prompts, sampling=LONG_GREEDY, on_text=rec)
    rec.check(result)
    for i in range(len(prompts)):
        stop = clean_stop(result.completions[i].text)
        rec = Recorder()
        cut = text_pipeline.complete(prompts, sampling=LONG_GREEDY, stop=[stop], on_text=rec)
        rec.check(cut, stop=[stop])
        full = result.completions[i].text
        assert cut.completions[i].text == full[:full.index(stop)] and cut.completions[i].finish_reason == "stop"
    # sampled rows stream too
    rec = Recorder()
    rec.check(text_pipeline.complete(prompts, sampling=SAMPLED, seed=3, on_text=rec))


def test_text_streaming_finishes_at_eos(text_pipeline):
    prompt = [[5, 6, 7]]
    greedy = text_pipeline.complete(prompt_token_ids=prompt, sampling=GREEDY).completions[0].token_ids
    saved, text_pipeline.end_ids = text_pipeline.end_ids, frozenset({greedy[3]})
    try:
        rec = Recorder()
        result = text_pipeline.complete(prompt_token_ids=prompt, sampling=GREEDY, on_text=rec)
    finally:
        text_pipeline.end_ids = saved
    completion = result.completions[0]
    assert completion.token_ids == greedy[:greedy.index(greedy[3])] and completion.finish_reason == "stop"
    rec.check(result)


def test_stop_string_matches_only_text_that_stays(tiny_tokenizer):
    """A character split over two byte-level tokens decodes as U+FFFD until its second token arrives; a stop
    string must not match that transient text (the final text never contains it)."""
    from vla_foundry.pipelines.text import CompletionTracker

    ids = tiny_tokenizer.encode("\u05e2", add_special_tokens=False)  # 'ע': UTF-8 D7 A2, one token per byte
    assert len(ids) == 2 and tiny_tokenizer.decode(ids[:1]) == "\ufffd"
    rec = Recorder()
    tracker = CompletionTracker(1, tiny_tokenizer, frozenset({tiny_tokenizer.eos_token_id}), ["\ufffd"], rec)
    for n in range(1, len(ids) + 1):
        tracker.update(range(1), torch.tensor([ids[:n]]))
    tracker.set_tokens(0, ids)
    completion = tracker.finish()[0]
    assert (completion.text, completion.token_ids, completion.finish_reason) == ("\u05e2", ids, "length")
    rec.check(SimpleNamespace(completions=[completion]), stop=["\ufffd"])
    # out of tokens halfway through the character: the whole text ends in U+FFFD, which the stop string cuts, and
    # the reason says so (it said "length" beside a text cut at a stop string)
    rec = Recorder()
    tracker = CompletionTracker(1, tiny_tokenizer, frozenset({tiny_tokenizer.eos_token_id}), ["a\ufffd"], rec)
    tokens = tiny_tokenizer.encode("a", add_special_tokens=False) + ids[:1]
    for n in range(1, len(tokens) + 1):
        tracker.update(range(1), torch.tensor([tokens[:n]]))
    tracker.set_tokens(0, tokens)
    completion = tracker.finish()[0]
    assert (completion.text, completion.finish_reason) == ("", "stop")
    rec.check(SimpleNamespace(completions=[completion]), stop=["a\ufffd"])


@pytest.mark.parametrize("model_type", ["vlm", "vlm_hf"])
def test_bfloat16_captioner_takes_float32_pixels(tiny_checkpoints, model_type):
    """Pixels are prepared in float32 and cast to the model's dtype on the way in (predict and evaluate)."""
    pipeline = load_pipeline(tiny_checkpoints[model_type], dtype="bfloat16")
    assert next(pipeline.model.parameters()).dtype == torch.bfloat16
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = pipeline.caption([[image]], ["the"], sampling=SamplingParams(max_new_tokens=3, temperature=0.0))
    assert len(result.completions[0].token_ids) == 3
    loss = pipeline.evaluate([[image]], texts=["a red block"], seed=0)["loss"]
    assert np.isfinite(loss)


def test_evaluate_each_scores_each_caption_evaluation_as_evaluate_does(pipeline):
    """Several clients' caption evaluations (different image counts per row): each its own ``evaluate`` result,
    a bad one its own error."""
    from vla_foundry.pipelines.caption import CaptionEvaluation

    evaluations = [CaptionEvaluation([[image(1)]], texts=["a red block"], seed=1),
                   CaptionEvaluation([[image(2), image(3)]], texts=["two views"], seed=2),
                   CaptionEvaluation([[image(4)]], texts=None, input_ids=None, seed=3)]  # neither: refused
    outs = pipeline.evaluate_each(evaluations)
    assert isinstance(outs[2], InvalidInputError) and outs[2].field == "texts"
    for e, out in zip(evaluations[:2], outs):
        assert out == pipeline.evaluate(e.images, texts=e.texts, seed=e.seed)


@pytest.fixture(scope="module")
def placeholder_is_pad(tmp_path_factory):
    """A vlm whose image_token_id is 0, the pad id of a deployment without a tokenizer (spec §13 B15)."""
    from tests.factories import tiny_model, tiny_vlm_params
    from vla_foundry.checkpoint import save_experiment

    path = tmp_path_factory.mktemp("vlm_image_token_0")
    save_experiment(tiny_model(tiny_vlm_params(vocab_size=64, image_token_id=0)), path)
    return load_pipeline(path)


def test_padding_is_never_an_image_placeholder_where_the_pad_id_is_the_placeholder(placeholder_is_pad):
    """Rows of different lengths are padded with id 0, here also the placeholder: the padding is not taken for
    placeholders (the evaluation was refused: more placeholders than image embeddings), and each row scores what it
    scores alone."""
    p = placeholder_is_pad
    placeholders = [0] * p.model.tokens_per_image
    rows = [placeholders + [5, 6, 7, 8], placeholders + [5, 6]]
    both = p.evaluate([[image(1)], [image(2)]], input_ids=rows, seed=0)
    alone = [p.evaluate([[image(i + 1)]], input_ids=[row], seed=0) for i, row in enumerate(rows)]
    assert both["num_tokens"] == sum(a["num_tokens"] for a in alone) == 6
    mean = sum(a["loss"] * a["num_tokens"] for a in alone) / 6
    assert both["loss"] == pytest.approx(mean, rel=1e-5)


def test_an_image_placeholder_outside_the_vocabulary_is_served(tmp_path_factory):
    """Spec §6 embeds placeholders as row 0 before their images replace them, so a placeholder id outside the
    language model's vocabulary (an added processor token) is valid: captions and evaluations are served, and a
    client's id outside the vocabulary is still refused, naming its field."""
    from tests.factories import tiny_model, tiny_transformer_params, tiny_vlm_params
    from vla_foundry.checkpoint import save_experiment

    path = tmp_path_factory.mktemp("vlm_placeholder_outside")
    save_experiment(tiny_model(tiny_vlm_params(64, transformer=tiny_transformer_params(vocab_size=64),
                                               image_token_id=64)), path)
    p = load_pipeline(path)
    out = p.caption([[image(1)]], prompt_token_ids=[[5, 6]], sampling=GREEDY, seed=0)
    assert len(out.completions[0].token_ids) > 0
    assert p.evaluate([[image(1)]], input_ids=[[64] * p.model.tokens_per_image + [5, 6, 7]], seed=0)["num_tokens"] == 3
    with pytest.raises(InvalidInputError, match=r"outside \[0, 64\): \[65\]") as e:
        p.caption([[image(1)]], prompt_token_ids=[[5, 65]], sampling=GREEDY, seed=0)
    assert e.value.field == "prompt_token_ids"


def test_each_row_s_placeholders_are_for_its_own_images(pipeline):
    """``input_ids`` rows with their placeholders in place: a row's count must be its own images' (before, a row
    of all of them took the other row's image, and the other row was scored with none, silently)."""
    placeholders = [pipeline.model.image_token_id] * pipeline.model.tokens_per_image
    with pytest.raises(InvalidInputError) as refused:
        pipeline.evaluate([[image(1)], [image(2)]], input_ids=[placeholders * 2 + [5], [5, 6]], seed=1)
    assert refused.value.field == "input_ids" and "input_ids[0]" in str(refused.value)
    assert pipeline.evaluate([[image(1)], [image(2)]], input_ids=[placeholders + [5, 6], placeholders + [7, 8]],
                             seed=1)["num_tokens"] > 0
