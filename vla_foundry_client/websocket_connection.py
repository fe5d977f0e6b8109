"""``WebsocketConnection``: a client websocket read in the caller's thread.

``websockets.sync.client`` reads the socket on a thread of its own and hands every message
to the caller through a condition variable; on the 2-core dev VM that handoff cost 0.08–0.21
ms per round trip (``bench/transport.py``, side by side on loopback, 1 KiB to 450 KiB
messages, the app answering at once or after 5 ms). Here the
caller's ``recv`` reads the socket itself and runs websockets' own sans-I/O protocol
(``websockets.client.ClientProtocol``: framing, masking, close handshake, pongs), so a
reply is parsed in the thread that waits for it.

Between exchanges nobody reads, so the server's keepalive pings (uvicorn: every 20 s,
closing after 20 s without a pong) would go unanswered while a robot idles; a daemon
thread reads whatever has arrived every ``keepalive_s`` seconds when no exchange holds the
connection. It never runs during an exchange, and it costs an exchange nothing.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import weakref
from collections import deque
from typing import Optional, Union

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError, InvalidState
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from vla_foundry_client.connection import readable

_READ_BYTES = 256 * 1024
_CLOSE_TIMEOUT_S = 2.0  # how long close() waits for the server's side of the close handshake


class WebsocketConnection:
    """One websocket to ``url`` (``ws://…`` or ``wss://…``); ``max_size`` caps an incoming message (None: no
    cap); ``headers`` go in the upgrade request. Raises ``websockets.exceptions.InvalidStatus`` when the
    server refuses the upgrade (it carries the HTTP response), ``OSError``/``TimeoutError`` when the
    connection cannot be made in ``open_timeout``."""

    def __init__(self, url: str, *, max_size: Optional[int] = None, open_timeout: Optional[float] = 10.0,
                 keepalive_s: Optional[float] = 5.0, headers: Optional[dict[str, str]] = None):
        uri = parse_uri(url)
        self._protocol = ClientProtocol(uri, max_size=max_size)
        self._messages: deque[Union[bytes, str]] = deque()
        self._fragments: list[bytes] = []
        self._fragment_opcode: Optional[Opcode] = None
        self._lock = threading.Lock()  # one reader or writer at a time: an exchange or the keepalive thread
        self._send_timeout = open_timeout
        sock = socket.create_connection((uri.host, uri.port), timeout=open_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if uri.secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
            self._sock = sock
            self._handshake(open_timeout, headers or {})
        except BaseException:
            sock.close()
            raise
        self._closed = threading.Event()
        if keepalive_s:
            threading.Thread(target=_keepalive, args=(weakref.ref(self), self._closed, keepalive_s),
                             name="websocket-keepalive", daemon=True).start()

    # ------------------------------------------------------------------ the public calls

    @property
    def open(self) -> bool:
        """Whether the connection is open as far as this side has read (a close the server sent unread: open)."""
        return self._protocol.state is State.OPEN

    def send(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send one binary message. Raises ``ConnectionClosed`` when the connection is closed, or breaks (or
        takes longer than ``open_timeout`` to take the message) while sending."""
        with self._lock:
            self._check_open()
            self._protocol.send_binary(data)
            self._sock.settimeout(self._send_timeout)
            try:
                self._flush()
            except OSError as e:  # part of a frame may have gone out: the connection cannot carry another
                self._read_close_frame()  # (the server may have said why it stopped reading: 1009, too big)
                self._sock.close()
                if self._protocol.state is not State.CLOSED:
                    self._protocol.receive_eof()
                raise self._protocol.close_exc from e

    def recv(self, timeout: Optional[float] = None) -> Union[bytes, str]:
        """The next message: bytes (binary) or str (text). Raises ``TimeoutError`` after ``timeout`` seconds
        (the connection stays usable) and ``ConnectionClosed`` once the connection has closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._messages:
                if self._protocol.state is State.CLOSED:
                    raise self._protocol.close_exc
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message within {timeout} s")
                self._sock.settimeout(remaining)
                try:
                    self._read()
                except socket.timeout:
                    raise TimeoutError(f"no message within {timeout} s") from None
            return self._messages.popleft()

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """The close handshake (waiting at most 2 s for the server's side), then the socket is closed. A
        ``recv`` blocked in another thread is woken (it raises ``ConnectionClosed``) instead of waited for."""
        if self._closed.is_set():
            return
        self._closed.set()  # stops the keepalive thread
        if not self._lock.acquire(timeout=0.05):  # a recv is waiting: end the connection under it
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._lock.acquire()
        try:
            try:
                if self._protocol.state is State.OPEN:
                    self._protocol.send_close(code, reason)
                    self._flush()
                deadline = time.monotonic() + _CLOSE_TIMEOUT_S
                while self._protocol.state is not State.CLOSED and time.monotonic() < deadline:
                    self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    self._read()
            except (OSError, InvalidState):
                pass  # the connection is going away either way
            finally:
                self._sock.close()
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ the socket

    def _handshake(self, timeout: Optional[float], headers: dict[str, str]) -> None:
        request = self._protocol.connect()
        for name, value in headers.items():  # e.g. Authorization (websockets checks names and values)
            request.headers[name] = value
        self._protocol.send_request(request)
        self._flush()
        self._sock.settimeout(timeout)
        while self._protocol.state is State.CONNECTING:
            data = self._sock.recv(_READ_BYTES)
            if data:
                self._protocol.receive_data(data)
            else:
                self._protocol.receive_eof()
            events = self._protocol.events_received()
            if self._protocol.handshake_exc is not None:
                raise self._protocol.handshake_exc
            if not data and self._protocol.state is State.CONNECTING:
                raise ConnectionClosedError(None, None)
            self._take([e for e in events if not isinstance(e, Response)])  # a message right after the upgrade
            self._flush()

    def _read_close_frame(self, within_s: float = 1.0) -> None:
        """What the server sent before the connection broke under a send, its close frame with its code and reason
        (read for at most ``within_s`` seconds)."""
        deadline = time.monotonic() + within_s
        try:
            while self._protocol.state is not State.CLOSED and time.monotonic() < deadline:
                self._sock.settimeout(max(0.01, deadline - time.monotonic()))
                self._read()
        except OSError:  # (nothing more to read)
            pass

    def _read(self) -> None:
        """Read once (blocking up to the socket's timeout) and take in what arrived."""
        try:
            data = self._sock.recv(_READ_BYTES)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            data = b""
        if data:
            self._protocol.receive_data(data)
        else:
            self._protocol.receive_eof()
        self._take(self._protocol.events_received())
        try:
            self._flush()  # pongs, and our side of a close handshake
        except OSError:  # the connection broke under us: what was read stays queued, then ConnectionClosed
            self._sock.close()
            self._protocol.receive_eof()

    def _take(self, events: list) -> None:
        """Whole messages into the queue (fragments joined); control frames are the protocol's business."""
        for frame in events:
            if not isinstance(frame, Frame):
                continue
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                self._fragment_opcode, self._fragments = frame.opcode, [bytes(frame.data)]
            elif frame.opcode is Opcode.CONT and self._fragment_opcode is not None:
                self._fragments.append(bytes(frame.data))
            else:
                continue
            if frame.fin:
                data = b"".join(self._fragments)
                text = self._fragment_opcode is Opcode.TEXT
                self._messages.append(data.decode("utf-8", errors="replace") if text else data)
                self._fragment_opcode, self._fragments = None, []

    def _flush(self) -> None:
        for chunk in self._protocol.data_to_send():
            if chunk:
                self._sock.sendall(chunk)
            else:  # the protocol's end of stream: half-close
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _check_open(self) -> None:
        if self._protocol.state is State.CLOSED:
            raise self._protocol.close_exc
        if self._protocol.state is not State.OPEN:
            raise ConnectionClosedError(self._protocol.close_rcvd, self._protocol.close_sent)

    def _answer_pings(self) -> bool:
        """Read what has arrived, if no exchange is under way (the protocol answers pings as they are read);
        False once the connection is over."""
        if not self._lock.acquire(blocking=False):
            return True  # an exchange is reading: it answers pings itself
        try:
            while self._protocol.state is State.OPEN and readable(self._sock):
                self._sock.settimeout(1.0)
                try:
                    self._read()
                except TimeoutError:  # readable, yet no whole record came (TLS): try again next period
                    break
            return self._protocol.state is State.OPEN
        except OSError:  # the next exchange meets the closed connection and says so
            return False
        finally:
            self._lock.release()


def _keepalive(connection: "weakref.ref[WebsocketConnection]", closed: threading.Event, period_s: float) -> None:
    """The keepalive thread. It holds the connection weakly, so a connection nobody closed can still be
    collected (its socket closes with it) and the thread then ends."""
    while not closed.wait(period_s):
        live = connection()
        if live is None or not live._answer_pings():
            return
        del live
