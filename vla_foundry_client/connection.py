"""``KeepAliveConnection``: one HTTP/1.1 connection kept open between control steps.

A robot asks the same server every control period, one request at a time, so one
persistent connection from the standard library is all it needs. It is also the
cheapest: on a 2-core host, a 150 KiB msgpack request round-trips about 0.5 ms faster
than through a pooled ``httpx.Client`` (``bench/robot_latency.py`` uses this class;
the figure is from the same loopback setup). Threads sharing one connection take turns.

A keep-alive connection the server has closed while the robot was idle (uvicorn closes
idle connections after 5 s) is noticed before the next request is sent (the socket reads
as closed) and replaced. A request is sent once more only when sending it failed on a
reused connection; once it has been sent, a failure is raised, never retried: the server
may have acted on it, and a session step must not run twice.
"""

from __future__ import annotations

import http.client
import select
import threading
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

# Failures while sending on a connection the server closed meanwhile.
_SEND_FAILED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass
class HttpReply:
    status: int
    reason: str
    headers: http.client.HTTPMessage  # case-insensitive .get()
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
        self._host, self._port, self._https = parts.hostname, parts.port, parts.scheme == "https"
        self._timeout = timeout
        self._conn: Optional[http.client.HTTPConnection] = None
        self._used = False  # whether the open connection has carried a request (so it may have gone stale)
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[dict[str, str]] = None) -> HttpReply:
        """Send one request and read the whole reply. Connection failures raise ``OSError``
        (``ConnectionRefusedError``, ``TimeoutError``, ``http.client.RemoteDisconnected``, …).
        One request at a time: concurrent callers wait their turn."""
        headers = dict(headers or {})
        with self._lock:
            for attempt in (0, 1):
                conn = self._connection()
                reused = self._used
                try:
                    conn.request(method, self._prefix + path, body=body, headers=headers)
                except _SEND_FAILED:
                    self.close()
                    if reused and attempt == 0:
                        continue  # closed while idle, and the request never got through: send it again
                    raise
                except BaseException:
                    self.close()
                    raise
                self._used = True
                try:  # sent: from here on a failure is raised, never retried (the server may have acted)
                    response = conn.getresponse()
                    content = response.read()
                except BaseException:
                    self.close()  # a half-read reply must not be mistaken for the next one
                    raise
                if response.will_close:
                    self.close()
                return HttpReply(response.status, response.reason, response.headers, content)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn, self._used = None, False

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is not None and self._closed_by_server():
            self.close()
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout)
            self._used = False
        return self._conn

    def _closed_by_server(self) -> bool:
        """An idle keep-alive socket that reads as ready has been closed by the server (EOF) or holds bytes
        nobody asked for; either way it cannot carry the next request."""
        sock = self._conn.sock if self._conn is not None else None
        if sock is None:
            return False
        try:
            if hasattr(select, "poll"):  # poll, not select: select refuses descriptors above 1023
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                return bool(poller.poll(0))
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):  # already closed
            return True
