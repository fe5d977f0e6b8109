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
    499 that nobody reads (the access log and ``vla_requests_abandoned_total`` count it)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and not watcher.done():  # this request itself was cancelled
            task.cancel()
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    request.app.state.metrics.abandoned.labels(deployment).inc()
    raise ApiError(CLIENT_CLOSED, "the client disconnected before its reply; its model call was dropped",
                   type="client_closed")
