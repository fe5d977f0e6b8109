"""Read timeouts for HTTP/1.1 connections: how long a client may take to send its headers and its body.

uvicorn bounds only the idle time between requests on a keep-alive connection
(``timeout_keep_alive``). A connection that opens and sends nothing, half a request line, or a
body a byte at a time stays open as long as the client likes, and each one holds a socket, a
file descriptor and (for bodies) a request task: a few hundred such clients exhaust a server
that is otherwise idle (slowloris). This protocol (uvicorn's httptools protocol with two timers)
bounds both reads, as nginx's ``client_header_timeout`` and ``client_body_timeout`` do:

- headers: from the connection's opening (or the first byte of the next request on a keep-alive
  connection) until the request's headers are complete, at most ``header_timeout_s``. A client
  that sent nothing is closed silently (browsers open spare connections); one that sent part of a
  request gets 408 and the connection closes.
- body: from the end of the headers until the last byte of the body, at most ``body_timeout_s``
  in all (not per chunk: a trickle of one byte a second must not reset it). The reply is 408 and
  the connection closes; the request's handler sees the client disconnect, so nothing runs for it.

Both 408s carry the one error shape (``type`` ``request_timeout``) and ``Connection: close``.
Neither counts against the client while a request before this one on the connection is still being
answered (a pipelined request waits, its body mostly unread: uvicorn pauses reading, and a reply
to it must come after the one before), nor while the server has stopped reading: a timer that
fires then starts over, and it starts over once the request before is answered.
Websocket connections leave these timers once upgraded (the websocket protocol pings on its own).
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable, Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_body


def read_timeout_reply(message: str) -> bytes:
    """A complete HTTP/1.1 408 reply in the one error shape, closing the connection."""
    body = json.dumps(error_body(408, message, type="request_timeout")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def read_timeout_protocol(header_timeout_s: float, body_timeout_s: float,
                          on_timeout: Callable[[str], None] = lambda phase: None) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``; ``on_timeout("headers" | "body")`` is called for
    each connection closed by a timer (the server counts them in ``vla_read_timeouts_total``)."""

    class ReadTimeoutProtocol(HttpToolsProtocol):
        _timer: Optional[asyncio.TimerHandle] = None
        _phase: Optional[str] = None  # "headers" or "body": what the running timer waits for
        _bytes_seen = False  # any byte of the current request arrived

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("headers", header_timeout_s)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._bytes_seen = self._bytes_seen or bool(data)
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._bytes_seen = True
            if self._phase is None:  # the next request on a keep-alive connection
                self._arm("headers", header_timeout_s)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            if self._has_body() and not (self.parser.should_upgrade() and self._should_upgrade()):
                self._arm("body", body_timeout_s)

        def on_message_complete(self) -> None:
            self._disarm()
            self._bytes_seen = False
            super().on_message_complete()
            cycle = self.cycle
            if (cycle is not None and cycle.response_complete and not self.pipeline
                    and self.timeout_keep_alive_task is None and not self.transport.is_closing()):
                # Replied before the body was all here (401, an early 503): uvicorn armed its keep-alive timer
                # at the reply, and the body's last bytes cancelled it; idle from now on, so arm it again.
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

        def on_response_complete(self) -> None:
            # A request waited behind that reply: queued whole (pipelined), or its headers still arriving
            waiting = bool(self.pipeline) or self._phase == "headers"
            super().on_response_complete()  # (starts the queued one)
            if waiting and self._phase is not None and not self.pipeline:  # its timer's time starts now
                if self.timeout_keep_alive_task is not None:  # uvicorn's idle timer, armed as no whole request
                    self.timeout_keep_alive_task.cancel()  # was queued: the connection is not idle, a request has
                    self.timeout_keep_alive_task = None  # begun (it would close it silently, before this timer)
                self._arm(self._phase, header_timeout_s if self._phase == "headers" else body_timeout_s)

        def handle_websocket_upgrade(self) -> None:
            self._disarm()
            super().handle_websocket_upgrade()

        def _has_body(self) -> bool:
            for name, value in self.headers:
                if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
                    return True
            return False

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _expired(self) -> None:
            phase, self._timer, self._phase = self._phase, None, None
            if self.transport.is_closing():
                return
            answering = self.pipeline or (phase == "headers" and self.cycle is not None
                                          and not self.cycle.response_complete)  # (until its headers are whole, a
            # request is no cycle of its own: the cycle is the one before it)
            if answering or self.flow.read_paused:
                # A request before this one is still being answered (its reply must go first), or the server is not
                # reading: the time is not the client's.
                self._arm(phase, header_timeout_s if phase == "headers" else body_timeout_s)
                return
            on_timeout(phase)
            cycle = self.cycle
            replied = cycle is not None and cycle.response_started and phase == "body"
            if phase == "headers" and not self._bytes_seen:
                pass  # nothing was asked: close without a word
            elif not replied:
                limit, setting = ((header_timeout_s, "VLA_HEADER_TIMEOUT_S") if phase == "headers"
                                  else (body_timeout_s, "VLA_BODY_TIMEOUT_S"))
                self.transport.write(read_timeout_reply(f"the request's {phase} did not arrive within {limit:g} s "
                                                        f"({setting}); send the whole request at once"))
            self.transport.close()

    return ReadTimeoutProtocol
