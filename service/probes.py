"""``GET /health/live`` answered at the outermost layer of the app.

Liveness probes, load balancers' checks and idle robots' pings arrive many times a second, and
they share the event loop with every robot's request: each loop turn runs every connection that
has work, so whatever a cheap request costs on the loop is added to a robot's round trip once per
turn its request needs. Through the whole stack (middleware, routing, FastAPI's endpoint
machinery, an access-log line) a probe cost about 0.3 ms of loop time; here it is two prepared
ASGI messages. Probes are not logged (a line per probe would bury the requests that matter).

A probe that asks for msgpack (``Accept: application/msgpack``) goes on to the route, which answers
in msgpack; the route also keeps ``/health/live`` in the OpenAPI schema.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import app_path
from service.codecs import wants_msgpack

LIVE_PATH = "/health/live"
_BODY = b'{"status":"live"}'
_START = {"type": "http.response.start", "status": 200,
          "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode()),
                      (b"vary", b"Accept")]}  # (the route answers msgpack to a client that prefers it)


class LivenessProbe:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and app_path(scope) == LIVE_PATH
                and not _asks_for_msgpack(scope)):
            await send(_START)
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else _BODY})
            return
        await self.app(scope, receive, send)


def _asks_for_msgpack(scope: Scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name == b"accept":  # (the common probe names neither msgpack nor a wildcard: no parsing)
            return (b"msgpack" in value or b"*" in value) and wants_msgpack(value.decode("latin-1"))
    return False
