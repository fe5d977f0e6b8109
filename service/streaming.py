"""Streaming a generation from a deployment's thread to an HTTP response, as server-sent events.

The pipeline calls ``on_text`` on the worker thread for every delta; the deltas cross to
the event loop through an asyncio queue. A client that goes away cancels the generation at
its next step instead of leaving the model busy for nobody.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Awaitable, Optional

from service.errors import error_body

Delta = tuple[int, Optional[str], list[int], Optional[str]]  # row, text, token ids, finish reason


_END = object()  # after the last delta: the generation has ended


def merge_rows(deltas: list[Delta]) -> list[Delta]:
    """One delta per row, rows in the order they first appear: the row's texts joined (None when none showed
    text), its token ids joined, and its finish reason (only a row's last delta has one). Linear in the deltas:
    a stream far behind its generation may hand over thousands at once."""
    texts: dict[int, list[str]] = {}
    ids: dict[int, list[int]] = {}
    finishes: dict[int, Optional[str]] = {}
    for row, text, token_ids, finish in deltas:
        texts.setdefault(row, [])
        if text is not None:
            texts[row].append(text)
        ids.setdefault(row, []).extend(token_ids)
        finishes[row] = finish
    return [(row, "".join(parts) if parts else None, ids[row], finishes[row]) for row, parts in texts.items()]


class GenerationCancelled(Exception):
    """Raised inside the generation loop when the streaming client has gone."""


class DeltaStream:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.task: Optional[asyncio.Future] = None

    def on_text(self, row: int, text: Optional[str], token_ids: list[int], finish_reason: Optional[str]) -> None:
        """The pipeline's ``on_text`` (worker thread)."""
        if self.cancelled.is_set():
            raise GenerationCancelled()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (row, text, token_ids, finish_reason))

    async def start(self, run: Awaitable[Any]) -> None:
        """Start the generation; returns once it has produced its first delta (or ended without one). An error
        before that (the deployment is loading, the queue is full, the input is invalid) is raised here, so the
        client gets a plain HTTP error instead of a stream. Cancelled meanwhile (the client left while the
        generation was queued), it cancels the generation too."""
        self.task = asyncio.ensure_future(run)
        # The end marker follows every delta: the deltas' callbacks were queued on the loop before the one that
        # ends the task.
        self.task.add_done_callback(lambda _: self._queue.put_nowait(_END))
        try:
            first = await self._queue.get()
        except BaseException:
            self._abandon()
            raise
        if first is _END:
            self.task.result()  # raises the generation's error, if any
        self._first: list = [first]

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """Every row's deltas in order, in lists of what has arrived since the previous list, each row's deltas of
        a list merged into one (``merge_rows``): one write and one event per row, so a stream that fell behind its
        generation sends what it owes at once instead of an event per token, each of which its client must parse
        (a request of several rows gets one event per row per list). The generation's error (if any) is raised
        after the last list."""
        try:
            pending = list(self._first)
            while True:
                while not self._queue.empty():
                    pending.append(self._queue.get_nowait())
                ended = _END in pending  # (the marker is last: nothing follows the end)
                deltas = pending[:pending.index(_END)] if ended else pending
                if deltas:
                    yield merge_rows(deltas)
                if ended:
                    self.task.result()
                    return
                pending = [await self._queue.get()]
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """The client went away: a generation already running stops at its next delta, one still queued (or
        waiting in a continuous batcher) is dropped unrun. Nothing once it has ended."""
        if not self.task.done():
            self.cancelled.set()
            self.task.cancel()
            self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def result(self) -> Any:
        return self.task.result()


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str, scope: Optional[dict] = None, field: Optional[str] = None,
              type: Optional[str] = None) -> str:
    return sse(error_body(status, message, field=field, type=type, scope=scope))


SSE_DONE = "data: [DONE]\n\n"
