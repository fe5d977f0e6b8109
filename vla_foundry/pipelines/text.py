"""Text completion and language-model evaluation for any model of the ``text`` modality.

A text model provides ``forward(input_ids) -> .logits`` and the spec's ``generate``
(with ``generator`` and ``stopping`` keywords), ``vocab_size`` and ``max_seq_len``; this
pipeline adds what serving needs around it: tokenizing, batching prompts of different
lengths, stop strings, finish reasons, usage counts, seeds and input validation.
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from vla_foundry.continuous import DEFAULT_PREFILL_TOKENS, ContinuousBatcher, Generation
from vla_foundry.errors import InvalidInputError
from vla_foundry.models.registry import create_batch_handler
from vla_foundry.pipelines.base import Pipeline, register_pipeline
from vla_foundry.sampling import SamplingParams
from vla_foundry.tokenizer import (SpaceCleanup, byte_fallback_ids, cleans_up_as_transformers, decode_cleans_up,
                                   load_tokenizer, render_with_template, skipped_ids)


@dataclass
class Completion:
    text: Optional[str]  # None when the deployment has no tokenizer
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"


@dataclass
class CompletionResult:
    completions: list[Completion]
    prompt_tokens: int
    completion_tokens: int
    seed: int
    prompt_token_ids: list[list[int]] = field(default_factory=list)


@dataclass
class TextEvaluation:
    """One client's evaluation in a batched ``evaluate_each`` call: token rows (with their attention rows) or
    texts."""

    input_ids: Optional[Sequence[Sequence[int]]] = None
    attention_mask: Optional[Sequence[Sequence[int]]] = None
    texts: Optional[Sequence[str]] = None
    seed: Optional[int] = None  # reported back (the loss has no randomness); None: a fresh one


def pad_rows(rows: list[list[int]], value: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths → (B, T) tensor and its 0/1 mask.

    Prompts are left-padded so every row's next token is at the end: with the KV cache the
    padding keys are masked, and rotary attention depends only on relative positions, so a
    padded row decodes as it would alone. Training/evaluation batches are right-padded.
    """
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


# Seeds the server draws are below 2^53: exact in every client's numbers (a JavaScript number, JSON.parse in a
# browser), so a reply's seed can be sent back as it was read (the page's images had shown two seeds above 2^53 as
# one rounded number). A client may still send any seed below 2^63.
DRAWN_SEED_BITS = 53


def new_seed() -> int:
    return secrets.randbits(DRAWN_SEED_BITS)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator seeded ``seed`` (0 ≤ seed < 2^63). torch's CPU generator (mt19937) keeps only a seed's low 32
    bits, so seeds that differ above them would draw the same numbers there (1 and 1 + 2^32 gave one robot's chunk
    twice); on the CPU a seed of 2^32 or more is first folded into 32 bits through splitmix64, so every bit counts.
    Seeds below 2^32 are used as they are (their draws are what they were). CUDA's generator takes all 64 bits."""
    if torch.device(device).type == "cpu" and seed >= 2**32:
        seed = _splitmix64(seed) >> 32
    return torch.Generator(device=device).manual_seed(seed)


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea and Flood 2014): a 64-bit integer mixed so that every input bit
    moves about half the output bits."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


# on_text(row, text_delta (None without a tokenizer), token_ids_delta, finish_reason or None)
OnText = Callable[[int, Optional[str], list[int], Optional[str]], None]


