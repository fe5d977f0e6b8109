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
        """Start the generation; returns once it has produced its first delta. An error before that (the
        deployment is loading, the queue is full, the input is invalid) is raised here, so the client gets
        a plain HTTP error instead of a stream."""
        self.task = asyncio.ensure_future(run)
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            self._first: Optional[Delta] = getter.result()
            return
        getter.cancel()
        self._first = None
        self.task.result()  # raises the generation's error, if any

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every delta in order; the generation's error (if any) is raised after the last one."""
        getter: Optional[asyncio.Future] = None
        try:
            if self._first is not None:
                yield self._first
            while True:
                getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not self._queue.empty():  # what arrived just before the generation ended
                    yield self._queue.get_nowait()
                self.task.result()
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if not self.task.done():  # the client went away mid-stream
                self.cancelled.set()  # a generation already running stops at its next delta
                self.task.cancel()  # one still queued (or waiting in a continuous batcher) is dropped unrun
                self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def result(self) -> Any:
        return self.task.result()


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def sse_error(status: int, message: str) -> str:
    return sse(error_body(status, message))


SSE_DONE = "data: [DONE]\n\n"
