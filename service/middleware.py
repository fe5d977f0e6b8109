"""ASGI middleware: body size cap and msgpack bodies (the access log line is ``metrics.RequestMetrics``'s).

It runs before routing, so an oversized or undecodable body is refused before any
model work is queued. A msgpack body is unpacked here into the values JSON would give
(bytes kept as bytes) and handed to the route through the ASGI scope; ``DecodedBodyRoute``
makes FastAPI validate those values instead of parsing the body again, so every route
validates one form of the body whatever the wire format.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Optional
from urllib.parse import urlsplit

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.codecs import (MAX_BODY_KEYS, DecodeError, NotMsgpack, TooManyKeys, decode_off_loop, encode_response,
                            is_msgpack, InvalidText, TooDeep, loads_json, unpack_message_off_loop)
from service.errors import error_body
from service.images import PixelBudget

BODY = "vla.body"  # scope key: the whole body, as the middleware read it
DECODED_BODY = "vla.decoded_body"  # scope key: the body's values, already unpacked by the middleware
BYTES_KEYS = "vla.bytes_keys"  # scope key: the msgpack body's arrays used openpi's bytes keys


def reply_in_bytes_keys(request: Request) -> bool:
    """Whether a reply's msgpack arrays take openpi's bytes keys: when the request's arrays did (an openpi
    ``msgpack_numpy`` peer recognizes no other spelling); str keys otherwise."""
    return request.scope.get(BYTES_KEYS, False)


class DecodedBodyRequest(Request):
    """A request whose body is the one the middleware read (not streamed and joined again: a copy of
    every camera frame) and whose ``json()`` is the middleware's unpacked msgpack body when there is one."""

    def __init__(self, scope: Scope, receive: Receive):
        super().__init__(scope, receive)
        if BODY in scope:
            self._body = scope[BODY]

    async def json(self) -> Any:
        if DECODED_BODY in self.scope:
            return self.scope[DECODED_BODY]
        return await super().json()


