"""The one error a policy server's refusal becomes."""

from __future__ import annotations

from typing import Optional

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
