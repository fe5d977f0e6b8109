"""One executor per deployment: a worker thread fed by a bounded queue (DESIGN §7).

Requests to one model are serialized on its device, other models keep serving, and the
event loop never runs model code. A full queue is refused at once (503), not buffered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclass
class Timed:
    value: Any
    queue_ms: float
    run_ms: float


class ModelExecutor:
    def __init__(self, name: str, max_queue: int):
        self.name = name
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name=f"model-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)``; the future's result is a :class:`Timed`. Raises QueueFull."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait((fn, args, kwargs, future, time.perf_counter()))
        except queue.Full:
            raise QueueFull(f"deployment {self.name!r} has {self._queue.maxsize} requests waiting") from None
        return future

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Timed:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, kwargs, future, queued_at = item
            if not future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
            except BaseException as e:  # handed to the awaiting request
                future.set_exception(e)
            else:
                done = time.perf_counter()
                future.set_result(Timed(value, (started - queued_at) * 1000, (done - started) * 1000))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Finish what is running, then stop; requests still queued are cancelled."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[3].cancel()
        self._queue.put(None)
        self._thread.join(timeout)