class CompletionTracker:
    """Per row of a batch: when it finished (eos or a stop string), its final completion, and — when
    streaming — what has been sent so far.

    ``update`` is the ``stopping`` callback of ``generate``: it runs once per step with the new ids of
    its rows (``append`` takes the step's one new id per row, as continuous batching gives them). Only
    text that can no longer change is streamed, so that a stream's deltas add up to exactly the text the
    request gets without streaming (``finish``, which decodes the completion whole): an incomplete UTF-8
    sequence at the end (decoded as U+FFFD), a run of byte tokens that may go on (a sentencepiece tokenizer's
    ``byte_fallback``: one more byte can turn the whole run into U+FFFDs), any tail that could still grow into a
    stop string, and any
    tail that a tokenizer's clean-up of spaces may still rewrite (" '" becomes "'" once an "m" follows)
    are held back.

    Text is decoded incrementally, as vLLM and TGI do: each step decodes only a short window (the
    tokens since the last settled text, with the few before them for context, since a token's text
    can depend on its neighbours, e.g. a leading space), and stop strings are looked for only in the
    new text and the stop strings' length before it. A row's cost per step is then independent of
    its length (the whole completion was re-decoded and re-searched every step before: O(n²)). The
    final completion is decoded whole, once. A tokenizer that cleans up spaces across tokens (WordPiece's,
    and any with ``clean_up_tokenization_spaces``) has its windows decoded without the clean-up, which
    ``SpaceCleanup`` then applies to the row's text as it grows, with the same cost per step.
    """

    def __init__(self, n_rows: int, tokenizer: Any, end_ids: frozenset, stop: Sequence[str],
                 on_text: Optional[OnText]):
        # end_ids: every id that ends a completion (eos, and an HF model's end-of-turn ids); never shown.
        self.tokenizer, self.end_ids, self.stop, self.on_text = tokenizer, end_ids, list(stop), on_text
        self.kept: list[Optional[int]] = [None] * n_rows  # tokens to keep once finished (eos included)
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]  # every row's new ids so far
        self.sent_text = [0] * n_rows
        self.sent_tokens = [0] * n_rows
        # Incremental decoding, per row: the settled text (in ``cleanups`` instead where the tokenizer cleans up
        # spaces), the token offsets of its decode window (prefix: where the window starts, read: where the text
        # not yet settled starts), and how far stop strings have been looked for.
        self.text = [""] * n_rows
        self.offsets = [(0, 0)] * n_rows
        self.searched = [0] * n_rows
        # How much of the row's text (as ``_settle`` last gave it) can no longer change: only that much is streamed.
        self.stable = [0] * n_rows
        self.cut: list[Optional[int]] = [None] * n_rows  # where the first stop string starts in the text
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._special = skipped_ids(tokenizer) if tokenizer is not None else frozenset()  # (decoding skips them)
        self._byte_ids = byte_fallback_ids(tokenizer) if tokenizer is not None else frozenset()
        self._decode_options: dict[str, Any] = {"skip_special_tokens": True}
        # A tokenizer that cleans up spaces (" 's" → "'s") rewrites text across tokens, so a window's text would not
        # be the text's tail, and text already streamed could change: its windows are decoded without the clean-up,
        # and each row's text is cleaned up as it grows (``SpaceCleanup``), holding back what may still change.
        self.cleanups: list[Optional[SpaceCleanup]] = [None] * n_rows
        # Once a window's text fails to extend the text before it (the decoder rewrote text across the window's
        # start), or from the start for a tokenizer that cleans up spaces some other way than transformers does, rows
        # are decoded whole every step (O(n) per step) and stream no more text until their end (``finish``): such a
        # decoder may rewrite any text, which must not have been sent.
        self.whole = False
        if tokenizer is not None and decode_cleans_up(tokenizer):
            if cleans_up_as_transformers(tokenizer):
                self._decode_options["clean_up_tokenization_spaces"] = False
                self.cleanups = [SpaceCleanup() for _ in range(n_rows)]
            else:
                self.whole = True

    def _text(self, tokens: list[int]) -> tuple[str, bool]:
        """The visible text of ``tokens`` (eos dropped, cut at the first stop string), decoded whole, and whether
        it was cut."""
        if tokens and tokens[-1] in self.end_ids:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.index(s) for s in self.stop if s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def _settle(self, row: int) -> str:
        """The row's text after its newest token, as ``decode(tokens).rstrip("\ufffd")`` would give it (eos left out);
        records how much of it can no longer change in ``stable``. The window's text is committed once it decodes
        without a trailing incomplete character; until then its complete part is shown after the committed text."""
        tokens = self.tokens[row]
        visible = len(tokens) - 1 if tokens and tokens[-1] in self.end_ids else len(tokens)
        if self.whole:
            self.stable[row] = self.sent_text[row]  # nothing more is streamed (the decoder may rewrite any of it)
            return self.tokenizer.decode(tokens[:visible], skip_special_tokens=True).rstrip("\ufffd")
        prefix, read = self.offsets[row]
        committed, shown = "", ""  # new text that is committed now, and the complete part of text that is not yet
        # The window ends in a run of byte tokens (``byte_fallback_ids``) that may go on: the run's text may still
        # turn into U+FFFDs, so it is shown but neither committed nor stable. (Windows then always start after a
        # token that is no byte, so a window never splits a run that the whole text decodes as one.)
        open_run = False
        if visible > read:
            before = self.tokenizer.decode(tokens[prefix:read], **self._decode_options)
            window = self.tokenizer.decode(tokens[prefix:visible], **self._decode_options)
            if not window.startswith(before):  # the decoder rewrote text across the window's start: decode whole
                self.whole = True
                return self._settle(row)
            # (the newest token that shows: a skipped special token between two bytes does not end their run, which
            # the decoder joins across it)
            open_run = next((t for t in reversed(tokens[read:visible]) if t not in self._special), None) \
                in self._byte_ids
            if not window.endswith("\ufffd") and not open_run:
                committed = window[len(before):]
                # The next window starts where this one's new tokens did (a clean boundary), unless they were all
                # skipped special tokens: a window must start with a token that shows, since a decoder may drop the
                # leading space of the first token it shows (sentencepiece's ▁).
                shows = any(t not in self._special for t in tokens[read:visible])
                self.offsets[row] = (read if shows else prefix, visible)
            else:
                shown = window[len(before):].rstrip("\ufffd")
        cleanup = self.cleanups[row]
        if cleanup is None:
            self.text[row] += committed
            text = self.text[row] + shown
            # (a window's complete characters do not change, unless a byte run may rewrite them)
            self.stable[row] = len(self.text[row]) if open_run else len(text)
            return text
        if committed:
            cleanup.feed(committed)
        self.stable[row] = len(cleanup.done)  # the rest may still be rewritten by text to come
        return cleanup.text(shown)

    def _find_stop(self, row: int, text: str) -> None:
        """Where the first stop string starts in ``text`` (the row's settled text), looking only at what is new since
        the last look (and the longest stop string's length before it, where a stop string may have begun)."""
        start = 0 if self.whole else max(0, self.searched[row] - self._longest_stop + 1)
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.cut[row] = min(found)
        self.searched[row] = self.stable[row]  # (text after it may still change, and is looked at again)

    def update(self, rows: range, new_ids: torch.Tensor) -> torch.Tensor:
        """``generate``'s stopping callback: ``new_ids`` (B, n), every row's new ids so far; rows done → (B,) bool."""
        return torch.tensor(self.append(rows, new_ids[:, -1].tolist()))

    def append(self, rows: range, last: list[int]) -> list[bool]:
        """Each row's newest id (one per row of ``rows``); whether each row is done."""
        streams = self.tokenizer is not None and bool(self.stop or self.on_text)
        for i, row in enumerate(rows):
            self.tokens[row].append(last[i])
            if self.kept[row] is not None:
                continue
            n = len(self.tokens[row])
            if last[i] in self.end_ids:
                self.kept[row] = n
            text = None
            if streams:
                text = self._settle(row)
                if self.stop and self.cut[row] is None:
                    self._find_stop(row, text)
                if self.cut[row] is not None:
                    self.kept[row] = n
            if self.on_text is not None and self.kept[row] is None:
                self._send(row, self.tokens[row], text, final=False)
        return [self.kept[row] is not None for row in rows]

    def _send(self, row: int, tokens: list[int], text: Optional[str], final: bool,
              finish_reason: Optional[str] = None) -> None:
        safe = len(text) if text is not None else 0
        if text is not None and not final:  # (a trailing incomplete character is already left out)
            safe = min(safe, self.stable[row])  # and so is text that may still change
            # The longest tail that is a prefix of a stop string stays back. Such a tail lies in the text not sent
            # yet (a prefix reaching into sent text would have been held back then), so a step costs the length of
            # that text, not of the whole text (a long stop string would otherwise make streaming quadratic).
            for s in self.stop:
                for k in range(min(len(s) - 1, safe - self.sent_text[row]), 0, -1):
                    if text.endswith(s[:k], 0, safe):
                        safe -= k
                        break
        visible = tokens if final else (tokens[:-1] if tokens and tokens[-1] in self.end_ids else tokens)
        token_delta = visible[self.sent_tokens[row]:]
        text_delta = text[self.sent_text[row]:safe] if text is not None else None
        if token_delta or text_delta or finish_reason:
            self.on_text(row, text_delta, token_delta, finish_reason)
        self.sent_tokens[row] += len(token_delta)
        self.sent_text[row] = max(self.sent_text[row], safe)

    def set_tokens(self, row: int, tokens: list[int]) -> None:
        self.tokens[row] = tokens

    def finish(self) -> list[Completion]:
        """The completions (stop strings cut, eos dropped); streams each row's remainder and finish reason."""
        completions = []
        for row, tokens in enumerate(self.tokens):
            finished = self.kept[row] is not None
            tokens = tokens[:self.kept[row]] if finished else tokens
            if finished and tokens and tokens[-1] in self.end_ids:
                tokens = tokens[:-1]
            text, cut = self._text(tokens) if self.tokenizer is not None else (None, False)  # whole, once
            # (a row that ran out of tokens is cut here too when its whole text shows a stop string its steps could
            # not: one ending in U+FFFD, which a step's text leaves out as a character still incomplete)
            completion = Completion(text, tokens, "stop" if finished or cut else "length")
            if self.on_text is not None:
                self._send(row, tokens, text, final=True, finish_reason=completion.finish_reason)
            completions.append(completion)
        return completions


