"""Work for clients that have gone: a request whose HTTP client disconnects while it waits for its model call
is abandoned, and a call still queued is dropped unrun (the executor skips cancelled jobs). A call already
running cannot be interrupted; its result is discarded. Robot sessions are not abandoned this way: their
step must finish or never start, so their lock holds until the model thread is done (sessions.py)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

from service.errors import ApiError

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first: never sent, only logged


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: what is left to receive is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_client_leaves(request: Request, work: Awaitable[T], deployment: str) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled and the request ends with a
    499 that nobody reads (the access log and ``vla_requests_abandoned_total`` count it).

    ``work`` is awaited in the request's own task, and the watcher cancels that task when the client goes. (Awaiting
    it as a task of its own beside the watcher, with ``asyncio.wait``, put two more turns of the event loop between
    the model's result and the reply: under overload, with the loop busy turning requests away, each turn took
    about half a millisecond.) A client that leaves in the very turn its result arrives gets the 499 too (the
    result is dropped; the client is gone either way). A request that the server cancels (its drain) stays
    cancelled, even when its client leaves at the same moment (on Python 3.11+, which counts cancellations; 3.10
    cannot tell the two apart and answers the 499)."""
    request_task = asyncio.current_task()
    state = {"waiting": True, "left": False}

    def cancel_when_gone(watcher: asyncio.Future) -> None:
        if state["waiting"] and not watcher.cancelled() and watcher.exception() is None:
            state["left"] = True
            request_task.cancel()

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(cancel_when_gone)
    try:
        return await work
    except asyncio.CancelledError:
        if not state["left"]:  # this request itself was cancelled (the server stops)
            raise
        # our own cancellation, answered here (a 499), unless the server cancelled the request too
        if hasattr(request_task, "uncancel") and request_task.uncancel() > 0:
            raise
    finally:
        state["waiting"] = False  # from now on a disconnect changes nothing (its callback may still be queued)
        watcher.cancel()
    request.app.state.metrics.abandoned.labels(deployment).inc()
    raise ApiError(CLIENT_CLOSED, "the client disconnected before its reply; its model call was dropped",
                   type="client_closed")
