"""A text or caption deployment's generations in a process of its own (``VLA_MODEL_PROCESS``, with continuous
batching).

The policy's model process (``model_process.py``) answers one call at a time. A continuous batcher instead
steps on its own while generations run, and hands out their text token by token, so here the child keeps the
deployment's ``ContinuousBatcher`` and steps it whenever it has generations, between the calls it answers
(``GenerationEngine``); after every step it sends a report: each generation's streamed deltas of that step,
the results of those that ended, which started decoding, and the batcher's counts (and, within a step, one
after each admission, with that generation's first tokens). In the server the
deployment's model thread drives a ``RemoteBatcher`` through the executor exactly as it drives a local one:
``submit`` sends a generation's request to the child (its prompts and settings, ``RemoteGeneration``; the
child makes the ``Generation``, with its tokenizer, text tracking and stop strings, as the pipeline makes it
in-thread), ``step`` waits (without the interpreter lock) for the next report and hands its deltas to the
streams and its results to the requests. Cancellations (a client gone, a deadline passed while waiting for a
slot) go to the child as messages, and the generation is dropped at its next step.

So the event loop (HTTP, server-sent events) and the decode steps (the model, sampling, detokenizing) no
longer take turns on one interpreter lock. The server keeps a copy of the pipeline on the CPU for what needs
no model: the tokenizer (``prompt_ids``, ``render_chat``), the caption checks before images are decoded, and
``/models``' io.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import select
import socket
import threading
from typing import Any, Callable, Optional

from service.model_process import ModelProcess
from service.streaming import GenerationCancelled
from vla_foundry.continuous import ContinuousBatcher, Generation, SlotOutlook

logger = logging.getLogger("service.model_process")



@dataclasses.dataclass
class RemoteGeneration:
    """What ``TextModelProcess.start_completion`` / ``start_caption`` give the executor for its batcher: the
    pipeline method the child calls to make the ``Generation`` (with these arguments), and, here, where its
    streamed text goes. ``ids``: one entry per row (the prompts' token ids where they were given)."""

    method: str
    args: tuple
    kwargs: dict
    on_text: Optional[Callable] = None
    ids: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Entry:
    on_text: Optional[Callable]
    on_done: Callable[[Any], None]
    cancelled: Callable[[], bool]
    too_late: Callable[[], Optional[BaseException]]
    rows: int
    started: bool = False  # the child has begun to decode it (a deadline no longer drops it)
    decoding: int = 0  # its rows decoding at the child's last report (fewer than ``rows`` once some ended)


class RemoteBatcher:
    """The executor's view of the child's ``ContinuousBatcher`` (the members ``executor.py``, ``deployments.py``
    and the metrics read of one): its generations' callbacks stay here, their sequences decode there."""

    def __init__(self, process: "TextModelProcess", info: dict[str, Any]):
        self._process = process
        self.num_slots: int = info["num_slots"]
        self.cache_bytes: int = info["cache_bytes"]
        self.decode_mode: str = info["decode_mode"]
        self.prefill_tokens: int = info["prefill_tokens"]
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # entries: the model thread steps and submits, the metrics read them
        # ``wakeup`` ends a ``step``'s wait for the child's report early, so that a generation queued meanwhile is
        # sent to the child now, not after the child's next step (it would then join a step later).
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        # The child's slots at its last report, and the generations it held then (decoding or waiting)
        self._last_report: tuple[Optional[SlotOutlook], frozenset] = (None, frozenset())
        self.child_generations = 0  # how many generations the child held at its last report (cancelled ones too)
        self._gone: list[int] = []  # generations whose stream's client left while a report was taken: cancelled next

    @property
    def active(self) -> bool:
        return bool(self._entries or self._gone)  # (a cancellation still to send: the next step sends it)

    def wakeup(self) -> None:
        """A generation was queued for this batcher (any thread): a ``step`` waiting for the child returns now."""
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):  # (already woken, or closed)
            pass

    # The sequences of the generations this server still waits for (a cancelled one no longer counts, though the
    # child may hold it until its next step): decoding at the child's last report (as the local batcher counts
    # them: a row that ended before the others of its generation no longer does), or sent and waiting.
    @property
    def running_sequences(self) -> int:
        return sum(e.decoding for e in list(self._entries.values()) if e.started)

    @property
    def waiting_sequences(self) -> int:
        return sum(e.rows for e in list(self._entries.values()) if not e.started)

    def expected_wait_s(self, rows: int = 1) -> float:
        """``ContinuousBatcher.expected_wait_s`` from the child's last report, the generations sent to it since
        then counted as waiting ahead (a local batcher counts each from its submit: without them, a burst between
        two reports found free slots and was admitted whole)."""
        outlook, reported = self._last_report  # (one report's, whichever thread replaces it meanwhile)
        if not self._entries or outlook is None:
            return 0.0
        unreported = sum(e.rows for key, e in list(self._entries.items())
                         if key not in reported and e.rows <= self.num_slots)  # (more rows: they run alone)
        return dataclasses.replace(outlook, short=outlook.short + unreported).wait_s(rows)

    def warmup(self) -> None:
        self._process.warmup_batcher()

    def submit(self, generation: RemoteGeneration, on_done: Callable[[Any], None],
               cancelled: Callable[[], bool] = lambda: False,
               too_late: Callable[[], Optional[BaseException]] = lambda: None) -> None:
        key = next(self._ids)
        with self._lock:
            self._entries[key] = _Entry(generation.on_text, on_done, cancelled, too_late, len(generation.ids))
        try:
            self._process.send_to_engine("submit", key, generation.method, generation.args, generation.kwargs,
                                         generation.on_text is not None)
        except Exception as e:  # the child has gone, or is restarting: this generation's failure (503)
            with self._lock:
                self._entries.pop(key, None)
            on_done(e)

    def step(self) -> None:
        """Drop what was cancelled or is too late (telling the child), then wait for the child's next report and
        hand out what it says; reports that arrived meanwhile too."""
        dropped, late = [], []
        with self._lock:
            dropped, self._gone = self._gone, []
            for key, entry in list(self._entries.items()):
                error = None if entry.started or entry.cancelled() else entry.too_late()
                if entry.cancelled() or error is not None:
                    del self._entries[key]
                    dropped.append(key)
                    if error is not None:
                        late.append((entry, error))
        for entry, error in late:
            entry.on_done(error)
        if dropped:
            self._process.send_to_engine("cancel", dropped)
        if self._entries:
            self._process.next_reports(self._wake_reader)

    def take(self, report: dict[str, Any]) -> None:
        """One step report of the child (on the thread reading the child's messages)."""
        self._last_report, self.child_generations = (report["outlook"], frozenset(report["decoding"])), report["held"]
        with self._lock:
            for key in report["started"]:
                if key in self._entries:
                    self._entries[key].started = True
            for key, rows in report["decoding"].items():
                if key in self._entries:
                    self._entries[key].decoding = rows
        for key, row, text, token_ids, finish in report["deltas"]:
            entry = self._entries.get(key)
            if entry is None or entry.on_text is None:
                continue
            try:
                entry.on_text(row, text, token_ids, finish)
            except Exception as e:  # its stream's client has gone (GenerationCancelled): it ends here
                with self._lock:
                    self._entries.pop(key, None)
                    self._gone.append(key)  # (the child hears of it from the next step: the channel is busy now)
                entry.on_done(e)
        for key, outcome in report["done"]:
            with self._lock:
                entry = self._entries.pop(key, None)
            if entry is not None:
                entry.on_done(outcome)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            keys, entries, self._entries, self._gone = [*self._entries, *self._gone], list(
                self._entries.values()), {}, []
        for entry in entries:
            entry.on_done(error)
        try:  # (the child, if it still runs, drops them: nothing here reads their text any more)
            self._process.send_to_engine("cancel", keys)
        except Exception:  # noqa: BLE001 — the child is gone, or the channel is what failed
            pass

    def close(self) -> None:
        self._wake_reader.close()
        self._wake_writer.close()


