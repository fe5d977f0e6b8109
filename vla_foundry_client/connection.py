"""``KeepAliveConnection``: one HTTP/1.1 connection kept open between control steps.

A robot asks the same server every control period, one request at a time, so it needs
one persistent connection and no more of HTTP/1.1 than a request with a
``Content-Length`` body and a reply framed by ``Content-Length``, chunked, or the
connection's end. That much is written here on a plain socket: the request head and
body leave in one ``sendmsg`` (no copy of the camera frames), and the reply head is split
on CRLF, where ``http.client`` runs every header through the ``email`` parser.
``bench/transport.py`` on the 2-core dev VM, side by side against ``http.client`` on
loopback: 0.23–0.35 ms less per round trip (1 KiB to 450 KiB bodies, the app answering at
once or after 5 ms). ``bench/robot_latency.py`` uses this class.
Threads sharing one connection take turns.

A keep-alive connection the server has closed while the robot was idle (uvicorn closes
idle connections after 5 s) is noticed before the next request is sent (the socket reads
as closed) and replaced. A request is sent once more only when sending it failed on a
reused connection; once it has been sent, a failure is raised, never retried: the server
may have acted on it, and a session step must not run twice.

Failures raise ``OSError`` (``ConnectionRefusedError``, ``TimeoutError``,
``http.client.RemoteDisconnected`` when the connection ends before a reply) or
``http.client.HTTPException`` (a malformed or truncated reply).
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Optional, Union
from urllib.parse import urlsplit

Body = Union[bytes, bytearray, memoryview]

# Failures while sending on a connection the server closed meanwhile.
_SEND_FAILED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_MAX_HEAD_BYTES = 64 * 1024  # a reply head longer than this is refused (as http.client does, per line)
_READ_BYTES = 256 * 1024
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP method or header name (RFC 9110 token)
_DIGITS = re.compile(r"[0-9]{1,18}")  # a Content-Length ("²".isdigit() is true; int() refuses it)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")  # a chunk size
_UNSAFE_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")  # controls and spaces would end or split the request line
_STATUS_LINE = re.compile(rb"^HTTP/1\.([01]) (\d{3})(?: (.*))?$")


class Headers(dict):
    """A reply's headers: lower-cased names; a repeated header's values joined with ", "."""

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


@dataclass
class HttpReply:
    status: int
    reason: str
    headers: Headers  # case-insensitive .get()
    content: bytes

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").split(";")[0].strip().lower()

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class KeepAliveConnection:
    """HTTP requests to ``base_url`` (``http://host:port[/prefix]`` or ``https://…``) on one connection."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http://host:port or https://host:port; got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._prefix = parts.path.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host  # an IPv6 literal keeps its brackets
        default_port = self._port == (443 if self._https else 80)
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._timeout = timeout
        self._sock: Optional[socket.socket] = None
        self._buffer = bytearray()  # bytes read past the reply so far
        self._used = False  # whether the open connection has carried a request (so it may have gone stale)
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: Optional[Body] = None,
                headers: Optional[dict[str, str]] = None) -> HttpReply:
        """Send one request and read the whole reply. One request at a time: concurrent callers wait their
        turn. Header names and values are checked (no CR/LF smuggling a second header or request)."""
        head = self._head(method, path, body, headers or {})
        with self._lock:
            for attempt in (0, 1):
                sock = self._connection()
                reused = self._used
                try:
                    self._send(sock, head, body)
                except _SEND_FAILED:
                    self._close()
                    if reused and attempt == 0:
                        continue  # closed while idle, and the request never got through: send it again
                    raise
                except BaseException:
                    self._close()
                    raise
                self._used = True
                try:  # sent: from here on a failure is raised, never retried (the server may have acted)
                    reply, keep_alive = self._read_reply(sock, method)
                except BaseException:
                    self._close()  # a half-read reply must not be mistaken for the next one
                    raise
                if not keep_alive:
                    self._close()
                return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection (after the request in flight, if another thread has one)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock, self._used = None, False
            self._buffer.clear()

    # ------------------------------------------------------------------ the request

    def _head(self, method: str, path: str, body: Optional[Body], headers: dict[str, str]) -> bytes:
        target = self._prefix + path
        if not _TOKEN.match(method.encode("latin-1", errors="replace")):
            raise ValueError(f"invalid HTTP method {method!r}")
        if body is not None and not memoryview(body).c_contiguous:
            raise ValueError("the request body must be contiguous bytes")
        if not target.startswith("/") or not target.isascii() or _UNSAFE_IN_TARGET.search(target):
            raise ValueError(f"invalid request path {target!r}: it must start with '/' and hold only printable "
                             "ASCII without spaces (quote the rest)")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        given = {name.lower() for name in headers}
        for name, value in headers.items():
            if not _TOKEN.match(name.encode("latin-1", errors="replace")):
                raise ValueError(f"invalid header name {name!r}")
            if any(c in str(value) for c in "\r\n\x00"):
                raise ValueError(f"invalid value for header {name!r}: {value!r} holds CR, LF or NUL")
            if name.lower() not in ("host", "content-length", "transfer-encoding"):
                lines.append(f"{name}: {value}")
        if "accept-encoding" not in given:
            lines.append("Accept-Encoding: identity")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {0 if body is None else memoryview(body).nbytes}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, sock: socket.socket, head: bytes, body: Optional[Body]) -> None:
        data = None if body is None else memoryview(body).cast("B")
        if data is None or data.nbytes == 0:
            sock.sendall(head)
        elif isinstance(sock, ssl.SSLSocket):  # TLS sockets have no sendmsg
            sock.sendall(head)
            sock.sendall(data)
        else:
            send_all(sock, [memoryview(head), data])

    # ------------------------------------------------------------------ the reply

    def _read_reply(self, sock: socket.socket, method: str) -> tuple[HttpReply, bool]:
        while True:
            version, status, reason, headers = self._read_head(sock)
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue and other interim replies come before the real one
            break
        connection = (headers.get("connection") or "").lower()
        keep_alive = "close" not in connection and (version == 1 or "keep-alive" in connection) and status != 101
        if method == "HEAD" or status in (101, 204, 304):  # 101: the connection now speaks another protocol
            content = b""
        elif "chunked" in (headers.get("transfer-encoding") or "").lower():
            content = self._read_chunked(sock)
        elif headers.get("content-length") is not None:
            length = headers["content-length"].strip()
            if not _DIGITS.fullmatch(length):
                raise http.client.HTTPException(f"invalid Content-Length {length!r} in the reply")
            content = self._read_exactly(sock, int(length))
        else:  # framed by the end of the connection
            content = self._read_to_end(sock)
            keep_alive = False
        return HttpReply(status, reason, headers, content), keep_alive

    def _read_head(self, sock: socket.socket) -> tuple[int, int, str, Headers]:
        end = self._buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(self._buffer) > _MAX_HEAD_BYTES:
                raise http.client.LineTooLong(f"reply head over {_MAX_HEAD_BYTES} bytes")
            if not self._fill(sock):
                if self._buffer:
                    raise http.client.IncompleteRead(bytes(self._buffer))
                raise http.client.RemoteDisconnected("the server closed the connection without a reply")
            end = self._buffer.find(b"\r\n\r\n")
        lines = self._take(end + 4)[:-4].split(b"\r\n")
        match = _STATUS_LINE.match(lines[0])
        if match is None:
            raise http.client.BadStatusLine(lines[0].decode("latin-1"))
        headers = Headers()
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.match(name):
                raise http.client.HTTPException(f"malformed reply header {line[:100]!r}")
            key, text = name.decode("latin-1").lower(), value.strip().decode("latin-1")
            previous = dict.get(headers, key)
            dict.__setitem__(headers, key, text if previous is None else f"{previous}, {text}")
        version, status, reason = int(match.group(1)), int(match.group(2)), (match.group(3) or b"").decode("latin-1")
        return version, status, reason, headers

    def _read_exactly(self, sock: socket.socket, length: int) -> bytes:
        while len(self._buffer) < length:
            if not self._fill(sock, length - len(self._buffer)):
                raise http.client.IncompleteRead(bytes(self._buffer), length - len(self._buffer))
        return self._take(length)

    def _read_line(self, sock: socket.socket) -> bytes:
        end = self._buffer.find(b"\r\n")
        while end < 0:
            if len(self._buffer) > _MAX_HEAD_BYTES:
                raise http.client.LineTooLong("chunk size line")
            if not self._fill(sock):
                raise http.client.IncompleteRead(bytes(self._buffer))
            end = self._buffer.find(b"\r\n")
        return self._take(end + 2)[:-2]

    def _read_chunked(self, sock: socket.socket) -> bytes:
        parts = []
        while True:
            size_text = self._read_line(sock).split(b";")[0].strip()  # a chunk extension is ignored
            if not _HEX.fullmatch(size_text):  # int(…, 16) alone would take "-1", "0x5", "+5" and "5_0"
                raise http.client.HTTPException(f"invalid chunk size {size_text[:20]!r} in the reply")
            size = int(size_text, 16)
            if size == 0:
                while self._read_line(sock):  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._read_exactly(sock, size))
            if self._read_line(sock):
                raise http.client.HTTPException("a chunk of the reply is longer than its size line says")

    def _read_to_end(self, sock: socket.socket) -> bytes:
        while self._fill(sock):
            pass
        return self._take(len(self._buffer))

    def _take(self, length: int) -> bytes:
        """The first ``length`` buffered bytes, removed from the buffer."""
        with memoryview(self._buffer) as view:
            taken = bytes(view[:length])
        del self._buffer[:length]
        return taken

    def _fill(self, sock: socket.socket, wanted: int = _READ_BYTES) -> bool:
        """Append what the socket has (at most ``max(wanted, 64 KiB)`` bytes); False at the connection's end."""
        data = sock.recv(max(min(wanted, 16 * 1024 * 1024), 65536))
        self._buffer += data
        return bool(data)

    # ------------------------------------------------------------------ the connection

    def _connection(self) -> socket.socket:
        if self._sock is not None and self._closed_by_server():
            self._close()
        if self._sock is None:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a small reply goes out at once
                if self._https:
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
            except BaseException:
                sock.close()
                raise
            self._sock, self._used = sock, False
            self._buffer.clear()
        return self._sock

    def _closed_by_server(self) -> bool:
        """An idle keep-alive socket that reads as ready has been closed by the server (EOF) or holds bytes
        nobody asked for; either way it cannot carry the next request."""
        if self._buffer:
            return True
        try:
            return readable(self._sock)
        except (OSError, ValueError):  # already closed
            return True


def send_all(sock: socket.socket, parts: list[memoryview]) -> None:
    """``sendall`` for several buffers: ``sendmsg`` (no joined copy), again with the rest while it takes only
    part of them. ``parts`` are 1-D byte views; the list is consumed."""
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][sent:]


def readable(sock: socket.socket) -> bool:
    """Whether reading ``sock`` would not block (data, or the connection's end, has arrived)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    if hasattr(select, "poll"):  # poll, not select: select refuses descriptors above 1023
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])
