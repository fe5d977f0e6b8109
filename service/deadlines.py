"""Request deadlines: an answer that comes too late is worse than none, for a robot most of all.

A request may carry ``X-Request-Timeout: <seconds>`` or ``timeout_s`` in its body; a deployment
may set a default (``request_timeout_s`` in its YAML entry); a robot's observation with a
``timestamp`` is due by the ``valid_until`` of the chunk it would get. The deadline (the
earliest of these) is held in a context variable for the request's task, so the deployment layer sees it
whatever the transport, and a request still waiting for the model at its deadline is dropped then
(``executor._outcome``): it gets 504 and its model call never runs. Admission looks ahead too: when the deployment's
expected wait already exceeds what is left (or its ``max_queue_ms`` or ``max_queue_calls``), the
request is refused at once with 503 and a ``Retry-After`` from that wait.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import random
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_response
from service.images import release_pixels

HEADER = b"x-request-timeout"
MAX_TIMEOUT_S = 3600.0
current_deadline: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("deadline", default=None)


def parse_timeout(raw: bytes) -> float:
    """Seconds from the header's value; ValueError with the reason when it is not a sane number."""
    text = raw.decode("latin-1")  # what HTTP header bytes mean: never fails, so the error can quote the text
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"X-Request-Timeout must be a number of seconds, e.g. 2.5; got {text[:40]!r}") from None
    if not 0 < seconds <= MAX_TIMEOUT_S or math.isnan(seconds):
        raise ValueError(f"X-Request-Timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds; got {text.strip()[:40]}")
    return seconds


def timeout_parameter() -> dict[str, Any]:
    """``X-Request-Timeout`` as an OpenAPI header parameter, for the operations whose requests queue for a model
    (``Deployment.admit``/``call`` read the deadline). ``Deadlines`` parses the header on every request, so a
    malformed one is refused (400) anywhere, but only these operations act on it."""
    return {"name": "X-Request-Timeout", "in": "header", "required": False,
            "description": "Seconds this request may take from its arrival (the earliest of this, a body's "
                           "`timeout_s` where the route takes one, and the deployment's `request_timeout_s` holds): "
                           "a request still waiting for the model then gets 504 and never runs, and one whose "
                           "expected wait is already longer is refused at once (503 with Retry-After). A value that "
                           f"is not a number of seconds in (0, {MAX_TIMEOUT_S:g}] is refused (400).",
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S}}


def deadline_for(default_timeout_s: Optional[float]) -> Optional[float]:
    """The current request's deadline (``time.perf_counter()`` clock), with a deployment's default timeout
    counted from now when the request set none or a later one."""
    deadline = current_deadline.get()
    if default_timeout_s is not None:
        own = time.perf_counter() + default_timeout_s
        deadline = own if deadline is None else min(deadline, own)
    return deadline


@contextmanager
def tightened(timeout_s: Optional[float] = None, arrived: Optional[float] = None,
              until_wall: Optional[float] = None) -> Iterator[None]:
    """The current deadline, for the block, made no later than ``arrived + timeout_s`` (a body's ``timeout_s``,
    ``time.perf_counter()`` clock) and ``until_wall`` (a Unix time, e.g. until when a robot's chunk would still
    be valid)."""
    candidates = [current_deadline.get()]
    if timeout_s is not None:
        candidates.append((time.perf_counter() if arrived is None else arrived) + timeout_s)
    if until_wall is not None:
        candidates.append(time.perf_counter() + (until_wall - time.time()))
    known = [c for c in candidates if c is not None]
    token = current_deadline.set(min(known) if known else None)
    try:
        yield
    finally:
        current_deadline.reset(token)


class Reservation:
    """One admitted request counted in ``counts[batchable]`` (its deployment executor's ``pending``) from ``hold``
    (at once unless ``held=False``) until ``release``, so that admission counts requests between their admission
    and their queue. ``release`` is final (a later ``hold`` counts nothing) and may come twice."""

    __slots__ = ("_target", "_counts", "_batchable")

    def __init__(self, counts: dict[bool, int], batchable: bool, held: bool = True):
        self._target: Optional[dict[bool, int]] = counts
        self._counts: Optional[dict[bool, int]] = None  # the counts it holds one of, while it does
        self._batchable = batchable
        if held:
            self.hold()

    def hold(self) -> None:
        if self._target is not None and self._counts is None:
            self._counts = self._target
            self._counts[self._batchable] += 1

    def release(self) -> None:
        if self._counts is not None:
            self._counts[self._batchable] -= 1
        self._counts = self._target = None

    def counted_as(self, batchable: bool) -> None:
        """Count it as ``batchable`` (or not) from now on: what the route it reached says it is."""
        if self._counts is not None and batchable != self._batchable:
            self._counts[self._batchable] -= 1
            self._counts[batchable] += 1
        self._batchable = batchable

    def counted_in(self, counts: dict[bool, int]) -> Optional[bool]:
        """The kind (batchable or not) this reservation holds in ``counts``; None when it holds none there."""
        return self._batchable if self._counts is counts else None