class TextModelProcess(ModelProcess):
    """A text or caption pipeline (``TextServing``, ``CaptionServing``) whose model runs in a child process;
    ``continuous_batcher`` gives the ``RemoteBatcher`` of the child's batcher."""

    def __init__(self, local, *args: Any, **kwargs: Any):
        super().__init__(local, *args, **kwargs)
        self.modality = local.modality
        self._batcher: Optional[RemoteBatcher] = None
        self._batcher_args: Optional[tuple] = None  # how the child's batcher was made (made again on a restart)
        self._batcher_warm = False

    # ------------------------------------------------------------------ the channel, for RemoteBatcher

    def send_to_engine(self, operation: str, *args: Any) -> None:
        """A message the child's engine answers with no reply (its effects come in step reports)."""
        with self._lock:
            refusal = self._refusal(operation)
            if refusal is not None:
                raise refusal
            try:
                self._send((operation, args, {}), answered=False)
            except (EOFError, OSError):
                raise self._exited(self._process) from None

    def next_reports(self, wake: socket.socket) -> None:
        """Wait for the child's next step report and take it, and every report that has arrived since; or return
        without one once ``wake`` is written to."""
        with self._lock:
            refusal = self._refusal("step")
            if refusal is not None:
                raise refusal
            poller = select.poll()
            poller.register(self._conn.sock, select.POLLIN)
            poller.register(wake, select.POLLIN)
            if self._conn.sock.fileno() not in dict(poller.poll()):
                try:
                    wake.recv(4096)
                except BlockingIOError:
                    pass
                return
            try:
                while True:
                    message = self._conn.recv()
                    if message[0] != "step":  # (no call is waiting for it: every call reads its own reply)
                        raise RuntimeError(f"the model process sent an unexpected {message[0]!r} reply")
                    self._report(message[1])
                    if not self._conn.poll(0):
                        return
            except (EOFError, OSError):
                raise self._exited(self._process) from None

    def _report(self, report: Any) -> None:
        if self._batcher is not None:
            self._batcher.take(report)

    # ------------------------------------------------------------------ TextServing / CaptionServing: in the child

    def continuous_batcher(self, max_sequences: int, max_cache_bytes: Optional[int] = None,
                           prefill_tokens: Optional[int] = None) -> Optional[RemoteBatcher]:
        """The child's batcher (``max_cache_bytes`` None: a quarter of the memory free on its device, measured
        there); None when its model cannot decode in slots."""
        self._batcher_args = (max_sequences, max_cache_bytes, prefill_tokens)
        info = self._make_batcher()
        self._batcher = None if info is None else RemoteBatcher(self, info)
        return self._batcher

    def _make_batcher(self) -> Optional[dict[str, Any]]:
        info = self._call("make_batcher", *self._batcher_args)
        if isinstance(info, str):  # not even one sequence's cache fits
            raise ValueError(info)
        return info

    def complete(self, prompts=None, prompt_token_ids=None, *, on_text=None, **options: Any):
        if on_text is not None:
            raise RuntimeError("a model process streams generations from its continuous batcher only")
        return self._call("complete", prompts, prompt_token_ids, **options)

    def caption(self, images, prompts=None, prompt_token_ids=None, *, on_text=None, **options: Any):
        if on_text is not None:
            raise RuntimeError("a model process streams generations from its continuous batcher only")
        return self._call("caption", list(images), prompts, prompt_token_ids, **options)

    def start_completion(self, prompts=None, prompt_token_ids=None, *, on_text=None,
                         **options: Any) -> RemoteGeneration:
        rows = prompt_token_ids if prompt_token_ids is not None else [None] * len(prompts or ())
        return RemoteGeneration("start_completion", (prompts, prompt_token_ids), options, on_text, list(rows))

    def start_caption(self, images, prompts=None, prompt_token_ids=None, *, on_text=None,
                      **options: Any) -> RemoteGeneration:
        prompt_rows = prompt_token_ids if prompt_token_ids is not None else (prompts if prompts is not None else [None])
        rows = max(len(images), len(prompt_rows))  # (one side broadcasts over the other, as ``broadcast_rows``)
        return RemoteGeneration("start_caption", (list(images), prompts, prompt_token_ids), options, on_text,
                                [None] * rows)

    def close(self) -> None:
        super().close()
        if self._batcher is not None:
            self._batcher.close()

    def serving(self) -> None:
        """Serving from now on; after a restart, once the new child has made the batcher the last one had (warmed
        up as it was), after its warm-up, as at load."""
        if self._warming and self._batcher is not None:
            info = self._make_batcher()
            if info is None:
                raise RuntimeError("the restarted model process made no continuous batcher")
            self._batcher.num_slots, self._batcher.cache_bytes = info["num_slots"], info["cache_bytes"]
            if self._batcher_warm:
                self._call("warmup_batcher")
        super().serving()

    def warmup_batcher(self) -> None:
        """Capture the child's batcher's decode steps now (and again after a restart)."""
        self._call("warmup_batcher")
        self._batcher_warm = True

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("evaluate", *args, **kwargs)


