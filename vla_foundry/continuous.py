"""Continuous batching: many requests' sequences decoded together, joining and leaving between steps.

A deployment's model thread calls :meth:`ContinuousBatcher.step` while any generation is running or
waiting. Each step:

1. drops generations whose client has gone (their slots are free at once), and packs the running
   sequences into the lowest slots (the one in the highest slot moves into a gap, so a step reads slots
   0…B−1 as one view of the cache);
2. admits waiting generations, oldest first, while their sequences fit in free slots and the step's
   prefill budget (``prefill_tokens`` prompt tokens) lasts: each prompt is prefilled alone, exactly
   as a solo run prefills it, its cache copied into its slot (``models/kv_slots.py``), and the
   generation samples its first tokens;
3. runs one decode step for every running sequence (one new token each, each at its own position; replayed
   from a captured graph where the decoder has one, ``models/slot_graphs.py``) and lets each generation
   sample its next tokens from its own rows with its own generator (on CPU the rows of generations with the
   same sampling settings share one top-k/top-p/softmax call and one draw, ``sampling.draw_groups``); where
   the steps replay from a graph (CUDA graphs, or the CPU's trace), a one-row generation that starts alone
   replays the one-row graph from its slot at once, since that costs less than an eager step (on an H200, 24
   layers of width 2048 in bfloat16 decoded 85 tokens/s eagerly against 389 from a graph,
   ``bench/generate.py``; on a 2-core CPU with one torch thread the demo transformer's step of one took 0.69
   ms from the trace against 0.94 ms eagerly, ``bench/decode_steps.py``); where the steps are eager, it
   keeps its prompt's cache and steps on it the solo way (``step_alone``: nothing to gather), moving into
   its slot for good when another sequence joins;
4. finishes generations that are done (every row ended by eos or a stop string, or
   ``max_new_tokens`` reached): their result is handed to ``on_done`` and their slots freed. A row of
   a generation of several (a request's prompts, or ``n`` choices) that ends before the others frees
   its slot at once and is decoded no more.

A generation draws from its own ``torch.Generator`` over exactly the rows and shapes a solo run draws
from, so its tokens are the ones it gets alone (up to the float rounding of batched kernels, which
does not change a token in practice; the tests compare tokens). A solo run goes on drawing for its
ended rows until the last one ends; a draw fills a tensor of exponential variates shaped like the
rows' probabilities, whatever they are, so an ended row here takes a stand-in row of probabilities
in the draw, and the generator moves on exactly as alone. Its tokens from then on are thrown away,
as the solo run's are.

The model is a :class:`SlotModel` and its decoder a :class:`SlotDecoding` (``models/kv_slots.py`` for our models,
``models/hf_slots.py`` for Hugging Face ones).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from vla_foundry.errors import InvalidInputError
from vla_foundry.sampling import (INVALID_PROBABILITIES, MIN_TEMPERATURE, SamplingParams, draw_groups,
                                  token_distribution)

DEFAULT_PREFILL_TOKENS = 512  # prompt tokens prefilled between two decode steps (VLA_PREFILL_TOKENS_PER_STEP)


class SlotDecoding(Protocol):
    """Decode steps for sequences kept in ``num_slots`` slots of a preallocated cache of ``nbytes``."""

    num_slots: int

    @property
    def nbytes(self) -> int: ...

    @property
    def mode(self) -> str:
        """How decode steps run: ``eager``, ``traced`` (CPU) or ``cuda_graph``."""

    def warmup(self) -> None:
        """Capture what decode steps replay from now, instead of at their first use."""

    def store_prompt(self, slot: int, present: Any) -> None:
        """A prefilled prompt's cache (what ``SlotModel.prefill`` returned) into ``slot``."""

    def move(self, src: int, dst: int, length: int) -> None:
        """The first ``length`` cached positions of slot ``src`` into slot ``dst``, whose later ones are zeroed."""

    def decode(self, last_ids: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per sequence, ``last_ids`` (B,), sequence b in ``slots[b]`` with ``positions[b]`` tokens
        cached: the next token's logits (B, V), valid until the next call (a graph's output is overwritten)."""


class SlotModel(Protocol):
    """What a model offers to decode in slots."""

    max_seq_len: int  # the context a slot holds

    def prefill(self, input_ids: torch.Tensor, **row_inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One prompt (1, T) exactly as a solo generation's first step runs it: next-token logits (1, V), its cache."""

    def step_alone(self, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One sequence's next token (1, 1) on its own cache (what ``prefill`` returned, grown by earlier calls), as a
        solo generation's later steps run it: logits (1, V) and the grown cache."""

    def slot_bytes(self) -> Optional[int]:
        """One sequence's cache memory (its full context); None when this model cannot decode in slots."""

    def slot_decoder(self, num_slots: int, graphs: bool = False) -> SlotDecoding:
        """The decoder of ``num_slots`` slots; ``graphs``: its steps replay from captured graphs where it can."""


@dataclass
class Generation:
    """One request's prompts, ready to decode: what a pipeline's ``start_*`` method makes."""

    ids: list[list[int]]  # the prompts' token ids
    row_inputs: list[dict[str, torch.Tensor]]  # per prompt, its extra prefill inputs (e.g. pixel_values), on device
    sampling: SamplingParams
    generator: torch.Generator
    stopping: Callable[[list[int]], list[bool]]  # each row's newest id → whether each row is done (streams text)
    finish: Callable[[list[list[int]]], Any]  # every row's new tokens → the request's result
    alone: Callable[[], Any]  # the same generation run by itself, the solo way (more rows than the batcher has slots)
    shares_steps: bool = True  # False: its rows cannot be prefilled apart (it runs ``alone``)


@dataclass(frozen=True)
class SlotOutlook:
    """A batcher's slots as a generation submitted now finds them."""

    short: int  # the sequences already waiting less the free slots (negative: slots to spare)
    ends: tuple[tuple[int, int], ...]  # per running generation (its decode steps left at most, its rows), soonest first
    step_seconds: float  # recent time of one step
    num_slots: int

    def wait_s(self, rows: int = 1) -> float:
        """About how long a generation of ``rows`` sequences would wait for slots: none when they are free (after
        the sequences already waiting; it joins at the next step) or when it has more rows than the batcher has
        slots (it runs by itself at once, ``ContinuousBatcher.submit``), else until enough running sequences could
        have ended, each after at most its ``max_new_tokens`` (an upper bound: eos may end one sooner)."""
        needed = self.short + rows
        if needed <= 0 or rows > self.num_slots:
            return 0.0
        freed = 0
        for steps, n in self.ends:
            freed += n
            if freed >= needed:
                return steps * self.step_seconds
        return (self.ends[-1][0] if self.ends else 0) * self.step_seconds  # (more than run now: a rough bound)


@dataclass(eq=False)  # compared by identity: two requests with the same prompts are still two
class _Running:
    generation: Generation
    on_done: Callable[[Any], None]  # the result, or the exception that ended it
    cancelled: Callable[[], bool]
    too_late: Callable[[], Optional[BaseException]]  # while waiting for a slot: why it may no longer start, or None
    slots: list[Optional[int]] = field(default_factory=list)  # per row; None once the row has ended (slot freed)
    new_tokens: list[list[int]] = field(default_factory=list)  # per row
    own_cache: Any = None  # a one-row generation's own cache, until it shares a step (then it is in its slot)

    @property
    def rows(self) -> int:
        return len(self.generation.ids)

    @property
    def held(self) -> list[tuple[int, int]]:
        """(row, slot) of each row still decoding."""
        return [(j, slot) for j, slot in enumerate(self.slots) if slot is not None]


class ContinuousBatcher:
    def __init__(self, model: SlotModel, num_slots: int, prefill_tokens: int, device: torch.device,
                 graphs: bool = False, max_cache_bytes: Optional[int] = None):
        self.model = model
        self.decoder = model.slot_decoder(num_slots, graphs)
        # What a generation that runs by itself may cache (``submit``): the part of the cap the slots do not take
        # (None: no cap), so the slots' cache and its own together stay within it.
        self.alone_bytes = None if max_cache_bytes is None else max(0, max_cache_bytes - self.decoder.nbytes)
        # ids the model's own generate never samples (vlm_hf: the image placeholder), masked out here alike
        self._never_sampled = torch.tensor(getattr(model, "never_sampled_ids", []), dtype=torch.long, device=device)
        self.prefill_tokens = prefill_tokens
        self.device = device
        # A heap: the lowest free slot first, so the running sequences stay packed at the low slots and a step
        # reads their caches as one slice instead of gathering them (kv_slots.SlotBatch).
        self._free = list(range(num_slots))
        # Tuples, replaced whole on every change (by the model thread only): the metrics read them from another
        # thread, and iterating a container that the model thread mutates meanwhile could fail.
        self._waiting: tuple[_Running, ...] = ()
        self._running: tuple[_Running, ...] = ()
        self._alone: Optional[Generation] = None  # a generation running by itself inside ``submit``, while it does
        self.step_seconds = 0.0  # recent time of one step (a moving average), for expected_wait_s

    @staticmethod
    def slots_within(model: SlotModel, num_slots: int, max_bytes: Optional[int]) -> Optional[int]:
        """How many slots fit in ``max_bytes`` of cache (at most ``num_slots``; 0 when not even one does); None
        when ``model`` cannot decode in slots."""
        per_slot = model.slot_bytes()
        if per_slot is None:
            return None
        return num_slots if max_bytes is None else min(num_slots, max_bytes // per_slot)

    # ------------------------------------------------------------------ the model thread's interface

    @property
    def num_slots(self) -> int:
        return self.decoder.num_slots

    @property
    def cache_bytes(self) -> int:
        return self.decoder.nbytes

    @property
    def decode_mode(self) -> str:
        """How batched decode steps run: ``eager``, ``traced`` (CPU) or ``cuda_graph``."""
        return self.decoder.mode

    @torch.inference_mode()
    def warmup(self) -> None:
        """Capture every decode step graph now (at load), so that no step waits for a capture while serving."""
        self.decoder.warmup()

    @property
    def active(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def running_sequences(self) -> int:
        return sum(rows for _, rows in self.rows_decoding())

    def rows_decoding(self) -> list[tuple[Generation, int]]:
        """Each running generation and how many of its rows decode now: its rows less those that have ended (one
        that runs by itself inside ``submit``: all its rows; one that waits, or has ended, is not listed)."""
        alone = self._alone
        return [(r.generation, sum(slot is not None for slot in r.slots)) for r in self._running] + (
            [(alone, len(alone.ids))] if alone is not None else [])

    @property
    def waiting_sequences(self) -> int:
        return sum(r.rows for r in self._waiting)

    def submit(self, generation: Generation, on_done: Callable[[Any], None],
               cancelled: Callable[[], bool] = lambda: False,
               too_late: Callable[[], Optional[BaseException]] = lambda: None) -> None:
        """Queue ``generation``; ``on_done`` gets its result (or the exception that ended it) from a later step.
        ``cancelled()`` true: its client has gone, and it is dropped (running or not, no ``on_done``); ``too_late()``
        an exception while it still waits for a slot (its deadline passed): it ends with it, unrun. A generation of
        more sequences than the batcher has slots, or one whose rows cannot be prefilled apart, runs by itself now,
        the solo way (it holds up the running ones for its length), with a cache of its own: one of more sequences
        than slots that would cache more than ``alone_bytes`` is refused (``InvalidInputError``)."""
        if len(generation.ids) > self.num_slots or not generation.shares_steps:
            if len(generation.ids) > self.num_slots and (refused := self._over_cache_cap(generation)) is not None:
                on_done(refused)
                return
            self._alone = generation  # (its rows count as running meanwhile)
            try:
                outcome = generation.alone()
            except Exception as e:  # its own failure
                outcome = e
            finally:
                self._alone = None
            on_done(outcome)
            return
        self._waiting += (_Running(generation, on_done, cancelled, too_late),)

    def _over_cache_cap(self, generation: Generation) -> Optional[InvalidInputError]:
        """Why ``generation`` may not run by itself: its rows, padded to the longest prompt as a solo run pads them,
        would cache more than ``alone_bytes`` by its last token (None: it fits)."""
        if self.alone_bytes is None:
            return None
        rows, longest = len(generation.ids), max(len(ids) for ids in generation.ids)
        per_token = self.model.slot_bytes() / self.model.max_seq_len  # (a slot holds one sequence's full context)
        fits = int(self.alone_bytes // per_token)  # tokens
        if rows * (longest + generation.sampling.max_new_tokens) <= fits:
            return None
        fix = f"ask for at most {fits // rows - longest} new tokens, or " if fits // rows > longest else ""
        return InvalidInputError(
            f"this request's {rows} sequences (prompts × choices) are more than the {self.num_slots} this deployment "
            f"decodes together, so they run by themselves, and would cache {rows} × ({longest} prompt + "
            f"{generation.sampling.max_new_tokens} new) tokens, more than its KV cache's cap leaves them ({fits} "
            f"tokens, VLA_KV_CACHE_MB); {fix}send fewer prompts or choices (up to {self.num_slots} always fit)",
            field="max_new_tokens" if fits // rows > longest else "prompt")

    def outlook(self) -> SlotOutlook:
        """How this batcher's slots look to a generation submitted now (what ``expected_wait_s`` reads; a model
        process sends it with each step report, so that the server estimates the wait of any number of rows)."""
        ends = sorted((r.generation.sampling.max_new_tokens - len(r.new_tokens[0] if r.new_tokens else ()),
                       len(r.held)) for r in self._running)
        return SlotOutlook(self.waiting_sequences - len(self._free), tuple(ends), self.step_seconds, self.num_slots)

    def expected_wait_s(self, rows: int = 1) -> float:
        """About how long a generation of ``rows`` sequences submitted now would wait for slots
        (``SlotOutlook.wait_s``)."""
        return self.outlook().wait_s(rows)

    @torch.inference_mode()
    def step(self, admitted: Optional[Callable[[], None]] = None) -> None:
        """One step (see the module's docstring). ``admitted()``, when given, is called after each admission whose
        prefill succeeded, once that generation's first tokens are sampled and before the next one is prefilled: a
        model process sends each one's first tokens on at once, instead of after the step's other prefills and its
        decode step."""
        started = time.perf_counter()
        self._drop_cancelled()
        self._pack()
        self._admit(admitted)
        if self._running:
            self._decode()
            took = time.perf_counter() - started
            self.step_seconds = took if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * took

    def fail_all(self, error: BaseException) -> None:
        """End every generation, running or waiting, with ``error`` (the step itself failed)."""
        for r in self._running + self._waiting:
            self._waiting = tuple(w for w in self._waiting if w is not r)
            self._end(r, error)

    # ------------------------------------------------------------------ the step's parts

    def _drop_cancelled(self) -> None:
        late = [(r, error) for r in self._waiting if not r.cancelled() for error in [r.too_late()] if error]
        self._waiting = tuple(r for r in self._waiting if not r.cancelled() and not any(r is x for x, _ in late))
        for r, error in late:
            r.on_done(error)
        for r in [r for r in self._running if r.cancelled()]:
            self._release(r)

    def _pack(self) -> None:
        """Moves the sequences of the highest slots into the lowest free ones, so the running sequences fill slots
        0…B−1 and a step reads them as a view (one copy of a sequence's cache when a lower one ended, instead of
        gathering every sequence's cache at every step while the gap stays). Between steps only: a step maps its
        rows by slot."""
        rows = sorted(((slot, r, j) for r in self._running for j, slot in r.held), key=lambda row: row[0],
                      reverse=True)
        for slot, r, j in rows:
            if not self._free or self._free[0] > slot:
                break
            lower = self._free[0]
            if r.own_cache is None:  # (a lone sequence still decodes from its own cache: its slot is empty yet)
                self.decoder.move(slot, lower, len(r.generation.ids[j]) + len(r.new_tokens[j]) - 1)
            heapq.heapreplace(self._free, slot)  # only once copied: a failed move leaves both records as they were
            r.slots[j] = lower

    def _admit(self, admitted: Optional[Callable[[], None]] = None) -> None:
        budget = self.prefill_tokens
        while self._waiting and len(self._free) >= self._waiting[0].rows:
            r = self._waiting[0]
            tokens = sum(len(ids) for ids in r.generation.ids)
            if tokens > budget and budget < self.prefill_tokens:  # the budget is spent: next step (a long prompt
                break  # still goes first in a step of its own)
            self._waiting = self._waiting[1:]
            budget -= tokens
            r.slots = [heapq.heappop(self._free) for _ in range(r.rows)]
            self._running += (r,)
            try:
                logits = torch.cat([self._prefill(r, slot, ids, inputs) for slot, ids, inputs
                                    in zip(r.slots, r.generation.ids, r.generation.row_inputs)])  # (n, V)
            except Exception as e:  # this request's inputs alone
                self._end(r, e)
                continue
            self._sample(r, logits)
            if admitted is not None:
                admitted()

    def _prefill(self, r: _Running, slot: int, ids: list[int], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, present = self.model.prefill(torch.tensor([ids], dtype=torch.long, device=self.device), **inputs)
        if r.rows == 1 and self.decoder.mode == "eager":  # (steps from a graph: its slot at once, see above)
            r.own_cache = present  # into its slot once it shares a step (_decode)
        else:
            self.decoder.store_prompt(slot, present)
        return logits

    def _decode(self) -> None:
        running = self._running
        if len(running) == 1 and running[0].own_cache is not None:  # a lone sequence: the solo way
            self._step_alone(running[0])
            return
        for r in running:  # sequences that decoded alone until now move into their slots
            if r.own_cache is not None:
                self.decoder.store_prompt(r.slots[0], r.own_cache)
                r.own_cache = None
        rows = sorted(((slot, r, j) for r in running for j, slot in r.held), key=lambda row: row[0])
        last = [r.new_tokens[j][-1] for _, r, j in rows]
        slots = [slot for slot, _, _ in rows]  # ascending: a packed run of slots is read as one slice
        positions = [len(r.generation.ids[j]) + len(r.new_tokens[j]) - 1 for _, r, j in rows]
        try:
            logits = self.decoder.decode(torch.tensor(last, dtype=torch.long, device=self.device), slots,
                                         positions)  # (B, V), in slot order
        except Exception as e:  # the whole step failed: no row can be told apart
            for r in running:
                self._end(r, e)
            return
        index = {slot: i for i, slot in enumerate(slots)}
        self._sample_together([(r, [None if slot is None else index[slot] for slot in r.slots]) for r in running],
                              logits)

    def _step_alone(self, r: _Running) -> None:
        try:
            logits, r.own_cache = self.model.step_alone(
                torch.tensor([[r.new_tokens[0][-1]]], dtype=torch.long, device=self.device), r.own_cache)
        except Exception as e:
            self._end(r, e)
            return
        self._sample(r, logits)

    def _sample(self, r: _Running, logits: torch.Tensor) -> None:
        """The generation's next token per row (its rows' logits (n, V)), from its own generator."""
        self._sample_together([(r, list(range(r.rows)))], logits)

    def _sample_together(self, rows: list[tuple[_Running, list[Optional[int]]]], logits: torch.Tensor) -> None:
        """Every running generation's next tokens from one decode step's logits (B, V), each generation's rows given
        by their indices (None: a row that has ended, decoded no more). On CPU, generations with the same sampling
        settings share one ``token_distribution`` (or argmax) over their rows, instead of a handful of small calls
        each, and one draw in which each generation's rows come from its own generator, as they come alone
        (``sampling.draw_groups``)."""
        logits = self._without_never_sampled(logits)
        # On CPU every row is sampled by the same code whatever the rows around it. CUDA's topk and sort choose
        # their algorithm by shape, so tied logits could come out of a group in another order than alone: there
        # each generation samples its own rows.
        shared = logits.device.type == "cpu"
        groups: dict[tuple, list[tuple[_Running, list[Optional[int]]]]] = {}
        for r, at in rows:
            s = r.generation.sampling
            settings = (0.0, 0, 1.0) if s.temperature < MIN_TEMPERATURE else (s.temperature, s.top_k, s.top_p)
            groups.setdefault(settings if shared else (*settings, id(r)), []).append((r, at))
        for (temperature, top_k, top_p, *_), members in groups.items():
            at_all = [i for _, at in members for i in at]
            decoding = [k for k, i in enumerate(at_all) if i is not None]  # the group's rows still decoding
            together = logits[[at_all[k] for k in decoding]]  # (G, V)
            greedy = temperature < MIN_TEMPERATURE
            try:
                if greedy:
                    picked, valid = together.argmax(dim=-1).tolist(), [True] * len(members)
                    picked = _with_ended_rows(picked, decoding, len(at_all))
                else:  # each member's rows from its own generator, in one pass (sampling.draw_groups)
                    probs, token_ids = _with_ended_rows_drawn(*token_distribution(together, temperature, top_k, top_p),
                                                              decoding, len(at_all))
                    tokens, valid = draw_groups(probs, token_ids, [(r.generation.generator, len(at))
                                                                   for r, at in members])
                    picked = tokens.tolist()
            except Exception as e:  # no row can be told apart
                for r, _ in members:
                    self._end(r, e)
                continue
            first = 0
            for k, (r, at) in enumerate(members):
                span = slice(first, first + len(at))
                first += len(at)
                if not valid[k]:  # its own probabilities were unfit (NaN, infinite, negative or all zero)
                    self._end(r, RuntimeError(INVALID_PROBABILITIES))
                    continue
                self._advance(r, picked[span])

    def _without_never_sampled(self, logits: torch.Tensor) -> torch.Tensor:
        if self._never_sampled.numel():
            return logits.index_fill(-1, self._never_sampled, float("-inf"))
        return logits

    def _advance(self, r: _Running, next_ids: list[int]) -> None:
        """Appends each row's next token; the generation ends when every row is done or its length is reached, and
        a row that is done before then frees its slot."""
        try:
            if not r.new_tokens:
                r.new_tokens = [[] for _ in range(r.rows)]
            for row, token in zip(r.new_tokens, next_ids):
                row.append(token)
            done = r.generation.stopping(next_ids)
            if all(done) or len(r.new_tokens[0]) >= r.generation.sampling.max_new_tokens:
                self._end(r, r.generation.finish(r.new_tokens))
                return
        except Exception as e:  # its stream's client went away, or its text could not be made
            self._end(r, e)
            return
        for j, slot in r.held:
            if done[j]:
                heapq.heappush(self._free, slot)
                r.slots[j] = None

    def _end(self, r: _Running, outcome: Any) -> None:
        self._release(r)
        r.on_done(outcome)

    def _release(self, r: _Running) -> None:
        if r in self._running:
            self._running = tuple(x for x in self._running if x is not r)
            for _, slot in r.held:
                heapq.heappush(self._free, slot)
            r.slots, r.own_cache = [], None


# An ended row's stand-in in a step's sampling: its token is thrown away (as a solo run throws away what it
# samples for a row after its end), and in a draw its stand-in probabilities take the generator's variates for
# that row, as the solo run's row would.
ENDED_ROW_TOKEN = 0


def _with_ended_rows(picked: list[int], decoding: list[int], rows: int) -> list[int]:
    """The decoding rows' tokens placed at their indices ``decoding`` among ``rows``, the others ENDED_ROW_TOKEN."""
    if len(decoding) == rows:
        return picked
    out = [ENDED_ROW_TOKEN] * rows
    for k, token in zip(decoding, picked):
        out[k] = token
    return out


def _with_ended_rows_drawn(probs: torch.Tensor, token_ids: Optional[torch.Tensor], decoding: list[int],
                           rows: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A ``token_distribution`` of the decoding rows (G, K) placed at their indices among ``rows``; each ended row
    a uniform stand-in (K probabilities), so that the draw fills every row's variates as the solo run's does."""
    if len(decoding) == rows:
        return probs, token_ids
    index = torch.tensor(decoding, dtype=torch.long, device=probs.device)
    full = probs.new_full((rows, probs.shape[1]), 1.0 / probs.shape[1]).index_copy_(0, index, probs)
    if token_ids is not None:
        token_ids = token_ids.new_full((rows, token_ids.shape[1]), ENDED_ROW_TOKEN).index_copy_(0, index, token_ids)
    return full, token_ids
