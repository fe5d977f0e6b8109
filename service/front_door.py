"""The app's front door: a request its deployment would refuse anyway is refused before the rest of the app runs.

Under overload most requests are refused (503 with ``Retry-After``), and they share the event loop with the
requests being served: on the 2-core CPU, 4× the demo policy's capacity is some 2,000 refusals a second. Through
the whole app (FastAPI, Starlette's middleware stack, request ids, metrics, deadlines, keys) a refusal cost the
event loop about 150 µs of CPU, 225 µs held back for pacing, so refusing took most of the core the served requests
needed; here, ahead of all that, about 45 µs (a scratch server answering only refusals, 32 keep-alive clients,
2026-12-05; ``bench/overload.py`` shows the server's CPU per request under overload).

The door acts on ``POST /predict/{type}`` and ``/evaluate/{type}`` whose type has one deployment here (the path
names it before the body is read). It makes the checks the app would make first, cheaply, and leaves every
doubt to the app: a request without a valid API key, or with a malformed ``X-Request-Timeout``, goes on to get
its 401 or 400 there. Then it admits the request (``Deployment.admit``, stage ``body``: the expected wait against
the deadline and ``max_queue_ms``). Refused, it answers here in the one error shape, with the request's id (in
``X-Request-ID`` and the body), counted and logged as the app counts and logs every request
(``metrics.record_request``), held back first for pacing (``deadlines.paced``); its body is never read.
Admitted, the request counts as waiting (a reservation) until it queues, and goes on into the app.
"""

from __future__ import annotations

import time
from typing import Optional

from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import ApiKeys, app_path
from service.codecs import encode_response
from service.deadlines import HEADER as TIMEOUT_HEADER
from service.deadlines import current_deadline, hold_early_reservation, paced, parse_timeout
from service.errors import ApiError, error_body
from service.request_ids import HEADER as REQUEST_ID_HEADER
from service.request_ids import current_request_id, request_id_of


class FrontDoor:
    """ASGI: ``app`` behind the door (the app's own ``__call__``, see ``ServeApp``)."""

    def __init__(self, app: ASGIApp, manager, metrics, pacing_s: float = 0.0, keys: Optional[ApiKeys] = None):
        self.app = app
        self.manager = manager
        self.metrics = metrics
        self.pacing_s = pacing_s  # overload refusals are held back this long (deadlines.paced)
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        deployment = self._deployment_for(app_path(scope))
        headers = dict(scope.get("headers") or ()) if deployment is not None else {}
        if deployment is None or not self._authorized(headers):
            await self.app(scope, receive, send)
            return
        deadline = None
        raw_timeout = headers.get(TIMEOUT_HEADER)
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
            await self._refuse(scope, receive, send, headers, e, started)
            return
        except Exception:  # not the door's to answer: the app admits the request again and answers what it meets
            await self.app(scope, receive, send)
            return
        finally:
            current_deadline.reset(token)  # (the app's Deadlines sets it again for the request)
        with hold_early_reservation(deployment):  # counted as waiting until it queues
            await self.app(scope, receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.keys is None:
            return True
        refusal, _ = self.keys.check(headers.get(b"authorization", b"").decode("latin-1"))
        return refusal is None

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], e: ApiError,
                      started: float) -> None:
        request_id = request_id_of(scope)
        token = current_request_id.set(request_id)  # in the body, and on the access log line
        status = e.status
        try:
            retry_after = await paced(e, self.pacing_s)
            reply_headers = {REQUEST_ID_HEADER.decode(): request_id}
            if retry_after is not None:
                reply_headers["Retry-After"] = str(retry_after)
            if headers.get(b"expect", b"").lower() == b"100-continue":
                reply_headers["Connection"] = "close"  # the body was never asked for: this connection ends
            response = encode_response(error_body(status, e.message, e.field, e.type, scope),
                                       headers.get(b"accept", b"").decode("latin-1"), status_code=status,
                                       headers=reply_headers)
            await response(scope, receive, send)
        finally:
            self.metrics.record_request(scope["method"], scope["path"], app_path(scope), status,
                                        time.perf_counter() - started)
            current_request_id.reset(token)

    def _deployment_for(self, path: str):
        _, kind, model_type, *rest = path.split("/") + ["", ""]
        if kind not in ("predict", "evaluate") or not model_type or any(rest):
            return None
        if any(d.model_type is None for d in self.manager.deployments.values()):
            return None  # one still loading may be of this type too: the body's `model` decides, later
        try:
            return self.manager.resolve(model_type, None)
        except ApiError:  # unknown type, or several deployments of it: the body's `model` decides, later
            return None
