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
      half a reply, then a reset.
    """

    def __init__(self, script: str):
        self.script = script
        self.requests = 0
        self.connections = 0
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
                for index in range(2):
                    if not _read_request(conn):
                        break
                    self.requests += 1
                    if self.script == "drop":
                        break
                    if self.script == "reply-then-partial" and index == 1:
                        conn.sendall(REPLY[:-1])
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                        break
                    conn.sendall(REPLY)  # keep-alive (no "connection: close")
                    if self.script == "reply-then-close":
                        break

    def close(self) -> None:
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
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return request


def test_a_connection_closed_while_idle_is_reopened_and_the_request_sent_again():
    server = ScriptedServer("reply-then-close")
    connection = KeepAliveConnection(server.url, timeout=5)
    try:
        for _ in range(3):
            reply = connection.request("POST", "/predict/diffusion_policy", b"{}", {"content-type": "application/json"})
            assert (reply.status, reply.content, reply.content_type) == (200, b"{}", "application/json")
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
