"""Streamed text adds up to the text the request gets without streaming, for tokenizers that clean up tokenization
spaces (" ." → ".", " ' m" → "'m") too: WordPiece, Unigram (sentencepiece) and any HF tokenizer with
``clean_up_tokenization_spaces``, decoded incrementally (a short window per step) all the same."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tests.factories import tiny_model, tiny_transformer_params
from vla_foundry import save_experiment
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.text import CompletionTracker
from vla_foundry.sampling import SamplingParams
from vla_foundry.tokenizer import CLEANUP_REPLACEMENTS, SpaceCleanup, decode_cleans_up

# Words whose joins the clean-up rewrites: punctuation after a space, and the pieces of "i'm", "don't", "it's", ...
WORDS = ["i", "it", "you", "don", "do", "the", "robot", "picks", "up", "a", "red", "block", "'", ".", ",", "?", "!",
         "s", "m", "t", "n", "n't", "ve", "re"]


def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer (its decoder joins words with spaces; ``clean_up_tokenization_spaces``
    as BERT's has it), from a small vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[SEP]", *WORDS, "##s", "##n", "##'", "##t", "##ing", "##ed"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]", pad_token="[PAD]",
                                   clean_up_tokenization_spaces=True)


def unigram_tokenizer():
    """A sentencepiece-style Unigram tokenizer (▁ marks a word's leading space) that cleans up tokenization spaces,
    as T5's and ALBERT's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<eos>", *(f"▁{w}" for w in WORDS), *WORDS, "▁"]
    tok = Tokenizer(models.Unigram([(p, -1.0 - 0.1 * i) for i, p in enumerate(pieces)], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=True)


def forced_bpe_tokenizer(tiny_tokenizer):
    """The byte-level BPE tokenizer, made to clean up spaces (transformers 5 skips the clean-up for BPE unless
    forced)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return tokenizer


def cleaning_tokenizer(kind: str, tiny_tokenizer):
    return {"wordpiece": wordpiece_tokenizer, "unigram": unigram_tokenizer,
            "bpe_cleanup": lambda: forced_bpe_tokenizer(tiny_tokenizer)}[kind]()


def test_the_tokenizers_here_clean_up_across_tokens(tiny_tokenizer):
    """What the tests below rely on: each of these tokenizers' decode rewrites text across tokens, and
    ``decode_cleans_up`` says which tokenizers' decode cleans up (a BPE one only when forced)."""
    for kind in ("wordpiece", "unigram", "bpe_cleanup"):
        tokenizer = cleaning_tokenizer(kind, tiny_tokenizer)
        ids = tokenizer.encode("i ' m up . it ' s red", add_special_tokens=False)
        assert tokenizer.decode(ids).strip() == "i'm up. it's red", kind
        assert decode_cleans_up(tokenizer), kind
    asks = copy.deepcopy(tiny_tokenizer)
    asks.clean_up_tokenization_spaces = True  # not forced: transformers leaves a BPE tokenizer's text alone
    ids = asks.encode("it ' s .", add_special_tokens=False)
    assert asks.decode(ids) == "it ' s ." and not decode_cleans_up(asks)
    assert not decode_cleans_up(tiny_tokenizer)


def test_space_cleanup_of_growing_text_is_transformers_clean_up_and_holds_back_little():
    """``SpaceCleanup`` fed any text in any pieces gives what transformers' ``clean_up_tokenization`` gives the whole
    text; what it calls done never changes however the text goes on; and it holds back a bounded tail (each stage at
    most its pattern's length − 1), so a step's cost does not grow with the text."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    reference = PreTrainedTokenizerBase.clean_up_tokenization
    rng = np.random.default_rng(0)
    alphabet = list(" .?!,'ntmsvera") + [" ", " ", "'"]
    held_at_most = sum(len(old) - 1 for old, _ in CLEANUP_REPLACEMENTS)
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 60))))
        cleanup, fed, dones = SpaceCleanup(), "", []
        while len(fed) < len(text):
            piece = text[len(fed):len(fed) + int(rng.integers(1, 5))]
            cleanup.feed(piece)
            fed += piece
            assert cleanup.text() == reference(None, fed), repr(fed)
            assert sum(map(len, cleanup.pending)) <= held_at_most
            dones.append(cleanup.done)
            assert cleanup.text(" ' m") == reference(None, fed + " ' m")  # a tail, as if the text ended after it
        final = reference(None, text)
        assert all(final.startswith(done) for done in dones), repr(text)


def run_tracker(tokenizer, ids: list[int], stop: list[str], tracker_tokenizer=None, streams: bool = True):
    """Every id through a one-row tracker (of ``tracker_tokenizer``, by default ``tokenizer``), checking at every step
    that its settled text is what decoding all its tokens whole gives, and that it is done exactly when eos or a stop
    string first shows, and (``streams``) that it streams as the text comes; its streamed (text, finish reason)
    deltas, its completion and the tracker."""
    eos = tokenizer.eos_token_id
    deltas: list = []
    tracker = CompletionTracker(1, tracker_tokenizer or tokenizer, frozenset({eos}), stop,
                                lambda row, text, tokens, reason: deltas.append((text, reason)))
    for n, token in enumerate(ids, start=1):
        done = tracker.append(range(1), [token])[0]
        visible = ids[:n][:-1] if ids[n - 1] == eos else ids[:n]
        whole = tokenizer.decode(visible, skip_special_tokens=True).rstrip("\ufffd")
        assert tracker._settle(0) == whole, n
        assert done == (ids[n - 1] == eos or any(s in whole for s in stop)), n
        # And the text streams as it comes: what is held back is at most a tail that may still become a stop
        # string or be rewritten by the clean-up (a few characters), never a fixed lag of several words.
        streamed = "".join(text for text, _ in deltas if text)
        assert not streams or len(whole) - len(streamed) <= max(map(len, stop), default=0) + 6, (n, whole, streamed)
        if done:
            break
    return deltas, tracker.finish()[0], tracker


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "bpe_cleanup"])
def test_streamed_deltas_add_up_to_the_final_text_when_the_tokenizer_cleans_up_spaces(tiny_tokenizer, kind):
    """Random completions, with and without stop strings (some that only the clean-up forms, like "i'm"): at every
    step the settled text is the whole decode's and the row ends where a stop string first shows, the deltas joined
    are exactly the final text, and each step decodes a short window, not the whole completion (O(1) per step)."""
    tokenizer = cleaning_tokenizer(kind, tiny_tokenizer)
    eos = tokenizer.eos_token_id
    words = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    rng = np.random.default_rng(1)
    for trial in range(120):
        ids = rng.choice(words, size=60).tolist()
        if trial % 5 == 4:
            ids[40] = eos
        stop = [[], ["'m"], ["t's", "?"], ["i'm"]][trial % 4]
        decoded: list[int] = []
        spy = copy.copy(tokenizer)  # (a shallow copy: same backend) whose decode records each call's length
        spy.decode = lambda token_ids, decoded=decoded, **kw: (decoded.append(len(token_ids))
                                                                or tokenizer.decode(token_ids, **kw))
        deltas, completion, _ = run_tracker(tokenizer, ids, stop, spy)
        assert "".join(text for text, _ in deltas if text) == completion.text, (trial, deltas)
        assert deltas[-1][1] == completion.finish_reason
        # every decode but finish's (the last, whole) is a window of a few tokens (more while a character is
        # incomplete), however long the row grows
        assert decoded[-1] == len(completion.token_ids) and max(decoded[:-1]) <= 16, decoded


def test_a_tokenizer_that_cleans_up_some_other_way_streams_its_text_at_the_end(tiny_tokenizer):
    """A clean-up that is not transformers' (a tokenizer class may override ``clean_up_tokenization``) may rewrite any
    text: rows are decoded whole and stream their text only with their finish, which is then the whole text."""

    class Renaming(type(wordpiece_tokenizer())):
        def clean_up_tokenization(self, text):
            return super().clean_up_tokenization(text).replace("robot", "ROBOT")

    base = wordpiece_tokenizer()
    tokenizer = Renaming(tokenizer_object=base.backend_tokenizer, unk_token="[UNK]", eos_token="[SEP]",
                         pad_token="[PAD]", clean_up_tokenization_spaces=True)
    ids = tokenizer.encode("the robot picks up a red block . it ' s red", add_special_tokens=False)
    deltas, completion, tracker = run_tracker(tokenizer, ids, [], streams=False)
    assert tracker.whole and "ROBOT" in completion.text
    assert [text for text, _ in deltas if text] == [completion.text]


@pytest.fixture(scope="module")
def wordpiece_checkpoint(tmp_path_factory):
    """A tiny transformer whose tokenizer is the WordPiece one above (saved with the checkpoint)."""
    tokenizer = wordpiece_tokenizer()
    path = tmp_path_factory.mktemp("wordpiece") / "wordpiece"
    params = tiny_transformer_params(vocab_size=len(tokenizer), max_seq_len=256)
    save_experiment(tiny_model(params, seed=3), path, tokenizer=tokenizer)
    return path


def test_a_streamed_completion_is_the_completion_without_streaming(wordpiece_checkpoint):
    """Through the pipeline, solo and through a continuous batcher: a WordPiece model's streamed deltas, joined, are
    the text the same request gets without streaming (sampled, so that the words the clean-up joins come up)."""
    pipeline = load_pipeline(wordpiece_checkpoint)
    assert decode_cleans_up(pipeline.tokenizer)
    sampling = SamplingParams(max_new_tokens=120, temperature=1.0)
    prompts = ["i ' m the robot", "it ' s up . don ' t"]
    cleaned = 0
    for seed in range(6):
        plain = pipeline.complete(prompts, sampling=sampling, seed=seed)
        streamed: dict[int, list[str]] = {0: [], 1: []}
        result = pipeline.complete(prompts, sampling=sampling, seed=seed,
                                   on_text=lambda row, text, ids, reason, into=streamed: into[row].append(text or ""))
        batched: dict[int, list[str]] = {0: [], 1: []}
        batcher = pipeline.continuous_batcher(4)
        outcome: list = []
        batcher.submit(pipeline.start_completion(prompts, sampling=sampling, seed=seed,
                                                 on_text=lambda row, text, ids, reason, into=batched:
                                                 into[row].append(text or "")), outcome.append)
        while batcher.active:
            batcher.step()
        for row, completion in enumerate(plain.completions):
            assert result.completions[row].text == completion.text
            assert "".join(streamed[row]) == completion.text, (seed, row)
            assert outcome[0].completions[row].text == completion.text
            assert "".join(batched[row]) == completion.text, (seed, row)
            raw = pipeline.tokenizer.decode(completion.token_ids, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
            cleaned += raw != completion.text
    assert cleaned >= 2, "the clean-up seldom changed these completions: the test would prove little"


def byte_fallback_tokenizer():
    """A Llama 2 / Mistral style tokenizer: sentencepiece BPE with ``byte_fallback`` (a character outside the
    vocabulary is made of ``<0xNN>`` byte tokens, one per UTF-8 byte) and Llama 2's decoder, whose ByteFallback writes
    U+FFFD for every byte of a run that is not valid UTF-8 as a whole."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁hi", "hi", "▁the", "▁robot", "▁"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_streamed_deltas_add_up_to_the_final_text_with_byte_fallback_tokens():
    """Characters made of byte tokens (emoji, CJK), cut by the length or eos in the middle of one, or followed by
    a stray byte that turns their whole run into U+FFFDs: the deltas joined are exactly the final text (before, the
    run's complete characters were streamed, and then rewritten by the decoder: 'hi😀' streamed, 'hi������' final)."""
    tokenizer = byte_fallback_tokenizer()
    eos = tokenizer.eos_token_id

    def as_bytes(text: str) -> list[int]:
        return tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])

    words = tokenizer.convert_tokens_to_ids(["▁hi", "hi", "▁the", "▁robot"])
    emoji, cjk = as_bytes("😀"), as_bytes("机器人")
    cases = [words[:1] + emoji + emoji[:2],  # the length cuts the second emoji
             words[2:3] + cjk + cjk[:1] + [eos],  # a stray byte, then eos: the whole run is U+FFFDs
             words[:1] + emoji + words[1:2] + cjk + words[3:]]  # runs closed by words: streamed as they close
    rng = np.random.default_rng(2)
    for _ in range(300):  # words, whole characters as bytes, and stray bytes, at random
        ids: list[int] = []
        while len(ids) < 30:
            pick = rng.integers(4)
            ids += [int(rng.choice(words))] if pick < 2 else as_bytes(str(rng.choice(["é", "机", "😀"]))) if (
                pick == 2) else [3 + int(rng.integers(128, 256))]
        cases.append(ids)
    for ids in cases:
        deltas, completion, _ = run_tracker(tokenizer, ids, [], streams=False)
        assert "".join(text for text, _ in deltas if text) == completion.text, (ids, deltas, completion.text)
    deltas, _, _ = run_tracker(tokenizer, cases[2], [], streams=False)
    assert "".join(text for text, _ in deltas[:-1] if text).startswith("hi😀hi机器人")  # (streamed before the finish)


