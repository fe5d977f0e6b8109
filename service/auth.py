"""API keys: with keys configured, every request needs one, except the health probes and the API docs.

A client sends ``Authorization: Api-Key <key>`` (openpi's robot clients) or
``Authorization: Bearer <key>`` (OpenAI clients and most HTTP tools); the websocket takes
the same header on its upgrade request. Keys come from ``VLA_API_KEYS`` (comma-separated)
and ``VLA_API_KEYS_FILE`` (one per line, for Docker and Kubernetes secrets); none: no
authentication, as on a loopback-only dev server.

The admin API (``/admin/``) takes the admin keys instead (``VLA_ADMIN_KEYS``), and only them.

The check is an outermost ASGI middleware, so a request without a valid key is answered
before its body is read or decoded. Keys are compared as SHA-256 digests with
``hmac.compare_digest`` (no timing hint about a key's bytes or length), never logged, and
never echoed in an error.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Iterable, Optional

from starlette.types import ASGIApp, Receive, Scope, Send

from service.codecs import encode_response
from service.errors import deny_upgrade, error_body
from service.request_ids import loggable_path

logger = logging.getLogger("service.auth")

SCHEMES = ("api-key", "bearer")  # case-insensitive, as HTTP auth schemes are
# Liveness/readiness probes (Docker's HEALTHCHECK, Kubernetes) and the API docs, which describe this
# software, not a deployment, and a browser cannot send a header to.
# "/" is the page to try the models: it sends the key its user types in.
PUBLIC_PATHS = frozenset({"/health/live", "/health/ready", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/openapi.json", "/"})
CALLER = "vla.caller"  # scope key: the id of the API key a request came with (None without keys)
# The docs pages' and the page's scripts and styles.
PUBLIC_PREFIXES = ("/docs-assets/", "/static/")
ADMIN_PREFIX = "/admin/"  # the admin API: the admin keys, and no others


def read_keys(keys: Optional[str], keys_file: Optional[Path]) -> list[str]:
    """The configured keys: ``keys`` split on commas, then ``keys_file``'s lines (blank lines and ``#``
    comments skipped), whitespace stripped."""
    found = [k.strip() for k in (keys or "").split(",") if k.strip()]
    if keys_file is not None:
        try:
            lines = Path(keys_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"api_keys_file {keys_file}: {e.strerror or e}; give a readable file with one key "
                             "per line") from None
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for key in found:
        if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            raise ValueError("an API key holds whitespace, a control or a non-ASCII character; keys are single "
                             "printable ASCII tokens (check VLA_API_KEYS and VLA_API_KEYS_FILE)")
    return found


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        if not self._digests:
            raise ValueError("ApiKeys needs at least one key")

    def refusal(self, authorization: Optional[str]) -> Optional[str]:
        """None when ``authorization`` (the header's value) carries a configured key; else why not."""
        return self.check(authorization)[0]

    def check(self, authorization: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """(why the header is refused, or None; the caller's id when it is accepted). The id is a short hash of
        the key: what resources made with the key (robot sessions) are bound to, never the key itself."""
        if not authorization:
            return ("this server requires an API key: send the header 'Authorization: Api-Key <key>' or "
                    "'Authorization: Bearer <key>'"), None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() not in SCHEMES or not key.strip():  # the header is not quoted: it may be a bare key
            return "unsupported Authorization header; send 'Authorization: Api-Key <key>' or 'Bearer <key>'", None
        digest = hashlib.sha256(key.strip().encode()).digest()
        matched = False
        for known in self._digests:  # every key compared, so the time does not say which one matched
            matched |= hmac.compare_digest(digest, known)
        return (None, digest.hex()[:16]) if matched else ("the API key is not valid for this server", None)


def caller_of(scope: Scope) -> Optional[str]:
    """The id of the key a request (or websocket) came with; None when the server has no keys."""
    return scope.get(CALLER)


def app_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the ``root_path`` a proxy or Ray's ``route_prefix`` put
    in front (Starlette routes on the path with it stripped)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Refuses HTTP requests (401, the one error shape, ``WWW-Authenticate``) and websocket upgrades (an HTTP
    401 where the server supports ASGI's websocket HTTP response, else a 403) that carry no valid key: an API key
    (``keys``; None: the server takes requests without one), or under ``/admin/`` an admin key (``admin_keys``;
    None: the server has no admin API, and its paths are not found)."""

    def __init__(self, app: ASGIApp, keys: Optional[ApiKeys], admin_keys: Optional[ApiKeys] = None,
                 metrics_public: bool = False):
        self.app = app
        self.keys, self.admin_keys = keys, admin_keys
        self.public_paths = PUBLIC_PATHS | {"/metrics"} if metrics_public else PUBLIC_PATHS

    def needs_key(self, path: str) -> bool:
        """Whether a request to ``path`` is refused without a key (the app's OpenAPI document says which)."""
        return self._keys_for(path)[0] is not None

    def _keys_for(self, path: str) -> tuple[Optional[ApiKeys], str]:
        """The keys a request to ``path`` needs (None: none), and what they are called in a refusal."""
        if path.startswith(ADMIN_PREFIX):
            return self.admin_keys, "admin key"
        if path in self.public_paths or path.startswith(PUBLIC_PREFIXES):
            return None, "API key"
        return self.keys, "API key"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys, kind = self._keys_for(app_path(scope)) if scope["type"] in ("http", "websocket") else (None, "")
        if keys is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        refusal, caller = keys.check(authorization)
        if refusal is None:
            if keys is self.keys:
                scope[CALLER] = caller
            await self.app(scope, receive, send)
            return
        refusal = refusal.replace("API key", kind)
        client = (scope.get("client") or ("?",))[0]
        logger.warning("401 %s %s from %s: %s", scope.get("method", "WEBSOCKET"), loggable_path(scope["path"]), client,
                       "no key" if not authorization else "wrong key or scheme")
        response = encode_response(error_body(401, refusal, scope=scope), headers.get(b"accept", b"").decode("latin-1"),
                                   status_code=401, headers={"WWW-Authenticate": 'Bearer realm="vla-foundry"'})
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        await receive()  # websocket.connect: the upgrade request, answered here instead of accepted
        if not await deny_upgrade(scope, send, response):  # (a close before accepting: a 403)
            await send({"type": "websocket.close", "code": 1008})
