"""Transport alone: a request body's round trip through uvicorn, per robot client.

    python bench/transport.py [--sizes 1,150,450] [--requests 400] [--delay-ms 0] [--pause-ms 1]

A uvicorn server runs a bare ASGI app that reads the whole body (or websocket message) and
answers 1.4 KB (as a policy reply is), on loopback, with httptools, uvloop and uvicorn's
``websockets`` implementation, uncompressed, as ``vla-foundry serve`` runs. Pairs:
- HTTP: the standard library's ``http.client`` and
  ``vla_foundry_client.connection.KeepAliveConnection`` (the robot client's), each on one
  keep-alive connection;
- websocket: ``websockets.sync.client`` (a reader thread hands each message over) and
  ``vla_foundry_client.websocket_connection.WebsocketConnection`` (the robot client's, read
  in the caller's thread).
All pairs are interleaved request by request, so drift on a shared CPU hits all alike;
--delay-ms makes the app wait before answering (as a model runs) and --pause-ms makes the
client wait between requests (as a robot's control loop does), which let both processes'
CPUs go idle as they do in a real round trip. Printed: p50 and p99 round trip per body size
and pair, and each pair's p50 over the first pair of its kind.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_support import free_port  # noqa: E402
from service.cli import WEBSOCKETS  # noqa: E402
from vla_foundry_client.connection import KeepAliveConnection  # noqa: E402
from vla_foundry_client.websocket_connection import WebsocketConnection  # noqa: E402

REPLY = b"x" * 1400


def serve(port: int, delay_ms: float) -> None:
    """The server process."""
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while (await receive())["type"] == "websocket.receive":
                if delay_ms:
                    await asyncio.sleep(delay_ms / 1000)
                await send({"type": "websocket.send", "bytes": REPLY})
            return
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(len(REPLY)).encode())]})
        await send({"type": "http.response.body", "body": REPLY})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off",
                http="httptools", ws=WEBSOCKETS,
                ws_per_message_deflate=False, ws_max_size=64 * 1024 * 1024)


class StdlibClient:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, body: bytes) -> bytes:
        try:
            self.conn.request("POST", "/", body, {"content-type": "application/octet-stream"})
            return self.conn.getresponse().read()
        except BaseException:
            self.conn.close()  # http.client cannot send on a connection left mid-request
            raise


class OurClient:
    def __init__(self, port: int):
        self.conn = KeepAliveConnection(f"http://127.0.0.1:{port}", timeout=30)

    def post(self, body: bytes) -> bytes:
        return self.conn.request("POST", "/", body, {"content-type": "application/octet-stream"}).content


class SyncWebsocketClient:
    def __init__(self, port: int):
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=None).__enter__()  # open till exit

    def post(self, body: bytes) -> bytes:
        self.ws.send(body)
        return self.ws.recv()


class OurWebsocketClient:
    def __init__(self, port: int):
        self.ws = WebsocketConnection(f"ws://127.0.0.1:{port}/", max_size=None)

    def post(self, body: bytes) -> bytes:
        self.ws.send(body)
        return self.ws.recv(timeout=30)


def wait_up(client) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            client.post(b"")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("a server did not start within 60 s") from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,150,450", help="body sizes in KiB, comma-separated")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per pair and size")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="the app waits this long before answering")
    parser.add_argument("--pause-ms", type=float, default=1.0, help="the client pauses this long between requests")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.delay_ms)
        return

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--delay-ms", str(args.delay_ms)])
    pairs = {}
    try:
        for name, cls in (("http.client", StdlibClient), ("KeepAliveConnection", OurClient)):
            client = cls(port)
            wait_up(client)
            pairs[f"HTTP, {name}"] = client
        pairs["websocket, websockets.sync.client"] = SyncWebsocketClient(port)
        pairs["websocket, WebsocketConnection"] = OurWebsocketClient(port)
        print(f"uvicorn bare app, loopback, {os.cpu_count()} cores, reply {len(REPLY)} B, "
              f"app delay {args.delay_ms} ms, client pause {args.pause_ms} ms")
        for kib in (float(s) for s in args.sizes.split(",")):
            body = np.random.default_rng(0).integers(0, 256, int(kib * 1024), dtype=np.uint8).tobytes()
            times: dict[str, list[float]] = {name: [] for name in pairs}
            for i in range(args.warmup + args.requests):
                for name, client in pairs.items():
                    start = time.perf_counter()
                    assert client.post(body) == REPLY
                    if i >= args.warmup:
                        times[name].append((time.perf_counter() - start) * 1000)
                    time.sleep(args.pause_ms / 1000)
            bases = {"HTTP": statistics.median(times["HTTP, http.client"]),
                     "websocket": statistics.median(times["websocket, websockets.sync.client"])}
            print(f"\nbody {kib:g} KiB, {args.requests} requests each")
            print(f"  {'pair':<36} {'p50 ms':>8} {'p99 ms':>8} {'p50 / first':>12}")
            for name, values in times.items():
                p50 = statistics.median(values)
                base = bases[name.split(",")[0]]
                print(f"  {name:<36} {p50:8.3f} {np.percentile(values, 99):8.3f} {p50 / base:12.2f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
