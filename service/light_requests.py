"""Requests that are not model work yield to the models.

Probes, ``/models``, ``/metrics``, the docs and the page (every GET, HEAD and OPTIONS: all model work
is a POST or a websocket) cost the event loop little each, but a client that sends them as fast as it
can takes a core for itself and another for the server's loop, and on a small host that is the
model's core: one robot's throughput fell to a third under a flood of ``/health/live``. So while any
deployment is at work (a call running or queued, or one finished less than ``ACTIVE_WINDOW_S`` ago),
these requests pass a token bucket of ``rate`` a second (bursts of a tenth of a second's worth); one
over it waits for its turn before it is served. A client that floods on a keep-alive connection
then sends no faster than its answers come, so the flood itself slows and leaves the CPU to the
model. No wait exceeds ``MAX_WAIT_S``: a liveness probe behind a huge flood is answered late, not
failed. An idle server answers them at once, whatever the rate.

This is a server-wide cap like nginx's ``limit_req`` with a delay instead of a refusal (a refusal
is cheap to retry, so it would not slow a flood); the rate (``VLA_LIGHT_REQUESTS_PER_S``, default
500) is far above what probes, scrapes and tools send, and 0 turns pacing off.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

from starlette.types import ASGIApp, Receive, Scope, Send

# Scope key: when a request arrived (``time.perf_counter()``), for one held here before ``metrics.RequestMetrics``
# times it (its latency counts its hold).
ARRIVED = "vla.arrived"

LIGHT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ACTIVE_WINDOW_S = 1.0  # a robot's closed loop leaves gaps between calls; they count as "at work"
MAX_WAIT_S = 0.5


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; :meth:`delay` takes one and says how long its
    taker must wait for it (0 when one was saved). Takers queue in order while the bucket's debt (the
    tokens promised ahead) is under ``rate × max_wait_s``; past that a taker waits ``max_wait_s`` and
    owes nothing more, so no wait exceeds ``max_wait_s``, and a flood from more connections than that
    debt is answered in bursts above ``rate`` (each of its connections still at most about once per
    ``max_wait_s``)."""

    def __init__(self, rate: float, burst: float, max_wait_s: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.floor, self.clock = rate, burst, -rate * max_wait_s, clock
        self.tokens, self.stamp = burst, clock()

    def delay(self) -> float:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens = max(self.floor, self.tokens - 1)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class LightRequestPacer:
    """ASGI middleware: GET, HEAD and OPTIONS requests pass the bucket while ``models_at_work()`` is true."""

    def __init__(self, app: ASGIApp, rate: float, models_at_work: Callable[[float], bool],
                 on_delay: Optional[Callable[[float], None]] = None):
        self.app, self.models_at_work, self.on_delay = app, models_at_work, on_delay
        self.bucket = TokenBucket(rate, burst=max(1.0, rate / 10), max_wait_s=MAX_WAIT_S) if rate > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.bucket is not None and scope["type"] == "http" and scope["method"] in LIGHT_METHODS
                and self.models_at_work(ACTIVE_WINDOW_S)):
            wait = self.bucket.delay()
            if wait > 0:
                scope[ARRIVED] = time.perf_counter()  # (its latency counts its hold: ``metrics.RequestMetrics``)
                if self.on_delay is not None:
                    self.on_delay(wait)
                await asyncio.sleep(wait)
        await self.app(scope, receive, send)