class DecodedBodyRoute(APIRoute):
    """The route class of every API route: FastAPI reads the body through ``DecodedBodyRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(DecodedBodyRequest(request.scope, request.receive))

        return route_handler


# What a browser sends across origins without asking the server first (no CORS preflight); this server reads the
# first three as JSON (for curl -d and plain clients), so from another origin's page they are refused.
SIMPLE_BODY_TYPES = ("", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_key(origin: str) -> Optional[tuple[str, str]]:
    """An origin as browsers compare them: (scheme, host[:port]) in lower case, the scheme's default port left out;
    None for ``null`` or anything that is no origin."""
    try:
        parts = urlsplit(origin.strip().rstrip("/"))
        port = parts.port
    except ValueError:  # a port that is no number
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host  # (IPv6)
    return scheme, host if port in (None, DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"


class OriginCheck:
    """Which web pages may send what a browser sends across origins without asking the server first (a body typed
    as text or a form; a websocket): on a server without API keys, its own pages (``Origin`` naming its ``Host``)
    and ``allowed`` ones (``*``: any). With keys nothing is refused for its origin: such a request cannot carry
    a key, and is refused without one. Robots, curl and SDKs send no ``Origin`` (or their own host's)."""

    def __init__(self, enabled: bool, allowed: frozenset = frozenset()):
        self.enabled = enabled and "*" not in allowed
        self.allowed = allowed  # origin_key()s

    def refuses(self, origin: Optional[str], host: str) -> bool:
        if not self.enabled or origin is None:
            return False
        key = origin_key(origin)
        if key is None:  # "null" (a sandboxed page, a file) or garbage
            return True
        return key not in self.allowed and key != origin_key(f"{key[0]}://{host}")  # (this server's own pages)

    def form_from_elsewhere(self, headers: dict) -> Optional[str]:
        """The ``Origin`` of a request with a simple body type that this check refuses (raw ASGI headers)."""
        origin = headers.get(b"origin")
        media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if origin is None or media not in SIMPLE_BODY_TYPES:
            return None
        text = origin.decode("latin-1")
        return text if self.refuses(text, headers.get(b"host", b"").decode("latin-1")) else None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class BodyCodecMiddleware:
    """Also opens the request's lease on the app's decoded-pixel budget (``images.PixelBudget``): a body is
    where images come from, and the lease ends with the reply."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_body_keys: int = MAX_BODY_KEYS,
                 pixels: Optional[PixelBudget] = None, *, origins: OriginCheck):  # (no default: none fails open)
        self.app = app
        self.origins = origins
        self.max_body_bytes = max_body_bytes
        self.max_body_keys = max_body_keys
        self.pixels = pixels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            await self._with_decoded_body(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _with_decoded_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        accept = headers.get(b"accept", b"").decode("latin-1")
        origin = self.origins.form_from_elsewhere(headers)
        if origin is not None:
            await self._refuse(scope, receive, send, accept, 415,
                               f"a body typed as a form or as text from a page of another origin ({origin[:80]!r}) "
                               "is not taken: a browser sends such a request without asking this server first, so "
                               "any web page could drive a robot through it; send application/json or "
                               "application/msgpack (or list the origin in VLA_ALLOWED_ORIGINS)")
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send, accept, 413, self._too_large(int(declared)))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, accept, 413, self._too_large(size))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").decode("latin-1").strip().lower()
        decoded: dict[str, Any] = {BODY: body}
        if is_msgpack(content_type):
            try:
                unpacked = await unpack_message_off_loop(body, self.max_body_keys)
                decoded[DECODED_BODY], decoded[BYTES_KEYS] = unpacked.value, unpacked.bytes_keys
            except DecodeError as e:
                status = 413 if isinstance(e, TooManyKeys) else 400 if isinstance(e, NotMsgpack) else 422
                await self._refuse(scope, receive, send, accept, status, str(e), e.field)
                return
            content_type = "application/json"  # FastAPI reads a JSON-typed body through request.json()
        elif not content_type or content_type.startswith(("text/plain", "application/x-www-form-urlencoded")):
            content_type = "application/json"  # JSON is the default body format (curl -d sends form-encoded)
        elif not _is_json(content_type):
            await self._refuse(scope, receive, send, accept, 415,
                               f"Content-Type {content_type.split(';')[0]!r} is not accepted; send application/json "
                               "or application/msgpack")
            return
        if DECODED_BODY not in decoded and body:  # JSON: parsed here, with its keys counted (big bodies off the loop)
            try:
                decoded[DECODED_BODY] = await decode_off_loop(loads_json, body, self.max_body_keys)
            except TooManyKeys as e:
                await self._refuse(scope, receive, send, accept, 413, str(e))
                return
            except InvalidText as e:
                await self._refuse(scope, receive, send, accept, 422, str(e), e.field)
                return
            except TooDeep as e:
                await self._refuse(scope, receive, send, accept, 400, str(e))
                return
            except UnicodeDecodeError as e:  # (FastAPI would say only that the body could not be parsed)
                await self._refuse(scope, receive, send, accept, 400,
                                   f"the body is not UTF-8 text (byte {e.start} of {len(body)}): a JSON body is UTF-8; "
                                   "send binary data as msgpack (Content-Type: application/msgpack)")
                return
            except ValueError:  # not JSON: FastAPI parses it again and reports where (its usual 422)
                pass
        new_headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        new_headers += [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
        # In place, not a copy: the route Starlette matches (scope["route"]) is then seen by the outer layers
        # (the request metrics label requests by it).
        scope.update({"headers": new_headers, **decoded})
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if self.pixels is None:
            await self.app(scope, replay, send)
            return
        with self.pixels.lease():
            await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return (f"request body is {size} bytes; this server accepts at most {self.max_body_bytes} "
                f"(setting VLA_MAX_BODY_BYTES)")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, accept: str, status: int, message: str,
                      field: Optional[str] = None) -> None:
        await encode_response(error_body(status, message, field, scope=scope), accept, status_code=status)(
            scope, receive, send)
