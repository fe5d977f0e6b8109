"""``vla_foundry_client.connection.KeepAliveConnection`` against a scripted loopback server.

The server answers each request as told (a keep-alive reply, then closing the socket; or
closing without a reply), so the two cases that matter are exact: a connection the server
closed while idle is reopened and the request sent once more, and a request the server
dropped on a fresh connection is not repeated (it might have been acted on).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading

import pytest

from vla_foundry_client.connection import KeepAliveConnection

REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class ScriptedServer:
    """Accepts connections on loopback and answers each request as ``script`` says:

    - "reply-then-close": a keep-alive reply, then the socket is closed (as an idle timeout does);
    - "drop": the socket is closed on the first request, without a reply;
    - "reply-then-partial": a keep-alive reply to the first request; to the second on the same connection,
      half a reply, then a reset;
    - "raw": each request gets the next of ``replies`` as it is (the connection is closed after the last one);
      the requests are kept in ``received``.
    """

    def __init__(self, script: str, replies: tuple[bytes, ...] = ()):
        self.script = script
        self.replies = list(replies)
        self.received: list[bytes] = []
        self.requests = 0
        self.connections = 0
        self.closed = threading.Semaphore(0)  # released each time the server has closed a connection
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                for index in range(2 if self.script != "raw" else len(self.replies)):
                    request = _read_request(conn)
                    if not request:
                        break
                    self.requests += 1
                    self.received.append(request)
                    if self.script == "raw":
                        conn.sendall(self.replies[index])
                        continue
                    if self.script == "drop":
                        break
                    if self.script == "reply-then-partial" and index == 1:
                        conn.sendall(REPLY[:-1])
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                        break
                    conn.sendall(REPLY)  # keep-alive (no "connection: close")
                    if self.script == "reply-then-close":
                        break
            self.closed.release()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would leave blocked
        except OSError:
            pass
        self._sock.close()


def _read_request(conn: socket.socket) -> bytes:
    """One request's head and its (small) body; empty when the client closed the connection."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        request += chunk
    head, _, body = request.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_connection_closed_while_idle_is_reopened_and_the_request_sent_again():
    server = ScriptedServer("reply-then-close")
    connection = KeepAliveConnection(server.url, timeout=5)
    try:
        for _ in range(3):
            reply = connection.request("POST", "/predict/diffusion_policy", b"{}", {"content-type": "application/json"})
            assert (reply.status, reply.content, reply.content_type) == (200, b"{}", "application/json")
            assert server.closed.acquire(timeout=5)  # the idle connection is closed before the next request
    finally:
        connection.close()
        server.close()
    assert server.requests == 3 and server.connections == 3


def test_a_request_that_reached_the_server_is_never_sent_again():
    """The second request on a kept-alive connection gets half a reply, then a reset: the client raises
    instead of sending it again (the server may have acted on it; a session step must not run twice)."""
    server = ScriptedServer("reply-then-partial")
    connection = KeepAliveConnection(server.url, timeout=5)
    try:
        assert connection.request("POST", "/sessions/robot-1/step", b"{}").status == 200
        with pytest.raises((OSError, http.client.HTTPException)):
            connection.request("POST", "/sessions/robot-1/step", b"{}")
    finally:
        connection.close()
        server.close()
    assert server.requests == 2 and server.connections == 1


def test_a_request_dropped_on_a_fresh_connection_is_not_repeated():
    server = ScriptedServer("drop")
    connection = KeepAliveConnection(server.url, timeout=5)
    try:
        with pytest.raises(OSError):
            connection.request("POST", "/sessions/robot-1/step", b"{}")
    finally:
        connection.close()
        server.close()
    assert server.requests == 1


def test_a_refused_connection_raises_and_a_bad_url_is_named():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        KeepAliveConnection(f"http://127.0.0.1:{port}", timeout=5).request("GET", "/models")
    with pytest.raises(ValueError, match="ftp://robot"):
        KeepAliveConnection("ftp://robot")


def _exchange(replies: tuple[bytes, ...], requests: int = 1, body: bytes = b"{}"):
    server = ScriptedServer("raw", replies)
    connection = KeepAliveConnection(server.url + "/prefix", timeout=5)
    try:
        got = [connection.request("POST", "/predict/x", body, {"content-type": "application/msgpack"})
               for _ in range(requests)]
    finally:
        connection.close()
        server.close()
    return got, server


def test_the_request_head_and_a_large_body_arrive_whole():
    body = bytes(range(256)) * (20 * 1024)  # 5 MiB: more than one sendmsg takes
    (reply,), server = _exchange((REPLY,), body=body)
    head, _, received_body = server.received[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /prefix/predict/x HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.url.rsplit(':', 1)[1]}".encode() in lines
    assert f"Content-Length: {len(body)}".encode() in lines and b"content-type: application/msgpack" in lines
    assert received_body == body and reply.status == 200


def test_chunked_close_delimited_and_interim_replies_are_read():
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Part: a\r\nx-part: b\r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n")
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + REPLY
    to_the_end = b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 2\r\n\r\nbusy, then closed"
    (first, second, third), server = _exchange((chunked, interim, to_the_end), requests=3)
    assert (first.status, first.content, first.headers.get("X-PART")) == (200, b"hello world", "a, b")
    assert (second.status, second.content, second.content_type) == (200, b"{}", "application/json")
    assert (third.status, third.reason, third.content) == (503, "Service Unavailable", b"busy, then closed")
    assert third.headers["retry-after"] == "2" and "Retry-After" in third.headers
    assert server.connections == 1  # chunked and Content-Length replies keep the connection


@pytest.mark.parametrize("reply", [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                                   b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nz\r\n",
                                   b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-1\r\nab\r\n",
                                   b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x2\r\nab\r\n",
                                   b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n",
                                   "HTTP/1.1 200 OK\r\ncontent-length: \u00b2\r\n\r\n".encode("latin-1"),
                                   b"ICY 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"],
                         ids=["truncated", "bad-chunk-size", "negative-chunk-size", "0x-chunk-size", "bad-length",
                              "superscript-length", "bad-status-line", "bad-header"])
def test_a_malformed_or_truncated_reply_raises(reply):
    with pytest.raises(http.client.HTTPException):
        _exchange((reply,))


@pytest.mark.parametrize("method,path,headers", [
    ("POST", "/x", {"x-robot": "1\r\nX-Injected: yes"}), ("POST", "/x", {"bad name": "1"}),
    ("POST", "/x y", {}), ("POST", "/x\x7f", {}), ("POST", "/café", {}), ("GET\r\n", "/x", {}), ("POST", "x", {})])
def test_a_request_that_would_smuggle_a_header_or_line_is_refused(method, path, headers):
    connection = KeepAliveConnection("http://127.0.0.1:1", timeout=5)
    with pytest.raises(ValueError):
        connection.request(method, path, b"{}", headers)


def test_a_switching_protocols_reply_ends_the_connection():
    """After 101 the connection speaks another protocol: the next request goes on a new one."""
    switched = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    server = ScriptedServer("raw", (switched,))
    connection = KeepAliveConnection(server.url, timeout=5)
    try:
        assert connection.request("POST", "/x", b"{}").status == 101
        assert connection._sock is None
    finally:
        connection.close()
        server.close()
