"""The app's front door: a request its deployment would refuse anyway is refused before the rest of the app runs.

Under overload most requests are refused (503 with ``Retry-After``), and they share the event loop with the
requests being served: on the 2-core CPU, 4× the demo policy's capacity is some 2,000 refusals a second. Through
the whole app (FastAPI, Starlette's middleware stack, request ids, metrics, deadlines, keys) a refusal took about
150 µs of the event loop's CPU; ahead of all that, 135-139 µs, most of it uvicorn's HTTP and the reply itself (a
scratch server answering only refusals to 32 keep-alive clients, 2026-12-05; bare uvicorn answering a fixed 503
took 26 µs). ``bench/overload.py`` shows the server's CPU per request under overload.

The door acts on ``POST /predict/{type}`` and ``/evaluate/{type}`` whose type has one deployment here (the path
names it before the body is read). It makes the checks the app would make first, cheaply, and leaves every
doubt to the app: a request without a valid API key, or with a malformed ``X-Request-Timeout``, goes on to get
its 401 or 400 there. Then it admits the request (``Deployment.admit``, stage ``body``: the expected wait against
the deadline, ``max_queue_ms`` and ``max_queue_calls``). Refused, it answers here in the one error shape, with
the request's id (in ``X-Request-ID`` and the body), counted and logged as the app counts and logs every request
(``metrics.record_request``; at most ``VLA_LOG_REFUSALS_PER_S`` lines a second, ``RefusalLines``), held back
first for pacing (``deadlines.RefusalPacer``); its body is never read.
Admitted, the request goes on into the app, and counts as waiting (a reservation) from the end of its body until
it queues.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import ApiKeys, app_path
from service.codecs import encode_response
from service.deadlines import HEADER as TIMEOUT_HEADER
from service.deadlines import RefusalPacer, current_deadline, hold_early_reservation, parse_timeout
from service.errors import ApiError, error_body
from service.metrics import access_log
from service.request_ids import HEADER as REQUEST_ID_HEADER
from service.request_ids import current_request_id, request_id_of


class FrontDoor:
    """ASGI: ``app`` behind the door (the app's own ``__call__``, see ``ServeApp``)."""

    def __init__(self, app: ASGIApp, manager, metrics, pacer: Optional[RefusalPacer] = None,
                 keys: Optional[ApiKeys] = None, log_refusals_per_s: Optional[int] = None):
        self.app = app
        self.manager = manager
        self.metrics = metrics
        self.pacer = pacer or RefusalPacer(0.0, 0.0)  # holds overload refusals back (the app's; none: sent at once)
        self.keys = keys
        self.lines = None if log_refusals_per_s is None else RefusalLines(log_refusals_per_s)  # None: a line each

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        deployment = self._deployment_for(app_path(scope))
        if deployment is None or not self._authorized(scope):
            await self.app(scope, receive, send)
            return
        deadline = None
        raw_timeout = _first(scope, TIMEOUT_HEADER)  # (the first, as the app's Deadlines reads it)
        if raw_timeout is not None:
            try:
                deadline = started + parse_timeout(raw_timeout)
            except ValueError:  # the app answers it (400, naming the value)
                await self.app(scope, receive, send)
                return
        token = current_deadline.set(deadline)
        try:
            deployment.admit(stage="body")
        except ApiError as e:
            await self._refuse(scope, receive, send, e, started)
            return
        except Exception:  # not the door's to answer: the app admits the request again and answers what it meets
            await self.app(scope, receive, send)
            return
        finally:
            current_deadline.reset(token)  # (the app's Deadlines sets it again for the request)
        with hold_early_reservation(deployment, receive) as receive_then_hold:  # waiting from its body's end
            await self.app(scope, receive_then_hold, send)

    def _authorized(self, scope: Scope) -> bool:
        if self.keys is None:
            return True
        # (the last Authorization header, as the app's ApiKeyMiddleware reads it)
        authorization = dict(scope.get("headers") or ()).get(b"authorization", b"")
        return self.keys.check(authorization.decode("latin-1"))[0] is None

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, e: ApiError, started: float) -> None:
        request_id = request_id_of(scope)
        token = current_request_id.set(request_id)  # in the body, and on the access log line
        status = e.status
        try:
            try:
                retry_after = await self.pacer.hold(e)
            except asyncio.CancelledError:  # held when the server's drain ran out: answered at once instead
                retry_after = e.retry_after
            reply_headers = {REQUEST_ID_HEADER.decode(): request_id}
            if retry_after is not None:
                reply_headers["Retry-After"] = str(retry_after)
            if (_first(scope, b"expect") or b"").lower() == b"100-continue":
                reply_headers["Connection"] = "close"  # the body was never asked for: this connection ends
            response = encode_response(error_body(status, e.message, e.field, e.type, scope),
                                       (_first(scope, b"accept") or b"").decode("latin-1"), status_code=status,
                                       headers=reply_headers)
            await response(scope, receive, send)
        finally:
            self.metrics.record_request(scope["method"], scope["path"], app_path(scope), status,
                                        time.perf_counter() - started, log=self.lines is None or self.lines.take())
            current_request_id.reset(token)

    def _deployment_for(self, path: str):
        parts = path.split("/")  # exactly "", kind, type: any other path (a trailing slash too) is the app's to answer
        if len(parts) != 3 or parts[0] or parts[1] not in ("predict", "evaluate") or not parts[2]:
            return None
        model_type = parts[2]
        if any(d.model_type is None for d in self.manager.deployments.values()):
            return None  # one still loading may be of this type too: the body's `model` decides, later
        try:
            return self.manager.resolve(model_type, None)
        except ApiError:  # unknown type, or several deployments of it: the body's `model` decides, later
            return None