# The reservation of a request admitted from its headers (front_door.py): it counts as waiting from the moment its
# whole body is here (not while a slow client sends it: such clients would otherwise fill the wait at will) until it
# queues (Deployment.call releases it then; hold_early_reservation when the request ends before), through its
# body's parsing and its images' decoding. Its own later admissions do not count it against itself.
_early_reservation: contextvars.ContextVar[Optional[Reservation]] = contextvars.ContextVar("early_reservation",
                                                                                          default=None)


def early_reservation() -> Optional[Reservation]:
    return _early_reservation.get()


def release_early_reservation() -> None:
    reservation = _early_reservation.get()
    if reservation is not None:
        reservation.release()


@contextmanager
def hold_early_reservation(deployment, receive: Receive) -> Iterator[Receive]:
    """For the block (the rest of a request admitted from its headers): a reservation of ``deployment``'s held from
    the last chunk of the request's body (read through the ``receive`` yielded) until the request queues or, at the
    latest, the block ends (a request refused before it queued: a 422, …)."""
    reservation = deployment.reserve(True, held=False)

    async def receive_then_hold() -> Message:
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            reservation.hold()
        return message

    token = _early_reservation.set(reservation)
    try:
        yield receive_then_hold
    finally:
        reservation.release()
        _early_reservation.reset(token)


_pacing_jitter = random.Random()  # spreads held refusals (not a model's randomness, which is seeded per request)


class RefusalPacer:
    """Holds overload refusals back before they are sent (``VLA_SHED_PACING_S``, ``VLA_SHED_RETRIES_PER_S``).

    Turning a request away costs the event loop a fraction of a millisecond; clients that retry at once on a 503
    would otherwise send thousands a second and take the interpreter from the model they are waiting for. Held
    back, a refusal comes after between half of a period and all of it, at random (clients refused together must
    not all come back together), never past the request's deadline, with ``Retry-After`` less what was waited.

    The period is ``pacing_s``: each client that retries at once comes back about once per period. That also
    bounds what such clients send in all (96 of them, about 128 requests a second), and a model of about that
    capacity waits for them whenever the refusals bunch up (README, "Reliability suite"). With ``retries_per_s``,
    the period is instead the longer of the wait that refused the request (about when there may be room) and the
    held refusals ÷ ``retries_per_s``, at most ``pacing_s``: however many clients retry at once, they come back
    about 4/3 × ``retries_per_s`` times a second in all (a hold is three quarters of a period on average); a
    refusal of unknown wait is held the whole period ``pacing_s``. The event loop then refuses more: where it
    shares the interpreter with a model (no model process), that slowed the model more than the retries fed it.
    A hold costs a timer, not a thread; the request's image pixels are given back first, and its body is not read
    meanwhile where the refusal came before it."""

    def __init__(self, pacing_s: float, retries_per_s: float):
        self.pacing_s, self.retries_per_s = pacing_s, retries_per_s
        self.held = 0  # refusals being held back now (only the event loop counts them)

    def period(self, wait_s: Optional[float]) -> float:
        """How long a refusal is held at most, with ``self.held`` held (itself included) and ``wait_s`` the
        expected wait that refused it (None: unknown)."""
        if wait_s is None or self.retries_per_s <= 0:
            return self.pacing_s
        return min(self.pacing_s, max(wait_s, self.held / self.retries_per_s))

    async def hold(self, exc: ApiError) -> Optional[int]:
        """The ``Retry-After`` of a refusal, after holding it back when it is an overload refusal."""
        if exc.type != "overloaded" or self.pacing_s <= 0:
            return exc.retry_after
        self.held += 1
        try:
            pause = self.period(exc.wait_s) * (0.5 + 0.5 * _pacing_jitter.random())
            known = [d for d in (exc.deadline, current_deadline.get()) if d is not None]
            if known:
                pause = max(0.0, min(pause, min(known) - time.perf_counter()))
            # The refused request gives back what it holds before it waits: its decoded images' pixels, and the
            # reservation that counts it as waiting (admitted from its headers, refused after), which would
            # otherwise lengthen the expected wait of the requests after it for the whole hold.
            release_pixels()
            release_early_reservation()
            await asyncio.sleep(pause)
        finally:
            self.held -= 1
        return max(0, (exc.retry_after or 1) - math.floor(pause))


class Deadlines:
    """Reads ``X-Request-Timeout`` into the request's deadline; a malformed value is refused (400)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope.get("headers") or () if name == HEADER), None)
        if raw is None:
            await self.app(scope, receive, send)
            return
        try:
            timeout = parse_timeout(raw)
        except ValueError as e:
            await error_response(Request(scope), 400, str(e), "X-Request-Timeout")(scope, receive, send)
            return
        arrived = (scope.get("state") or {}).get("received_at", time.perf_counter())  # (RequestMetrics: its arrival)
        token = current_deadline.set(arrived + timeout)
        try:
            await self.app(scope, receive, send)
        finally:
            current_deadline.reset(token)
