"""The one error a policy server's refusal becomes."""

from __future__ import annotations

import os
from typing import Any, Optional

# Websocket close codes the server uses, and the HTTP error type each one corresponds to.
WEBSOCKET_CLOSE_TYPES = {1008: "invalid_value", 1009: "payload_too_large", 1011: "internal_error",
                         1013: "unavailable"}


class PolicyServerError(Exception):
    """The server refused a request or failed on it.

    ``status`` is the HTTP status (422, 409, 503, …) or, over the websocket, the close code (1008 bad
    input, 1009 frame too big, 1011 server fault, 1013 try again later). ``type`` is the server's
    error type (``invalid_value``, ``stale_observation``, ``unavailable``, …), ``field`` the request
    field at fault when the server names one (over the websocket, in the close frame's reason),
    ``retry_after`` the seconds a 503 asks to wait.
    """

    def __init__(self, status: int, type: str, message: str, field: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(f"{status} {type}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.type, self.message, self.field = status, type, message, field
        self.retry_after = retry_after


def server_error(status: int, payload: Any, text: str, retry_after: Optional[float] = None) -> PolicyServerError:
    """The server's error shape (``{"error": {"type", "message", "field"?}}``) as a ``PolicyServerError``; any
    other body (a proxy's HTML page, say) becomes its ``text``."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return PolicyServerError(status, "error", text, retry_after=retry_after)
    return PolicyServerError(status, error.get("type", "error"), error.get("message", ""), error.get("field"),
                             retry_after)


def retry_after_seconds(header: Optional[str]) -> Optional[float]:
    """A ``Retry-After`` header's seconds (None: absent, or an HTTP date, which this server never sends)."""
    return float(header) if header and header.replace(".", "", 1).isdigit() else None


def auth_headers(api_key: Optional[str]) -> dict[str, str]:
    """``Authorization: Api-Key <key>`` for ``api_key``, else for ``$VLA_API_KEY``; none: no header."""
    key = api_key if api_key is not None else os.environ.get("VLA_API_KEY")
    if key and (not key.isascii() or not key.isprintable() or any(c.isspace() for c in key)):
        raise ValueError("the API key holds whitespace, a control or a non-ASCII character; pass the key alone")
    return {"Authorization": f"Api-Key {key}"} if key else {}
