"""``vla_foundry_client.websocket_connection.WebsocketConnection`` against a ``websockets`` server on loopback.

The server side is the ``websockets`` library's own sync server, scripted per test, so the
client's framing, fragments, close handshake, pongs and refusals meet an independent
implementation.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.server import ServerConnection, serve

from vla_foundry_client.websocket_connection import WebsocketConnection


@contextmanager
def ws_server(handler: Callable[[ServerConnection], None], **options) -> Iterator[tuple[str, queue.Queue]]:
    """A sync websockets server on a free loopback port running ``handler``; yields its URL and a queue where
    the handler's connection leaves its close code once it has closed."""
    closed: queue.Queue = queue.Queue()

    def run(connection: ServerConnection) -> None:
        try:
            handler(connection)
        finally:
            connection.close()
            closed.put(connection.close_code)

    with serve(run, "127.0.0.1", 0, compression=None, **options) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}/ws/x", closed
        finally:
            server.shutdown()
            thread.join(5)


def echo(connection: ServerConnection) -> None:
    connection.send(b"hello")  # a message right behind the upgrade, as the policy's metadata is
    for message in connection:
        connection.send(message)


def test_messages_both_ways_and_a_clean_close():
    with ws_server(echo) as (url, closed):
        ws = WebsocketConnection(url, max_size=None)
        assert ws.recv(timeout=5) == b"hello"
        big = bytes(range(256)) * 4096  # 1 MiB: masked and framed by the client, read in several pieces
        ws.send(big)
        assert ws.recv(timeout=5) == big
        ws.send(memoryview(b"view"))
        assert ws.recv(timeout=5) == b"view"
        ws.close()
        assert closed.get(timeout=5) == 1000  # the server saw the close handshake
        with pytest.raises(ConnectionClosed):
            ws.send(b"after close")


def test_fragments_and_text_are_joined_and_decoded():
    def handler(connection: ServerConnection) -> None:
        connection.recv()
        connection.send([b"frag", b"ment", b"ed"])  # one message in three frames
        connection.send("text ✓")

    with ws_server(handler) as (url, _):
        ws = WebsocketConnection(url)
        ws.send(b"go")
        assert ws.recv(timeout=5) == b"fragmented"
        assert ws.recv(timeout=5) == "text ✓"
        ws.close()


def test_a_timeout_leaves_the_connection_usable():
    def handler(connection: ServerConnection) -> None:
        connection.recv()
        time.sleep(0.3)
        connection.send(b"late")
        connection.recv()

    with ws_server(handler) as (url, _):
        ws = WebsocketConnection(url)
        ws.send(b"go")
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.05)
        assert ws.recv(timeout=5) == b"late"
        ws.close()


def test_the_server_close_code_and_reason_reach_the_caller():
    def handler(connection: ServerConnection) -> None:
        connection.recv()
        connection.send("bad observation")
        connection.close(1008, "field=observation.images.wrist")

    with ws_server(handler) as (url, closed):
        ws = WebsocketConnection(url)
        ws.send(b"observation")
        assert ws.recv(timeout=5) == "bad observation"  # the message before the close is still delivered
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "field=observation.images.wrist")
        assert closed.get(timeout=5) == 1008
        ws.close()  # after the server's close: nothing left to do, and no error


def test_pings_are_answered_between_exchanges():
    """Nobody calls recv while the robot idles; the keepalive thread still answers the server's pings."""
    answered = queue.Queue()

    def handler(connection: ServerConnection) -> None:
        time.sleep(0.2)
        answered.put(connection.ping().wait(5))
        connection.recv()

    with ws_server(handler, ping_interval=None) as (url, _):
        ws = WebsocketConnection(url, keepalive_s=0.05)
        assert answered.get(timeout=10) is True
        ws.send(b"done")
        ws.close()


def test_a_refused_upgrade_raises_with_the_response():
    def refuse(connection, request):
        return connection.respond(404, "no such deployment\n")

    with ws_server(echo, process_request=refuse) as (url, _):
        with pytest.raises(InvalidStatus) as info:
            WebsocketConnection(url)
        assert info.value.response.status_code == 404
        assert b"no such deployment" in info.value.response.body


def test_a_message_over_max_size_closes_with_1009():
    def handler(connection: ServerConnection) -> None:
        connection.send(b"x" * 2048)
        time.sleep(0.5)

    with ws_server(handler) as (url, _):
        ws = WebsocketConnection(url, max_size=1024)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.sent.code == 1009
        ws.close()


def test_a_connection_that_breaks_while_sending_raises_connection_closed():
    def handler(connection: ServerConnection) -> None:
        connection.recv()
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.socket.close()  # gone without a close frame: the client's next writes meet a reset

    with ws_server(handler) as (url, _):
        ws = WebsocketConnection(url)
        ws.send(b"first")
        time.sleep(0.2)
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(20):
                ws.send(b"x" * (1 << 20))
        assert info.value.rcvd is None  # no close frame came: the caller sees code 1006
        ws.close()


def test_a_reset_while_answering_a_ping_raises_connection_closed():
    """The server pings, then resets: the client's pong meets the reset while it reads; recv raises
    ConnectionClosed (a robot's PolicyServerError 1006), not a bare socket error."""
    def handler(connection: ServerConnection) -> None:
        connection.recv()
        connection.ping()
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.socket.close()

    with ws_server(handler, ping_interval=None) as (url, _):
        ws = WebsocketConnection(url, keepalive_s=None)
        ws.send(b"go")
        with pytest.raises(ConnectionClosed):
            for _ in range(3):
                ws.recv(timeout=5)
        ws.close()


def test_close_wakes_a_recv_waiting_in_another_thread():
    def handler(connection: ServerConnection) -> None:
        connection.recv()
        time.sleep(5)

    with ws_server(handler) as (url, _):
        ws = WebsocketConnection(url)
        ws.send(b"go")
        raised: queue.Queue = queue.Queue()

        def wait() -> None:
            try:
                ws.recv()  # no timeout: only the close can end it
            except BaseException as e:
                raised.put(e)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
        started = time.monotonic()
        ws.close()
        waiter.join(5)
        assert isinstance(raised.get(timeout=1), ConnectionClosed)
        assert time.monotonic() - started < 2


def test_a_connection_nobody_closed_is_collected_with_its_keepalive_thread():
    import gc
    import weakref

    with ws_server(echo) as (url, _):
        ws = WebsocketConnection(url, keepalive_s=0.05)
        ref = weakref.ref(ws)
        del ws
        gc.collect()
        assert ref() is None
        time.sleep(0.3)
        assert not any(t.name == "websocket-keepalive" and t.is_alive() for t in threading.enumerate())
