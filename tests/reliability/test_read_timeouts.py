"""Read timeouts on a live server (``service/read_timeouts.py``): clients that send nothing, half a request
line or a body a byte at a time are closed within VLA_HEADER_TIMEOUT_S / VLA_BODY_TIMEOUT_S, and the others
keep being served meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.live_server import live_server

HEADER_S, BODY_S = 1.0, 1.5
BODY = json.dumps({"prompt": "hi", "max_new_tokens": 2}).encode()


@pytest.fixture(scope="module")
def base(tiny_checkpoints, tmp_path_factory):
    env = {"VLA_HEADER_TIMEOUT_S": str(HEADER_S), "VLA_BODY_TIMEOUT_S": str(BODY_S)}
    with live_server(["--checkpoint", f"{tiny_checkpoints['transformer']}=tiny"], tmp_path_factory.mktemp("demo"),
                     env=env) as url:
        yield url


class RawConnection:
    """A raw HTTP/1.1 client connection: sends bytes as given, reads whole responses off a keep-alive connection
    (what arrives past one is kept for the next), and fails instead of waiting forever when the server closes
    in the middle of a response."""

    def __init__(self, base: str):
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=15)
        self.unread = b""

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection in a response; it sent {self.unread[:300]!r}")
        self.unread += chunk

    def response(self) -> bytes:
        """One whole response: its head, then its body to Content-Length (they may come in separate segments)."""
        while b"\r\n\r\n" not in self.unread:
            self._receive()
        head = self.unread.partition(b"\r\n\r\n")[0]
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        end = len(head) + 4 + length
        while len(self.unread) < end:
            self._receive()
        reply, self.unread = self.unread[:end], self.unread[end:]
        return reply

    def until_closed(self) -> tuple[bytes, float]:
        """Everything the server sends until it closes the connection (with what was read but not yet taken), and
        how long that took; raises socket.timeout if the server keeps it open past the socket's timeout."""
        started = time.monotonic()
        data, self.unread = self.unread, b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data, time.monotonic() - started


def trickle(sock: RawConnection, data: bytes, give_up_s: float, every_s: float = 0.2) -> None:
    """Sends ``data`` a byte every ``every_s`` until the server closes, all is sent, or ``give_up_s`` passed."""
    started = time.monotonic()
    for i in range(len(data)):
        try:
            sock.sendall(data[i:i + 1])
        except OSError:
            return
        time.sleep(every_s)
        if time.monotonic() - started > give_up_s:
            return