class RefusalLines:
    """The door's refusals get at most ``per_s`` access lines a second; those past that are counted, and one line says
    how many when their second is over (on a timer: said even when no refusal follows). A line each took about half of
    what a refusal costs the app: 100-129 µs of CPU per refusal with a line each, 56-63 µs sampled
    (``bench/refusal_cost.py``, 2-core CPU, 2026-12-05); under an open loop at 4× the demo policy's capacity, some
    1,500 refusals a second, that is 7-10 % of a core taken from the requests the event loop serves. The metrics
    count every refusal."""

    def __init__(self, per_s: int):
        self.per_s = per_s
        self.second_ends = 0.0  # time.monotonic() when the current second of lines ends
        self.logged = 0  # lines given in the current second
        self.unlogged = 0  # refusals without a line, not yet said
        self._timer_loop: Optional[asyncio.AbstractEventLoop] = None  # the loop whose timer will say them

    def take(self) -> bool:
        """Whether this refusal gets its line (called from the event loop)."""
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        if now >= self.second_ends:
            if self.unlogged and self._timer_loop is not loop:  # the timer's loop has ended (the app served anew)
                self._say()
            self.second_ends, self.logged = now + 1.0, 0
        if self.logged < self.per_s:
            self.logged += 1
            return True
        if self.unlogged == 0:
            self._timer_loop = loop
            loop.call_later(self.second_ends - now, self._say)
        self.unlogged += 1
        return False

    def _say(self) -> None:
        count, self.unlogged, self._timer_loop = self.unlogged, 0, None
        if count:
            access_log.info("%d refusals before the body were not logged, one line each, since the last such line "
                            "(VLA_LOG_REFUSALS_PER_S=%d); vla_http_requests_total counts every one", count,
                            self.per_s, extra={"refusals_not_logged": count})


def _first(scope: Scope, name: bytes) -> Optional[bytes]:
    """The first value of header ``name`` (as Starlette's ``Request.headers`` reads it), or None."""
    return next((value for key, value in scope.get("headers") or () if key == name), None)
