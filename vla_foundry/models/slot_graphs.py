"""Continuous batching's decode steps (``kv_slots.PackedSlotStep``) replayed from captured graphs.

Why. An eager decode step of our transformer is a few hundred small ops, and every torch op hands
the interpreter lock back and reacquires it; in a server the event loop takes the lock whenever it
has work (streaming the last step's tokens to eight clients), so the model thread waits for it at
every op. A captured step takes the lock once (``policy_graphs.py`` does the same for policies):

- on CPU, one TorchScript trace (``torch.jit.trace``) of the step serves every batch size and key
  length: the step reads its shapes from its inputs, so the trace records no number that a shape
  fixes and runs exactly the eager ops (the same logits, bit for bit). It is traced on a scratch
  cache on first use (or at warm-up) and checked against the eager step on two other shapes before
  it serves; a trace that fails either keeps the steps eager.
- on CUDA, a CUDA graph per (batch bucket, key length bucket): the B running sequences are padded
  up to the bucket (1, 2, 4, 8, 16, 32, at most the slots there are) with rows in the free slots
  after them, which write a key at position 0 of a free slot (a sequence that takes that slot
  later gets all its positions rewritten: ``SlotKVCache.store_prompt``/``move``), and the keys
  read are rounded up to a power of two of at least 64 (keys after a row's position are masked:
  a softmax weight of exactly 0). A graph is captured on first use of its bucket (or all at
  warm-up) and checked against the eager step before it serves (``GRAPH_RTOL``); the warm-up runs
  that capture needs and the check write only at the last position the bucket reads, which a
  running sequence writes in its own step before it reads it (or never reaches), so capturing
  mid-serving harms no sequence. A bucket that fails the capture or the check is remembered and
  decodes eagerly.

Steps over slots that are not packed (the batcher always packs them) decode eagerly.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from vla_foundry.models.cuda_graph_decode import length_bucket
from vla_foundry.models.kv_slots import PackedSlotStep, SlotKVCache
from vla_foundry.models.policy_graphs import CUDA_BUCKETS
from vla_foundry.models.shared_traces import SharedTrace, shared_trace

logger = logging.getLogger(__name__)

# |graph − eager| ≤ atol + rtol·|eager| on the logits for a CUDA graph to serve (float32; bf16/fp16 layers get the
# low-precision pair: the two runs may pick other kernels). A CPU trace must match exactly.
GRAPH_RTOL, GRAPH_ATOL = 1e-4, 1e-4
GRAPH_RTOL_LOW_PRECISION, GRAPH_ATOL_LOW_PRECISION = 2e-2, 2e-2


class SlotGraphs:
    """Captured decode steps for the slots of one cache; ``decode`` returns None where a step must run eagerly."""

    def __init__(self, step: PackedSlotStep, cache: SlotKVCache, mode: Optional[str] = None):
        self.step, self.cache = step, cache
        # ``cuda_graph`` on CPU runs each bucket's padded step eagerly on its static buffers: the tests check the
        # bucketing and padding that way, where no GPU is.
        self.kind = mode or ("cuda_graph" if cache.keys.is_cuda else "traced")
        self._trace: Optional[SharedTrace] = None
        self._trace_failed = False
        self._buckets: dict[tuple[int, int], Optional[_Bucket]] = {}  # None: capture or check failed
        self._pool = None  # the buckets' shared CUDA graph memory pool

    @property
    def mode(self) -> str:
        """``traced``, ``cuda_graph``, or ``eager`` once tracing (or every capture so far) has failed."""
        if self._trace_failed or (self._buckets and not any(self._buckets.values())):
            return "eager"
        return self.kind

    def decode(self, ids: torch.Tensor, span: slice, positions: list[int]) -> Optional[torch.Tensor]:
        """Logits (B, V) for sequences in the packed slots ``span`` (``PackedSlotStep``'s call), or None: decode
        eagerly."""
        if self.kind == "traced":
            trace = self._traced()
            if trace is None:
                return None
            return _interpret(trace, ids, *self.cache.packed_rows(span, positions))
        if span.start != 0:  # padding rows go into the slots after the running ones
            return None
        bucket = self._bucket(len(positions), max(positions) + 1)
        return None if bucket is None else bucket(ids, positions)

    def capture_all(self) -> None:
        """Trace now (CPU), or capture every bucket (CUDA), instead of at a step's first use."""
        if self.kind == "traced":
            self._traced()
            return
        lengths = sorted({length_bucket(n, self.cache.max_len) for n in range(1, self.cache.max_len + 1)})
        for rows in self.batch_buckets():
            for length in lengths:
                self._bucket(rows, length)

    def batch_buckets(self) -> list[int]:
        """The padded batch sizes: CUDA_BUCKETS up to the slots there are, and all the slots."""
        slots = self.cache.num_slots
        return sorted({b for b in CUDA_BUCKETS if b < slots} | {slots})

    # ------------------------------------------------------------------ CPU: one trace

    def _traced(self) -> Optional[SharedTrace]:
        if self._trace is None and not self._trace_failed:
            try:
                self._trace = self._make_trace()
            except Exception as e:  # tracing is deprecated and may go: the eager step still works
                logger.warning("decode steps stay eager: tracing failed (%s: %s)", type(e).__name__, e)
                self._trace_failed = True
        return self._trace

    def _make_trace(self) -> Optional[SharedTrace]:
        """The process's trace of this step's architecture (``shared_traces.py``: TorchScript never frees a trace,
        so a text model loaded again reuses it), checked against this step."""
        keys, values = self._scratch(rows=3, length=7)
        example = (torch.zeros(3, dtype=torch.long, device=keys.device), torch.tensor([6, 2, 4], device=keys.device),
                   keys, values)
        trace = shared_trace(self.step, ("packed_slot_step", keys.dtype), example)
        for rows, length in ((2, 5), (4, 9)):  # shapes it was not traced with: nothing of the example's was fixed
            keys, values = self._scratch(rows, length)
            ids = torch.arange(rows, device=keys.device) % self.step.lm.vocab_size
            positions = torch.arange(rows, device=keys.device) % length
            positions[0] = length - 1
            eager_keys, eager_values = keys.clone(), values.clone()
            eager = self.step(ids, positions, eager_keys, eager_values)
            traced = _interpret(trace, ids, positions, keys, values)
            if not (torch.equal(traced, eager) and torch.equal(keys, eager_keys) and torch.equal(values, eager_values)):
                logger.warning("decode steps stay eager: the trace differs from the eager step at %d rows of %d keys",
                               rows, length)
                self._trace_failed = True
                return None
        return trace

    def _scratch(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random keys and values (L, rows, length, nh, hd) shaped like the cache's: to trace and check on."""
        shape = (self.cache.keys.shape[0], rows, length, *self.cache.keys.shape[3:])
        generator = torch.Generator(device=self.cache.keys.device).manual_seed(0)
        return tuple(torch.randn(shape, generator=generator, device=self.cache.keys.device).to(self.cache.keys.dtype)
                     for _ in range(2))

    # ------------------------------------------------------------------ CUDA: a graph per bucket

    def _bucket(self, rows: int, length: int) -> Optional["_Bucket"]:
        padded_rows = next(b for b in self.batch_buckets() if b >= rows)
        key = (padded_rows, length_bucket(length, self.cache.max_len))
        if key not in self._buckets:
            try:
                self._buckets[key] = bucket = _Bucket(self.step, self.cache, *key, pool=self._pool)
                if bucket.graph is not None and self._pool is None:
                    self._pool = bucket.graph.pool()
            except Exception as e:  # that bucket decodes eagerly
                logger.warning("decode steps of %d rows of %d keys stay eager: %s: %s", *key, type(e).__name__, e)
                self._buckets[key] = None
        return self._buckets[key]


def _interpret(trace: SharedTrace, *inputs: torch.Tensor) -> torch.Tensor:
    """Run the trace in TorchScript's plain interpreter. Its default (profiling) executor specializes the graph to
    the shapes it has seen and profiles and optimizes it again when they change, a stall of a tenth of a second or
    more, and a step's batch size and key length change all the time. (The flag is per thread.)"""
    with torch.jit.optimized_execution(False):
        return trace(*inputs)


class _Bucket:
    """One captured step of ``rows`` sequences reading ``length`` keys, on static buffers; ``__call__`` pads the
    running sequences' ids and positions into them and replays.

    The warm-up runs that capture needs, and the check against the eager step, run on the cache itself (no copy
    of it), with every row writing at the last position the bucket reads: a position that a running sequence
    either writes in its own step before it reads it, or never reaches, and that a free slot's next sequence
    overwrites."""

    def __init__(self, step: PackedSlotStep, cache: SlotKVCache, rows: int, length: int, pool=None):
        self.step, self.rows, self.length = step, rows, length
        device = cache.keys.device
        with torch.inference_mode(False):  # plain tensors: a step outside inference mode may fill them too
            self.ids = torch.zeros(rows, dtype=torch.long, device=device)
            self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.keys, self.values = cache.keys[:, :rows, :length], cache.values[:, :rows, :length]  # views
        self.ids.copy_(torch.arange(rows, device=device) % step.lm.vocab_size)
        self.positions.fill_(length - 1)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        if device.type == "cuda":
            self._capture(device, pool)
        self._check(cache.keys.dtype)

    def _capture(self, device: torch.device, pool) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
            for _ in range(2):
                self.step(self.ids, self.positions, self.keys, self.values)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Buckets share one memory pool: their replays never overlap (one model thread) and each one's logits are
        # used before the next replay. thread_local: another thread's allocation does not spoil this capture.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = self.step(self.ids, self.positions, self.keys, self.values)  # (rows, V), static

    def _check(self, dtype: torch.dtype) -> None:
        eager = self.step(self.ids, self.positions, self.keys, self.values)
        got = self._replay()
        rtol, atol = ((GRAPH_RTOL, GRAPH_ATOL) if dtype == torch.float32
                      else (GRAPH_RTOL_LOW_PRECISION, GRAPH_ATOL_LOW_PRECISION))
        if not torch.allclose(got.float(), eager.float(), rtol=rtol, atol=atol):
            difference = (got.float() - eager.float()).abs().max().item()
            raise RuntimeError(f"the captured step differs from the eager one by {difference:.3g}")

    def _replay(self) -> torch.Tensor:
        if self.graph is None:
            return self.step(self.ids, self.positions, self.keys, self.values)
        self.graph.replay()
        return self.logits

    def __call__(self, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Logits (B, V) of the B sequences in slots 0…B−1: ``ids`` (B,) at ``positions``. Valid until the next
        call."""
        count = len(positions)
        self.ids[:count] = ids
        self.ids[count:] = 0
        self.positions[:count] = torch.tensor(positions, dtype=torch.long)
        self.positions[count:] = 0  # padding rows: position 0 of the free slots after the running ones
        return self._replay()[:count]