@register_pipeline("text")
class TextPipeline(Pipeline):
    def __init__(self, model, tokenizer: Any = None, tokenizer_source: Optional[str] = None,
                 z_loss_coefficient: float = 0.0, cuda_graphs: bool = True, traced_steps: bool = True):
        super().__init__(model)
        # Decode from captured CUDA graphs on GPUs, where the model supports it.
        self.cuda_graphs = cuda_graphs and getattr(model, "supports_cuda_graph", False)
        # A continuous batch's decode steps replay from captured graphs (models/slot_graphs.py: CUDA graphs on
        # CUDA, a TorchScript trace on the CPU), where the model's decoder has them.
        self.slot_graphs = cuda_graphs if self.device.type == "cuda" else traced_steps
        self.tokenizer = tokenizer
        self.tokenizer_source = tokenizer_source
        self._front_tokenizer: Any = None  # prompt_ids' copy, made on first use
        self._front_lock = threading.Lock()
        self.batch_handler = create_batch_handler(model.params.type, z_loss_coefficient=z_loss_coefficient)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.eos_token_id: Optional[int] = eos
        # HF chat models often end a turn with their own token (<end_of_turn>, <|eot_id|>, ...): the model's
        # generation config names them.
        self.end_ids = frozenset(({eos} | set(getattr(model, "end_token_ids", ()))) - {None})
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id: int = pad if pad is not None else (eos if eos is not None else 0)

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, *, tokenizer: Optional[str] = None,
                        training_config: Optional[dict] = None, cuda_graphs: bool = True,
                        traced_sampling: bool = True, **_: Any) -> "TextPipeline":
        tok, source = load_tokenizer(experiment_dir, tokenizer, training_config,
                                     model_default=getattr(model, "tokenizer_source", None))
        # Evaluate with the loss the run trained on (hparams.z_loss_coefficient).
        z_loss = float(((training_config or {}).get("hparams") or {}).get("z_loss_coefficient") or 0.0)
        return cls(model, tok, source, z_loss_coefficient=z_loss, cuda_graphs=cuda_graphs,
                   traced_steps=traced_sampling)

    # ------------------------------------------------------------------ discovery

    def io(self) -> dict[str, Any]:
        defaults = SamplingParams()
        return {
            "vocab_size": self.model.vocab_size,
            "max_seq_len": self.model.max_seq_len,
            "tokenizer": self.tokenizer_source,
            "accepts": ["prompt", "prompt_token_ids"] if self.tokenizer is not None else ["prompt_token_ids"],
            "chat": bool(getattr(self.tokenizer, "chat_template", None)),  # /v1/chat/completions takes it
            "eos_token_id": self.eos_token_id, "end_token_ids": sorted(self.end_ids),
            "defaults": {"max_new_tokens": defaults.max_new_tokens, "temperature": defaults.temperature,
                         "top_k": defaults.top_k, "top_p": defaults.top_p},
        }

    def warmup(self, max_batch_size: int = 1) -> None:
        self.complete(prompt_token_ids=[[0]], sampling=SamplingParams(max_new_tokens=2, temperature=0.0), seed=0)

    # ------------------------------------------------------------------ inputs

    def encode_prompts(self, prompts: Optional[Sequence[str]], prompt_token_ids: Optional[Sequence[Sequence[int]]],
                       *, prompt_field: str = "prompt", ids_field: str = "prompt_token_ids",
                       rendered: bool = False, tokenizer: Any = None) -> list[list[int]]:
        """Token id rows. Plain text gets the tokenizer's special tokens (e.g. a Llama's bos), as HF models
        expect; ``rendered`` text (through a chat template, which writes them itself) gets none. ``tokenizer``:
        a copy of the pipeline's to encode with (``prompt_ids``)."""
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidInputError(f"give exactly one of `{prompt_field}` or `{ids_field}`", field=prompt_field)
        if prompts is not None:
            if len(prompts) == 0:
                raise InvalidInputError(f"`{prompt_field}` is an empty list; send at least one prompt",
                                        field=prompt_field)
            if self.tokenizer is None:
                raise InvalidInputError(
                    f"this deployment has no tokenizer, so it takes token ids only: send `{ids_field}` "
                    f"(ints in [0, {self.model.vocab_size})) instead of `{prompt_field}`", field=prompt_field)
            for i, p in enumerate(prompts):
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InvalidInputError(f"{prompt_field}[{i}] is not valid Unicode text ({e.reason} at "
                                            f"position {e.start})", field=prompt_field) from None
            ids = [(tokenizer or self.tokenizer).encode(p, add_special_tokens=not rendered) for p in prompts]
            field_name = prompt_field
        else:
            ids = [list(map(int, row)) for row in prompt_token_ids]
            field_name = ids_field
        if len(ids) == 0:
            raise InvalidInputError(f"`{field_name}` is empty; send at least one prompt", field=field_name)
        vocab = self.model.vocab_size
        for i, row in enumerate(ids):
            if len(row) == 0:
                raise InvalidInputError(f"{field_name}[{i}] is empty (no tokens); every prompt needs at least one",
                                        field=field_name)
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise InvalidInputError(f"{field_name}[{i}] has token ids outside [0, {vocab}): {bad[:5]}",
                                        field=field_name)
        return ids

    def prompt_ids(self, prompts: Optional[Sequence[str]] = None,
                   prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, *, sampling: SamplingParams,
                   rendered: bool = False) -> list[list[int]]:
        """The token rows ``complete`` would run for these prompts, after refusing what it would refuse for their
        text and length: for a server to call before a request queues, off the model thread, and to pass on as
        ``prompt_token_ids`` (the same rows). It tokenizes with a copy of the tokenizer that nothing else uses
        (a fast tokenizer must not be used while another thread changes its padding, as an HF processor does),
        so a long prompt holds up neither the model thread nor the tokenizer it uses."""
        with self._front_lock:
            if self._front_tokenizer is None and self.tokenizer is not None:
                front = copy.deepcopy(self.tokenizer)
                # Padding and truncation off now (an HF processor may have left the original padding): encoding
                # then never changes the copy's settings, which several threads at once must not do.
                backend = getattr(front, "_tokenizer", None)
                if backend is not None:
                    backend.no_padding()
                    backend.no_truncation()
                self._front_tokenizer = front
        ids = self.encode_prompts(prompts, prompt_token_ids, rendered=rendered, tokenizer=self._front_tokenizer)
        self.fitted(ids, sampling)
        return ids

    # ------------------------------------------------------------------ predict

    def render_chat(self, messages: list[dict]) -> str:
        """A conversation as prompt text, through the tokenizer's chat template (generation prompt added)."""
        return render_with_template(self.tokenizer, messages)

    @torch.inference_mode()
    def complete(self, prompts: Optional[Sequence[str]] = None,
                 prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                 *, sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = (), seed: Optional[int] = None,
                 use_cache: bool = True, on_text: Optional[OnText] = None, rendered: bool = False) -> CompletionResult:
        """Complete each prompt. ``on_text(row, text_delta, token_ids_delta, finish_reason)`` streams the
        completions as they grow (text that could still become a stop string is held back). ``rendered``:
        the prompts come from ``render_chat``."""
        ids = self.encode_prompts(prompts, prompt_token_ids, rendered=rendered)
        return self.generate_completions(ids, {}, sampling=sampling, stop=stop, seed=seed, use_cache=use_cache,
                                         on_text=on_text)

    def fitted(self, ids: list[list[int]], sampling: SamplingParams) -> SamplingParams:
        """``sampling`` for these prompts: ``max_new_tokens`` cut to the context left when ``fit_context`` asks
        for it; a prompt that with ``max_new_tokens`` does not fit ``max_seq_len`` → ``InvalidInputError``."""
        longest = max(len(r) for r in ids)
        if longest >= self.model.max_seq_len:  # the prompt alone leaves no room
            raise InvalidInputError(f"the prompt is {longest} tokens, and this model's context (max_seq_len) is "
                                    f"{self.model.max_seq_len}: no room for a completion; shorten the prompt",
                                    field="prompt")
        if sampling.fit_context:
            sampling = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens,
                                                                         self.model.max_seq_len - longest))
        if longest + sampling.max_new_tokens > self.model.max_seq_len:
            raise InvalidInputError(
                f"prompt length ({longest}) + max_new_tokens ({sampling.max_new_tokens}) exceeds this model's "
                f"max_seq_len ({self.model.max_seq_len}); shorten the prompt or ask for fewer tokens",
                field="max_new_tokens")
        return sampling

    def generate_completions(self, ids: list[list[int]], model_inputs: dict[str, torch.Tensor], *,
                             sampling: SamplingParams, stop: Sequence[str], seed: Optional[int], use_cache: bool,
                             on_text: Optional[OnText] = None,
                             inputs_of_row: Optional[Callable[[int], dict[str, torch.Tensor]]] = None
                             ) -> CompletionResult:
        """Generate from token-id prompts; ``model_inputs`` (batch-first tensors, e.g. images) go to
        ``generate`` alongside. ``inputs_of_row(i)``: row i's own inputs, where rows of different lengths must run
        apart (the inputs cannot be padded together)."""
        sampling, seed = self._checked(ids, sampling, stop, seed)
        generator = make_generator(self.device, seed)
        tracker = CompletionTracker(len(ids), self.tokenizer, self.end_ids, stop, on_text)
        alike = len({len(r) for r in ids}) == 1
        if alike or (inputs_of_row is None and (
                use_cache or getattr(self.model, "masks_padding_without_cache", False))):
            self._generate(ids, model_inputs, range(len(ids)), sampling, use_cache, generator, tracker)
        else:
            # Without the cache our causal transformer ignores the padding mask (VLA Foundry's B3), so
            # prompts of different lengths are generated one at a time to stay correct; so are those whose
            # inputs cannot be padded together.
            for i, prompt in enumerate(ids):
                row_inputs = inputs_of_row(i) if inputs_of_row else {k: v[i:i + 1] for k, v in model_inputs.items()}
                self._generate([prompt], row_inputs, range(i, i + 1), sampling, use_cache, generator, tracker)
        return self._result(ids, tracker, seed)

    def _checked(self, ids: list[list[int]], sampling: SamplingParams, stop: Sequence[str],
                 seed: Optional[int]) -> tuple[SamplingParams, int]:
        """The sampling settings these prompts get (``fitted``) and the seed, after refusing what cannot run."""
        if sampling.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1; got {sampling.max_new_tokens}",
                                    field="max_new_tokens")
        sampling = self.fitted(ids, sampling)
        if stop and self.tokenizer is None:
            raise InvalidInputError("stop strings need a tokenizer; this deployment has none", field="stop")
        if any(not s for s in stop):
            raise InvalidInputError("stop strings must be non-empty", field="stop")
        return sampling, (new_seed() if seed is None else seed)

    def _result(self, ids: list[list[int]], tracker: "CompletionTracker", seed: int) -> CompletionResult:
        completions = tracker.finish()
        return CompletionResult(completions, prompt_tokens=sum(len(r) for r in ids),
                                completion_tokens=sum(len(c.token_ids) for c in completions), seed=seed,
                                prompt_token_ids=ids)

    # ------------------------------------------------------------------ continuous batching (continuous.py)

    @property
    def decodes_continuously(self) -> bool:
        """Whether this model's sequences can join a running batch (it decodes in a continuous batcher's slots)."""
        return hasattr(self.model, "slot_bytes") and self.model.slot_bytes() is not None

    def continuous_batcher(self, max_sequences: int, max_cache_bytes: Optional[int] = None,
                           prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
                           graphs: Optional[bool] = None) -> Optional[ContinuousBatcher]:
        """A batcher that decodes up to ``max_sequences`` sequences of many requests together (fewer when their
        cache would pass ``max_cache_bytes``); None when this model cannot join a running batch (it has no
        slots, see ``ContinuousBatcher``: requests then run one at a time). ``graphs``: its decode steps replay from
        captured graphs (default: as this pipeline was loaded, ``cuda_graphs`` on CUDA, ``traced_sampling`` on the
        CPU)."""
        if not self.decodes_continuously:
            return None
        slots = ContinuousBatcher.slots_within(self.model, max_sequences, max_cache_bytes)
        if slots is None:
            return None
        if slots < 1:
            raise ValueError(f"one sequence's cache ({self.model.slot_bytes()} bytes) does not fit in "
                             f"{max_cache_bytes} bytes (VLA_KV_CACHE_MB); allow more, or serve this model without "
                             "continuous batching")
        return ContinuousBatcher(self.model, slots, prefill_tokens, self.device,
                                 graphs=self.slot_graphs if graphs is None else graphs, max_cache_bytes=max_cache_bytes)

    def start_completion(self, prompts: Optional[Sequence[str]] = None,
                         prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, *,
                         sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
                         seed: Optional[int] = None, on_text: Optional[OnText] = None,
                         rendered: bool = False) -> Generation:
        """``complete``'s generation (with the cache), checked and ready for a ``ContinuousBatcher``: the same
        tokens, finish reasons and streamed text as ``complete`` gives."""
        ids = self.encode_prompts(prompts, prompt_token_ids, rendered=rendered)
        return self.start_generation(ids, {}, sampling=sampling, stop=stop, seed=seed, on_text=on_text)

    def start_generation(self, ids: list[list[int]], model_inputs: dict[str, torch.Tensor], *,
                         sampling: SamplingParams, stop: Sequence[str], seed: Optional[int],
                         on_text: Optional[OnText] = None, rows_alike: bool = True) -> Generation:
        """A ``Generation`` of ``ids`` with ``model_inputs`` (a caption's image inputs, batched over the rows).
        ``rows_alike``: every row has as many images (so inputs of one entry per row slice one row each)."""
        sampling, seed = self._checked(ids, sampling, stop, seed)
        tracker = CompletionTracker(len(ids), self.tokenizer, self.end_ids, stop, on_text)
        raw_inputs, model_inputs = model_inputs, {k: self.batch_handler.to_model(self.model, v)
                                                  for k, v in model_inputs.items()}
        rows = range(len(ids))

        @torch.inference_mode()
        def alone() -> CompletionResult:
            return self.generate_completions(ids, raw_inputs, sampling=sampling, stop=stop, seed=seed, use_cache=True,
                                             on_text=on_text)

        def finish(new_tokens: list[list[int]]) -> CompletionResult:
            for row, tokens in zip(rows, new_tokens):
                tracker.set_tokens(row, tokens)
            return self._result(ids, tracker, seed)

        # Each row is prefilled apart with its slice of the extra inputs, which needs them laid out one per row;
        # some HF processors lay out images one per image or per patch instead (LLaVA with two images in a row).
        per_row = rows_alike and all(v.shape[0] == len(ids) for v in model_inputs.values())
        return Generation(ids, [{k: v[i:i + 1] for k, v in model_inputs.items()} for i in rows] if per_row else [],
                          sampling, make_generator(self.device, seed), lambda last: tracker.append(rows, last), finish,
                          alone, shares_steps=per_row)

    def _generate(self, ids: list[list[int]], model_inputs: dict[str, torch.Tensor], rows: range,
                  sampling: SamplingParams, use_cache: bool, generator: torch.Generator,
                  tracker: "CompletionTracker") -> None:
        input_ids, mask = (t.to(self.device) for t in pad_rows(ids, self.pad_token_id, left=True))
        model_inputs = {k: self.batch_handler.to_model(self.model, v) for k, v in model_inputs.items()}
        generated = self.model.generate(
            input_ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, eos_token_id=None,
            use_cache=use_cache, generator=generator, stopping=lambda new_ids: tracker.update(rows, new_ids),
            **model_inputs, **({"cuda_graph": True} if self.cuda_graphs and self.device.type == "cuda" else {}))
        for row, tokens in zip(rows, generated[:, input_ids.shape[1]:].tolist()):
            tracker.set_tokens(row, tokens)

    # ------------------------------------------------------------------ evaluate

    @torch.inference_mode()
    def evaluate(self, input_ids: Optional[Sequence[Sequence[int]]] = None,
                 attention_mask: Optional[Sequence[Sequence[int]]] = None, texts: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> dict[str, Any]:
        """The batch handler's loss for token ids (rows may differ in length) or texts."""
        (out,) = self.evaluate_each([TextEvaluation(input_ids, attention_mask, texts, seed)])
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def evaluate_each(self, evaluations: Sequence["TextEvaluation"]) -> list[Union[dict[str, Any], Exception]]:
        """Several clients' evaluations in one forward pass (their rows right-padded together); each gets what
        ``evaluate`` gives it alone (up to float rounding of the batched kernels), or its own
        ``InvalidInputError``."""
        rows: list = []
        for e in evaluations:
            try:
                rows.append(self._evaluation_rows(e))
            except InvalidInputError as error:
                rows.append(error)
        ready = [r for r in rows if not isinstance(r, Exception)]
        if not ready:
            return rows
        ids = [row for r in ready for row in r[0]]
        masks = [row for r in ready for row in r[1]]
        batch_ids, _ = pad_rows(ids, self.pad_token_id)
        mask = pad_rows(masks, 0)[0]
        outs = iter(self.batch_handler.compute_loss_each(self.model, {"input_ids": batch_ids, "attention_mask": mask},
                                                         [len(r[0]) for r in ready]))
        results: list = []
        for r, e in zip(rows, evaluations):
            if isinstance(r, Exception):
                results.append(r)
                continue
            out = next(outs)
            if isinstance(out, Exception):
                results.append(InvalidInputError(f"{out}", field="attention_mask"))
                continue
            results.append({**out.to_dict(), "seed": new_seed() if e.seed is None else e.seed})
        return results

    def _evaluation_rows(self, e: "TextEvaluation") -> tuple[list[list[int]], list[list[int]]]:
        """One evaluation's token rows and their attention rows (checked; errors name the request's field)."""
        ids = self.encode_prompts(e.texts, e.input_ids, prompt_field="texts", ids_field="input_ids")
        field = "input_ids" if e.input_ids is not None else "texts"
        if any(len(r) < 2 for r in ids):
            raise InvalidInputError("every sequence needs at least 2 tokens to score a next-token loss", field=field)
        longest = max(len(r) for r in ids)
        if longest > self.model.max_seq_len + 1:
            raise InvalidInputError(f"sequences are limited to max_seq_len + 1 = {self.model.max_seq_len + 1} "
                                    f"tokens; got {longest}", field=field)
        if e.attention_mask is None:
            return ids, [[1] * len(r) for r in ids]
        if e.texts is not None:
            raise InvalidInputError("attention_mask goes with input_ids, not texts", field="attention_mask")
        masks = [[int(v) for v in r] for r in e.attention_mask]
        if [len(r) for r in masks] != [len(r) for r in ids]:
            raise InvalidInputError("attention_mask must have the same shape as input_ids", field="attention_mask")
        if any(v not in (0, 1) for r in masks for v in r):
            raise InvalidInputError("attention_mask values must be 0 or 1", field="attention_mask")
        if not any(v for r in masks for v in r[1:]):
            raise InvalidInputError("attention_mask leaves no token to predict (positions after the first "
                                    "must include at least one 1)", field="attention_mask")
        return ids, masks
