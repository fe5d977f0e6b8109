"""Keep Python's cyclic garbage collector from pausing the server for a whole heap scan.

A full (generation 2) collection walks every container object the process holds, and a
serving process holds about half a million from its imports and models (torch, transformers,
FastAPI, pydantic). On the 2-core CPU each such collection took 250-300 ms, and under load one
ran every few seconds: every request in flight, on the event loop and the model threads alike,
waited it out (`bench/overload.py`: the accepted requests' p99 was 300+ ms against a p95 of
50 ms, and the slow ones were those queued behind a model call that took 300 ms).

Once its models are loaded the process collects once and then freezes what is alive
(`gc.freeze`: those objects move to a permanent generation that collections skip), so a later
collection walks only what was made since: requests, replies, their tensors' wrappers. Frozen
objects are still freed by reference counting as before; only cycles among them wait for the
next thaw. Unloading a deployment thaws, collects its model's cycles too, and freezes again.
CPython's own advice for long-running processes (the `gc.freeze` documentation); vLLM freezes
after its start-up in the same way.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

logger = logging.getLogger("service")

_LOCK = threading.Lock()  # deployments load and unload on their own threads


def freeze_long_lived() -> None:
    """Collect what is garbage now, then move every object alive out of later collections' scans."""
    with _LOCK:
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        logger.debug("froze %d objects in %.0f ms", gc.get_freeze_count(), (time.perf_counter() - started) * 1000)


def collect_everything() -> None:
    """A collection that includes the frozen objects (what an unloaded model left in cycles), then freeze again."""
    with _LOCK:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
