"""Keep Python's cyclic garbage collector from pausing the server for a whole heap scan.

A full (generation 2) collection walks every container object the process holds, and a
serving process holds about half a million from its imports and models (torch, transformers,
FastAPI, pydantic). On the 2-core CPU each such collection took 250-300 ms (logged with a
`gc.callbacks` hook), and under load one ran every few seconds: every request in flight, on the
event loop and the model threads alike, waited it out. In one run of `bench/overload.py` the
accepted requests' p95 was 53 ms and their p99 303 ms, and the slow ones were those queued behind
a model call that took 300 ms.

Once a deployment has loaded, the process collects once and then freezes what is alive
(`gc.freeze`: those objects move to a permanent generation that collections skip), so a later
collection walks only what was made since: requests, replies, their tensors' wrappers (1-12 ms in
the same load). Frozen objects are still freed by reference counting as before; only garbage in
reference cycles among them waits for the next thaw: what an unloaded model or a failed load
leaves (both thaw, collect and freeze again), and whatever else was alive at a freeze and later
became cyclic garbage (requests in flight while a deployment loaded), which a server that never
unloads keeps. vLLM freezes its heap after start-up in the same way.
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


def thaw_and_collect() -> None:
    """One collection that walks the frozen objects too (what an unloaded model left in cycles), then freeze again."""
    with _LOCK:
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        logger.debug("collected the frozen heap in %.0f ms", (time.perf_counter() - started) * 1000)


def thaw() -> None:
    """Give every frozen object back to the collector (the server is stopping; an in-process app is done)."""
    with _LOCK:
        gc.unfreeze()
