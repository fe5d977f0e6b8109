"""``WebsocketPolicyClient``: a policy deployment over the openpi websocket protocol.

One connection is one robot session: the server keeps its history, so each observation needs
only the current step (one frame per camera, the current proprioception row). Frames are
binary msgpack, arrays in the ``__ndarray__`` convention.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgpack
from websockets.exceptions import ConnectionClosed, InvalidStatus

from vla_foundry_client.arrays import MessagePacker, pack, unpack
from vla_foundry_client.errors import (WEBSOCKET_CLOSE_TYPES, PolicyServerError, auth_headers, retry_after_seconds,
                                      server_error)
from vla_foundry_client.websocket_connection import WebsocketConnection

MiB = 1024 * 1024


def websocket_url(url: str, policy_type: str, model: Optional[str], session_id: Optional[str]) -> str:
    """``url`` as the policy's websocket endpoint: http(s) becomes ws(s), a bare host gets
    ``/ws/{policy_type}``, and ``model`` / ``session_id`` go in the query."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path.strip("/") else f"/ws/{policy_type}"
    query = dict(parse_qsl(parts.query))
    query.update({k: v for k, v in (("model", model), ("session_id", session_id)) if v is not None})
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


class WebsocketPolicyClient:
    """Connects to ``url`` (``ws://host:port`` or ``ws://host:port/ws/diffusion_policy``) and reads
    the deployment's metadata, which the server sends first.

    ``model`` names the deployment (default: the one policy served); ``session_id`` names the
    session (default: one per connection, named by the server); ``max_size`` caps a reply frame;
    ``timeout`` is how long to wait for a reply (None: forever); ``api_key`` goes in the upgrade
    request as ``Authorization: Api-Key <key>`` (default: ``$VLA_API_KEY``; none: no header).
    A refused upgrade raises ``PolicyServerError`` with its HTTP status (and a 503's ``retry_after``); a request
    on a connection the server has closed raises one of type ``connection_closed``: make a new client.
    """

    def __init__(self, url: str, *, model: Optional[str] = None, session_id: Optional[str] = None,
                 max_size: int = 32 * MiB, timeout: Optional[float] = 10.0, policy_type: str = "diffusion_policy",
                 api_key: Optional[str] = None):
        self.url, self.timeout = websocket_url(url, policy_type, model, session_id), timeout
        self._packer = MessagePacker()
        self._lock = threading.Lock()
        # One connection read in this thread (no reader thread to hand replies over), without per-message
        # compression (deflating camera frames costs milliseconds and saves little).
        try:
            self._ws = WebsocketConnection(self.url, max_size=max_size, open_timeout=timeout,
                                           headers=auth_headers(api_key))
        except InvalidStatus as e:  # refused before the upgrade: a wrong path or API key, say
            status = e.response.status_code
            body = e.response.body.decode("utf-8", "replace")[:500] if e.response.body else ""
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            raise server_error(status, payload, body or f"websocket upgrade refused with HTTP {status}",
                               retry_after_seconds(e.response.headers.get("Retry-After"))) from e
        try:
            self.metadata: dict[str, Any] = self._receive()
        except BaseException:
            self._ws.close()
            raise
        self.session_id: str = self.metadata["session_id"]

    def infer(self, observation: dict[str, Any], **request_fields: Any) -> dict[str, Any]:
        """An action chunk for ``observation``.

        ``observation`` is the nested HTTP form (``images``, ``lowdim``, ``language_instruction``)
        or openpi's flat keys (``observation/<camera>``, ``observation/state``, ``prompt``).
        ``request_fields``: ``seed``, ``step``, ``timestamp``, ``num_inference_steps``, ``noise``,
        ``past_actions``. The reply's ``actions`` is a float32 [chunk_length, A] array whose row 0 is the
        action to execute now; execute ``metadata["action_horizon"]`` of them (the deployment's
        ``n_action_steps``) before the next observation, or send ``step`` (the session counts the steps taken
        that way); ``server_timing`` has ``infer_ms`` (and ``prev_total_ms``).
        """
        nested = "images" in observation or "lowdim" in observation
        body = {"observation": observation, **request_fields} if nested else {**observation, **request_fields}
        return self._exchange(body)

    def reset(self, seed: Optional[int] = None) -> dict[str, Any]:
        """Start a new episode: the session forgets its history (``seed`` seeds its next plans)."""
        return self._exchange({"endpoint": "reset", **({} if seed is None else {"seed": seed})})

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "WebsocketPolicyClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:  # a reply belongs to the request before it: one exchange at a time
            was_open = self._ws.open
            try:
                self._ws.send(self._packer.pack(pack(message, binary=True)))
            except ConnectionClosed as e:
                # Closed while this request was sent (a frame over the server's limit: 1009), or before it, when
                # its close was about an earlier request
                raise (_closed_error(e, "the connection is closed") if was_open else _closed_earlier(e)) from e
            return self._receive()

    def _receive(self) -> dict[str, Any]:
        """The next binary frame, decoded; the server's error (a text frame, then the close) raised."""
        try:
            frame = self._ws.recv(timeout=self.timeout)
        except ConnectionClosed as e:
            raise _closed_error(e, "the server closed the connection") from e
        except TimeoutError:
            # A late reply would be taken for the answer to the next request: this connection is done.
            self._ws.close()
            raise TimeoutError(f"no reply from {self.url} within {self.timeout} s; the connection is closed") from None
        if isinstance(frame, str):  # an error message; the close frame with its code follows
            try:
                self._ws.recv(timeout=self.timeout)
            except ConnectionClosed as e:
                raise _closed_error(e, frame) from None
            except TimeoutError:
                pass
            self._ws.close()
            raise PolicyServerError(1008, "invalid_value", frame)
        return unpack(msgpack.unpackb(frame, raw=False))


def _closed_earlier(closed: ConnectionClosed) -> PolicyServerError:
    """A request sent on a connection already closed: its close code, but neither that close's field nor its type
    (they were about the request that closed it, not this one); reconnect with a new client."""
    earlier = _closed_error(closed, "")
    why = f"{earlier.type}" + (f", field {earlier.field}" if earlier.field else "")
    return PolicyServerError(earlier.status, "connection_closed", f"the connection was closed earlier (close "
                             f"{earlier.status}: {why}); make a new client to reconnect")


def _closed_error(closed: ConnectionClosed, message: str) -> PolicyServerError:
    code = closed.rcvd.code if closed.rcvd is not None else 1006  # 1006: closed without a close frame
    reason = closed.rcvd.reason if closed.rcvd is not None and closed.rcvd.reason else ""
    field = None
    if reason.startswith("field="):  # the server names the field at fault in the close reason
        field, reason = reason[len("field="):], ""
    return PolicyServerError(code, WEBSOCKET_CLOSE_TYPES.get(code, "connection_closed"),
                             message + (f" ({reason})" if reason and reason not in message else ""), field)