def test_skipped_special_tokens_among_words_and_byte_runs_stream_the_final_text():
    """Special tokens the decoder skips: a control token added as special (``all_special_ids`` does not list it, so a
    window started at it and the decoder dropped the next word's space: 'therobotthe' streamed, and ' robot' never
    stopped the row), and ``<s>`` inside a byte run (the decoder joins the bytes across it; the run was taken for
    closed at it and streamed, then rewritten into U+FFFDs by a later stray byte)."""
    tokenizer = byte_fallback_tokenizer()
    tokenizer.add_tokens(["<ctrl>"], special_tokens=True)
    ctrl, bos = tokenizer.convert_tokens_to_ids("<ctrl>"), tokenizer.bos_token_id
    assert ctrl not in tokenizer.all_special_ids and tokenizer.decode([ctrl], skip_special_tokens=True) == ""
    the, robot, hi, word = tokenizer.convert_tokens_to_ids(["▁the", "▁robot", "▁hi", "hi"])
    e_acute = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in "é".encode()])
    stray = tokenizer.convert_tokens_to_ids("<0x80>")
    cases = [[the, ctrl, robot, ctrl, the], [hi, *e_acute, bos, stray, hi], [hi, *e_acute, ctrl, hi]]
    rng = np.random.default_rng(3)
    for _ in range(300):
        ids: list[int] = []
        while len(ids) < 30:
            pick = rng.integers(6)
            ids += ([int(rng.choice([the, robot, hi, word]))] if pick < 2 else e_acute if pick == 2 else
                    [stray] if pick == 3 else [ctrl] if pick == 4 else [bos])
        cases.append(ids)
    for ids in cases:
        deltas, completion, _ = run_tracker(tokenizer, ids, [], streams=False)
        assert "".join(text for text, _ in deltas if text) == completion.text, (ids, deltas, completion.text)
    deltas, completion, _ = run_tracker(tokenizer, cases[0], [" robot"])
    assert completion.text == "the" and completion.finish_reason == "stop" and len(completion.token_ids) == 3