class GenerationEngine:
    """The child's side: the pipeline's ``ContinuousBatcher``, fed by ``submit`` and ``cancel`` messages, stepped
    by the child's loop while ``busy``; a step's events go to the server in a report after it, and each admission's
    first tokens in one of their own right after its prefill."""

    MESSAGES = ("submit", "cancel")  # no reply
    READ_AT_ONCE = 64  # messages read after each delta of a generation that runs alone (``_read_cancels``)
    OPERATIONS = ("make_batcher", "warmup_batcher")  # a reply, as the pipeline's calls

    def __init__(self, pipeline, conn, device):
        self.pipeline, self.conn, self.device = pipeline, conn, device
        self.batcher: Optional[ContinuousBatcher] = None
        # The generations the batcher holds, by key (from submit until they end or are dropped)
        self._held: dict[int, Generation] = {}
        self._cancelled: set[int] = set()  # of those, the ones the server has cancelled: dropped at the next step
        self._deltas: list = []
        self._done: list = []
        self._started: list[int] = []
        # The messages read while a generation ran alone (inside ``submit``, the child's loop not reading), each with
        # whether its sender waits for a reply, or the error that reading one raised: the child's loop takes them,
        # in order, before the socket's next one.
        self.backlog: collections.deque[tuple[Any, bool]] = collections.deque()

    @property
    def busy(self) -> bool:
        return bool(self._done or self._deltas or (self.batcher is not None and self.batcher.active))

    def make_batcher(self, max_sequences: int, max_cache_bytes: Optional[int], prefill_tokens: Optional[int]):
        from vla_foundry.devices import free_memory_bytes

        if max_cache_bytes is None:  # (measured here, where the model's device is)
            max_cache_bytes = free_memory_bytes(self.device) // 4
        try:
            options = {} if prefill_tokens is None else {"prefill_tokens": prefill_tokens}
            self.batcher = self.pipeline.continuous_batcher(max_sequences, max_cache_bytes, **options)
        except ValueError as e:
            return str(e)
        if self.batcher is None:
            return None
        return {"num_slots": self.batcher.num_slots, "cache_bytes": self.batcher.cache_bytes,
                "decode_mode": self.batcher.decode_mode, "prefill_tokens": self.batcher.prefill_tokens}

    def warmup_batcher(self) -> None:
        self.batcher.warmup()

    def submit(self, key: int, method: str, args: tuple, kwargs: dict, streams: bool) -> None:
        if method not in ("start_completion", "start_caption") or self.batcher is None:
            self._done.append((key, RuntimeError(f"the model process cannot start {method!r} generations now")))
            return
        alone = [False]  # it runs by itself, inside ``submit``: each delta goes out in a report at once

        def on_text(row: int, text: Optional[str], token_ids: list[int], finish: Optional[str]) -> None:
            self._deltas.append((key, row, text, token_ids, finish))
            if alone[0]:
                self._report()
                self._read_cancels()
                if key in self._cancelled:  # its client has gone: it ends now, as a stream in-thread does
                    raise GenerationCancelled()

        try:
            generation = getattr(self.pipeline, method)(*args, on_text=on_text if streams else None, **kwargs)
        except Exception as e:  # its own input, refused
            self._done.append((key, e))
            return
        stopping = generation.stopping
        first = [True]

        def stopping_and_started(last: list[int]) -> list[bool]:
            if first[0]:  # its prefill's first tokens: it has a slot, and decodes from now on
                first[0] = False
                self._started.append(key)
            return stopping(last)

        generation = dataclasses.replace(generation, stopping=stopping_and_started)
        if len(generation.ids) > self.batcher.num_slots or not generation.shares_steps:
            self._started.append(key)  # it runs by itself now, in ``submit`` (no deadline drops it from here on)
            first[0], alone[0] = False, True
            self._report()
        self._held[key] = generation
        self.batcher.submit(generation, lambda outcome: self._ended(key, outcome),
                            cancelled=lambda: key in self._cancelled)

    def _ended(self, key: int, outcome: Any) -> None:
        self._held.pop(key, None)
        self._done.append((key, outcome))

    def cancel(self, keys: list[int]) -> None:
        self._cancelled.update(key for key in keys if key in self._held)

    def _read_cancels(self) -> None:
        """While a generation runs alone: the cancels the server has sent since, applied now (a generation whose
        submit still waits in ``backlog`` leaves it: it never starts); every other message (or the error reading
        it) waits in ``backlog`` for the child's loop. At most ``READ_AT_ONCE`` messages a time, so a server that
        keeps sending cannot hold the generation up."""
        for _ in range(self.READ_AT_ONCE):
            if not self.conn.poll(0):
                return
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server has gone: the generation ends, and then the child's loop
                raise
            except Exception as e:  # (the loop answers it as it answers any message it cannot read)
                self.backlog.append((e, self.conn.last_answered))
                continue
            if message[0] == "cancel":
                keys = message[1][0]
                self.cancel(keys)
                gone = set(keys)
                self.backlog = collections.deque(
                    (m, answered) for m, answered in self.backlog
                    if isinstance(m, BaseException) or m[0] != "submit" or m[1][0] not in gone)
            else:
                self.backlog.append((message, self.conn.last_answered))

    def step(self) -> None:
        """One decode step (when generations run), then its report; the first tokens of each generation it admits go
        in a report of their own right after its prefill (a client's first token waits neither for the step's later
        prefills nor for its decode)."""
        if self.batcher is not None and self.batcher.active:
            try:
                self.batcher.step(admitted=lambda: self._report() if self._started else None)
            except OSError:  # an admission's report found the server gone: the child's loop ends
                raise
            except Exception as e:  # a fault of the batcher itself: what it holds fails, the child keeps serving
                logger.exception("a decode step failed")
                self.batcher.fail_all(e)
            for key in self._cancelled:  # (a step drops every generation cancelled before it)
                self._held.pop(key, None)
            self._cancelled.clear()
        self._report()

    def _report(self) -> None:
        # per generation, its rows still decoding (a row that ended early has given its slot back)
        decoding = {id(generation): rows for generation, rows in self.batcher.rows_decoding()} if self.batcher else {}
        report = {"deltas": self._deltas, "done": self._done, "started": self._started, "held": len(self._held),
                  "outlook": self.batcher.outlook() if self.batcher else None,
                  "decoding": {key: decoding.get(id(generation), 0) for key, generation in self._held.items()}}
        self._deltas, self._done, self._started = [], [], []
        self.conn.send(("step", report))


# What a batcher's ``submit`` takes: a local batcher's generations, and a remote one's.
GENERATIONS = (Generation, RemoteGeneration)