def request_head(length: int) -> bytes:
    return (b"POST /predict/transformer HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(length).encode() + b"\r\n\r\n")


def assert_408(reply: bytes, phase: str) -> None:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "request_timeout" and phase in error["message"], error


def read_timeouts(base: str) -> dict[str, float]:
    """``vla_read_timeouts_total`` by phase, and the model calls so far (under the key "model calls")."""
    text = httpx.get(f"{base}/metrics").text
    counts = {"model calls": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "vla_read_timeouts" and sample.name.endswith("_total"):
                counts[sample.labels["phase"]] = sample.value
            if sample.name == "vla_model_run_seconds_count":
                counts["model calls"] += sample.value
    return counts


def test_a_connection_that_sends_nothing_is_closed_silently(base):
    with RawConnection(base) as sock:
        reply, took = sock.until_closed()
    assert reply == b"" and HEADER_S * 0.9 <= took < HEADER_S + 3


def test_half_a_request_line_gets_408(base):
    with RawConnection(base) as sock:
        sock.sendall(b"POST /predict/trans")
        reply, took = sock.until_closed()
    assert_408(reply, "headers")
    assert took < HEADER_S + 3


def test_headers_sent_a_byte_at_a_time_do_not_reset_the_timer(base):
    head = request_head(len(BODY))
    with RawConnection(base) as sock:
        started = time.monotonic()
        trickle(sock, head, give_up_s=HEADER_S + 3)  # about 20 s of trickle if nothing stopped it
        reply, _ = sock.until_closed()
    assert_408(reply, "headers")
    assert time.monotonic() - started < HEADER_S + 4


def test_a_slow_body_gets_408_and_nothing_runs(base):
    before = read_timeouts(base)
    with RawConnection(base) as sock:
        sock.sendall(request_head(len(BODY)) + BODY[:5])
        started = time.monotonic()
        trickle(sock, BODY[5:], give_up_s=BODY_S + 3)
        reply, _ = sock.until_closed()
    assert_408(reply, "body")
    assert time.monotonic() - started < BODY_S + 4
    after = read_timeouts(base)
    assert after.get("body", 0) == before.get("body", 0) + 1
    assert after["model calls"] == before["model calls"]


def test_a_request_sent_in_pieces_within_the_limits_is_served(base):
    with RawConnection(base) as sock:
        head = request_head(len(BODY))
        sock.sendall(head[:10])
        time.sleep(HEADER_S / 3)
        sock.sendall(head[10:] + BODY[:4])
        time.sleep(BODY_S / 3)
        sock.sendall(BODY[4:])
        reply = sock.response()
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


def test_keep_alive_requests_each_get_their_own_header_timer(base):
    with RawConnection(base) as sock:
        for _ in range(2):  # two whole requests, each well within the limits, on one connection
            sock.sendall(request_head(len(BODY)) + BODY)
            assert sock.response().startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_S * 0.7)  # idle between requests: uvicorn's keep-alive timeout (5 s) governs this
        sock.sendall(b"GET /mod")  # then half of a third one
        reply, took = sock.until_closed()
    assert_408(reply, "headers")
    assert took < HEADER_S + 3


def test_slow_clients_do_not_stop_the_others(base):
    slow = [RawConnection(base) for _ in range(32)]
    try:
        for i, sock in enumerate(slow):
            sock.sendall(b"POST /predict/transformer HTTP/1.1\r\nHo" if i % 2 else request_head(len(BODY)) + b"{")
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(5):
                assert client.post("/predict/transformer", json={"prompt": "hi", "max_new_tokens": 2}).status_code \
                       == 200
        deadline = time.monotonic() + max(HEADER_S, BODY_S) + 4
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            reply, _ = sock.until_closed()  # raises socket.timeout if the server kept it open
            assert reply.startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in slow:
            sock.close()


def test_a_connection_answered_before_its_body_does_not_stay_open(base):
    """A reply that comes before the body is all here (here a 400 for a malformed X-Request-Timeout): the rest of
    the body arriving must not leave the connection without a timer (it is idle; uvicorn's keep-alive closes
    it after 5 s)."""
    with RawConnection(base) as sock:
        sock.sendall(b"POST /predict/transformer HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: soon\r\n"
                     b"content-length: 2\r\n\r\n")
        first = sock.response()
        assert first.startswith(b"HTTP/1.1 400 "), first[:200]
        sock.sendall(b"{}")  # the body, after the reply
        sock.settimeout(12)
        rest, took = sock.until_closed()  # raises socket.timeout if the server kept it open
    assert took < 9


@contextmanager
def protocol_server(app, header_s: float = HEADER_S, body_s: float = BODY_S, keep_alive_s: float = 5):
    """uvicorn with ``read_timeout_protocol`` serving the ASGI ``app`` on a loopback port, in a thread: the
    protocol alone, under an app whose timing the test sets."""
    import asyncio

    import uvicorn

    from service.read_timeouts import read_timeout_protocol
    from tests.service.live_server import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=read_timeout_protocol(header_s, body_s),
                                           timeout_keep_alive=keep_alive_s))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def slow_or_counting(scope, receive, send):
    """``/slow``: answers after 3 s (longer than BODY_S); anything else: reads its body, answers its length."""
    import asyncio

    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(3)
    body = json.dumps({"received": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def test_a_pipelined_body_left_unread_behind_a_long_request_is_not_timed_out():
    """Two requests sent at once on one connection, the first answered after longer than the body timer: the
    server reads nothing of the second's body until the first is answered (uvicorn pauses reading), and the timer
    must not count that against the client. Before, the second got 408 after VLA_BODY_TIMEOUT_S and the connection
    closed under the first, whose reply was lost."""
    body = b"x" * 2_000_000  # more than is read before reading pauses
    with protocol_server(slow_or_counting) as url, RawConnection(url) as sock:
        sock.settimeout(30)
        both = (b"POST /slow HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}"
                b"POST /count HTTP/1.1\r\nHost: x\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sender = threading.Thread(target=sock.sendall, args=(both,))
        started = time.monotonic()
        sender.start()
        replies = [sock.response(), sock.response()]
        took = time.monotonic() - started
        sender.join(timeout=30)
    assert replies[0].startswith(b"HTTP/1.1 200 "), replies[0][:300]
    assert replies[1].startswith(b"HTTP/1.1 200 "), replies[1][:300]
    assert json.loads(replies[1].partition(b"\r\n\r\n")[2]) == {"received": len(body)}
    assert took > BODY_S + 1  # the second body waited unread past the body timer


def test_a_pipelined_slow_body_still_gets_its_408_once_it_is_read():
    """A pipelined request whose body never comes all: its 408 follows the reply to the request before it (replies
    go in order; before, the 408 came first, as if it answered that one), within the body timer after it."""
    with protocol_server(slow_or_counting) as url, RawConnection(url) as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}"
                     b"POST /count HTTP/1.1\r\nHost: x\r\ncontent-length: 1000\r\n\r\nx")
        first = sock.response()
        sock.settimeout(15)
        rest, took = sock.until_closed()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert_408(rest, "body")
    assert took < BODY_S + 3


def test_a_pipelined_request_whose_headers_are_still_arriving_waits_for_the_reply_before_it():
    """The next request's headers begin while the one before is being answered (until they are whole it is no
    request of its own to uvicorn): its header timer must not cut that reply, and starts once it is sent. uvicorn's
    keep-alive timer (here shorter than the header timer, as its 5 s default is than VLA_HEADER_TIMEOUT_S's 10 s)
    must not close the connection meanwhile: it is not idle, a request has begun."""
    with protocol_server(slow_or_counting, keep_alive_s=HEADER_S / 2) as url, RawConnection(url) as sock:
        sock.settimeout(30)
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}"
                     b"POST /count HTTP/1.1\r\nHost: x\r\n")  # (the second's headers: never finished)
        first = sock.response()
        answered = time.monotonic()
        rest, _ = sock.until_closed()
    assert first.startswith(b"HTTP/1.1 200 "), first[:300]
    assert_408(rest, "headers")
    assert HEADER_S - 0.3 < time.monotonic() - answered < HEADER_S + 3  # its own time, from the reply on


def test_a_pipelined_body_s_timer_starts_when_the_request_before_it_is_answered():
    """The body timer of a queued request starts over once the reply before it is sent: a body that comes within
    the timer after that reply is served (the timer does not run on from when the queued request arrived)."""
    body_s = 2.0  # /slow answers after 3 s: the timer re-armed while the request waited would end 1 s after it
    with protocol_server(slow_or_counting, body_s=body_s) as url, RawConnection(url) as sock:
        sock.settimeout(30)
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}"
                     b"POST /count HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\nxxxxx")
        first = sock.response()
        time.sleep(body_s * 0.75)  # then the rest of the body, well within its timer counted from the reply
        sock.sendall(b"yyyyy")
        second = sock.response()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 200 "), second[:300]
    assert json.loads(second.partition(b"\r\n\r\n")[2]) == {"received": 10}
