"""Robot round-trip latency: one policy request over JSON HTTP, msgpack HTTP and the websocket vs the direct call.

    python bench/robot_latency.py [--cameras 1,3] [--size 224] [--requests 200] [--warmup 20] [--steps 5]
                                  [--threads N]

For each camera count a tiny random-weight `diffusion_policy` (ViT backbone, 32 px, processor
"none"; transformer width 64; P = 1, F = 7; one proprioception field and one action field of
7 values; flow matching) is saved in a temporary directory, served by `vla-foundry serve` on
a loopback port (CPU, warm-up on), and asked for one action chunk per request with one
--size × --size uint8 frame per camera, the [P+1][7] proprioception rows, --steps denoising
steps and the same seed every time, five ways:
- `direct`: `ActionPipeline.predict([RawObservation(...)])` in this process (same checkpoint);
- `raw TCP floor`: the same pipeline in a second process behind the least a server can be
  here: an event loop (uvloop, as uvicorn runs), one model thread, a length-prefixed TCP
  message of the raw frames and rows, no HTTP, no parsing, no validation. Its overhead is
  what the process boundary and the thread handoffs cost on this host, which no protocol
  can go below; `over floor` is what the real server adds on top;
- `JSON HTTP`: `POST /predict/diffusion_policy`, frames as typed arrays with base64 data;
- `msgpack HTTP`: the same route with msgpack body and reply (raw bytes under `__ndarray__`);
- `websocket`: `/ws/diffusion_policy`, openpi's flat keys (`observation/<camera>`,
  `observation/state`) in binary msgpack frames over one connection.
The HTTP transports reuse one keep-alive connection and the websocket one connection, both
the robot client's (`vla_foundry_client.connection`, `vla_foundry_client.websocket_connection`).
A round trip is timed with `time.perf_counter()` from the raw arrays to the decoded action
chunk, so the client's encoding and decoding count (a robot pays them every step). Each
transport is warmed up with --warmup requests, then the --requests timed requests are
interleaved (direct, floor, JSON, msgpack, websocket, direct, …) so drift on a shared CPU
hits all alike. Printed: p50/p99 per transport, the overhead over the direct call (p50 −
direct p50) and over the floor, the client's encode+decode median, and the server-reported
timing medians (HTTP `timing_ms`: queue/preprocess/infer/total; websocket `server_timing`:
queue/infer (the model thread's whole run, preprocessing included)/previous frame's total,
and what is left outside the handler), then the server's own decoding steps for the same
bodies timed in this process (`service.codecs`, pydantic, frame decoding) and the whole app
for the msgpack body as an ASGI call with the model call stubbed.
The goal (issue 6): msgpack HTTP and websocket ≤ 1 ms p50 overhead on a 2-core CPU host (README: Latency).
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import torch

from bench_support import DIM, FUTURE, PAST, PROPRIO, build_policy, free_port, serve_command, server_process
from vla_foundry.pipelines import load_pipeline
from vla_foundry.robotics.observations import RawObservation
from vla_foundry_client.arrays import MessagePacker, pack_array, unpack_array
from vla_foundry_client.connection import KeepAliveConnection, send_all
from vla_foundry_client.websocket_connection import WebsocketConnection

SEED = 0
TRANSPORTS = ("direct", "raw TCP floor", "JSON HTTP", "msgpack HTTP", "websocket")


# ----------------------------------------------------------------------------- the server


def serve(checkpoint: Path, threads: int | None, timeout: float = 180):
    """``vla-foundry serve`` on a free loopback port; a context yielding the base URL once ``/health/ready`` is
    200."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_WARMUP": "true"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = serve_command() + ["serve", "--checkpoint", f"{checkpoint}=bench-policy", "--host", "127.0.0.1",
                                 "--port", str(port), "--device", "cpu"]
    return server_process(command, env, port, "/health/ready", "the server", ready_timeout_s=timeout)


def serve_floor(port: int, checkpoint: Path, cameras: list[str], size: int) -> None:
    """The floor server: the same pipeline behind the least a server can be here (an event loop, one model
    thread, a TCP socket, no HTTP and no parsing). A request is an 8-byte length, then the frames' raw bytes
    (cameras in order) and the [P+1][7] float32 proprioception; the reply an 8-byte length, then the chunk's
    float32 bytes."""
    import asyncio
    import concurrent.futures

    pipeline = load_pipeline(checkpoint, device="cpu")
    pipeline.warmup()
    names = dict(zip(pipeline.robot_io.camera_names, pipeline.robot_io.image_names))
    frame_bytes = size * size * 3
    model_thread = concurrent.futures.ThreadPoolExecutor(1)

    def predict(payload: bytes) -> bytes:
        frames = {names[cam]: np.frombuffer(payload, np.uint8, frame_bytes, i * frame_bytes).reshape(size, size, 3)
                  for i, cam in enumerate(cameras)}
        proprio = np.frombuffer(payload, np.float32, offset=len(cameras) * frame_bytes).reshape(PAST + 1, DIM)
        out = pipeline.predict([RawObservation(frames, {PROPRIO: proprio}, "")], num_inference_steps=steps,
                               seed=SEED)
        return out["action_chunk"][0].astype(np.float32).tobytes()

    class Floor(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, bytearray()

        def data_received(self, data):
            self.buffer += data
            if len(self.buffer) >= 8 and len(self.buffer) >= 8 + int.from_bytes(self.buffer[:8], "little"):
                payload, self.buffer = bytes(self.buffer[8:]), bytearray()
                asyncio.ensure_future(self.answer(payload))

        async def answer(self, payload):
            reply = await asyncio.get_running_loop().run_in_executor(model_thread, predict, payload)
            self.transport.write(len(reply).to_bytes(8, "little") + reply)

    async def main():
        server = await asyncio.get_running_loop().create_server(Floor, "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    steps = int(os.environ["FLOOR_STEPS"])
    try:
        import uvloop  # what uvicorn runs on, where installed
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


@contextmanager
def floor_server(checkpoint: Path, cameras: list[str], size: int, steps: int, threads: int | None) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "FLOOR_STEPS": str(steps)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, __file__, "--floor-serve", str(port), str(checkpoint), ",".join(cameras),
                             str(size)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the floor server did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait()


# ----------------------------------------------------------------------------- wire forms


# The robot client's array conventions: the bench's requests are packed as a robot's would be.
def typed_json(array: np.ndarray) -> dict:
    return pack_array(array, binary=False)


def typed_msgpack(array: np.ndarray) -> dict:
    return pack_array(array, binary=True)


class Transport(ABC):
    """One way of asking for a chunk: ``call()`` times it; client codec time and server timings are kept."""

    def __init__(self, name: str):
        self.name = name
        self.total_ms: list[float] = []
        self.client_ms: list[float] = []  # encode + decode on this side
        self.server: dict[str, list[float]] = {}
        self.last_chunk: np.ndarray | None = None

    def call(self, record: bool) -> None:
        start = time.perf_counter()
        chunk, client_ms, server = self.request()
        elapsed = (time.perf_counter() - start) * 1000
        self.last_chunk = chunk
        if record:
            self.total_ms.append(elapsed)
            self.client_ms.append(client_ms)
            for key, value in server.items():
                self.server.setdefault(key, []).append(value)

    @abstractmethod
    def request(self) -> tuple[np.ndarray, float, dict[str, float]]:
        """One round trip: the decoded chunk, the client's encode+decode ms, the server's timings."""


class Direct(Transport):
    def __init__(self, pipeline, frames: dict[str, np.ndarray], proprio: np.ndarray, steps: int):
        super().__init__("direct")
        names = dict(zip(pipeline.robot_io.camera_names, pipeline.robot_io.image_names))
        self.pipeline, self.steps = pipeline, steps
        self.frames = {names[cam]: frame for cam, frame in frames.items()}
        self.proprio = proprio

    def request(self):
        sample = RawObservation(dict(self.frames), {PROPRIO: self.proprio}, "")
        out = self.pipeline.predict([sample], num_inference_steps=self.steps, seed=SEED)
        timing = out["timing_ms"]
        return out["action_chunk"][0], 0.0, {"preprocess": timing["preprocess"], "infer": timing["infer"]}


class Floor(Transport):
    """The floor server's raw TCP protocol: one sendmsg of the frames' and proprioception's own buffers."""

    def __init__(self, port: int, frames, proprio):
        super().__init__("raw TCP floor")
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.frames, self.proprio = list(frames.values()), proprio

    def request(self):
        parts = [memoryview(np.ascontiguousarray(f)).cast("B") for f in self.frames] + \
                [memoryview(np.ascontiguousarray(self.proprio, dtype=np.float32)).cast("B")]
        parts.insert(0, memoryview(sum(len(p) for p in parts).to_bytes(8, "little")))
        send_all(self.sock, parts)
        reply = b""
        while len(reply) < 8 or len(reply) < 8 + int.from_bytes(reply[:8], "little"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit("the floor server closed the connection")
            reply += chunk
        return np.frombuffer(reply, np.float32, offset=8).reshape(PAST + 1 + FUTURE, DIM), 0.0, {}


class Http(Transport):
    """``POST /predict/diffusion_policy`` on one keep-alive connection: JSON (base64 arrays) or msgpack (raw
    bytes, packed into one reused buffer as the robot client packs)."""

    def __init__(self, client: KeepAliveConnection, frames, proprio, steps, *, binary: bool):
        super().__init__("msgpack HTTP" if binary else "JSON HTTP")
        self.client, self.frames, self.proprio, self.steps, self.binary = client, frames, proprio, steps, binary
        self.packer = MessagePacker()
        media = "application/msgpack" if binary else "application/json"
        self.headers = {"content-type": media, "accept": media}

    def request(self):
        t0 = time.perf_counter()
        typed = typed_msgpack if self.binary else typed_json
        body = {"observation": {"images": {cam: typed(f) for cam, f in self.frames.items()},
                                "lowdim": {PROPRIO: typed(self.proprio)}},
                "num_inference_steps": self.steps, "seed": SEED}
        content = self.packer.pack(body) if self.binary else json.dumps(body).encode()
        t1 = time.perf_counter()
        response = self.client.request("POST", "/predict/diffusion_policy", content, self.headers)
        t2 = time.perf_counter()
        if response.status != 200:
            raise SystemExit(f"{self.name}: {response.status} {response.content[:500]!r}")
        payload = msgpack.unpackb(response.content) if self.binary else json.loads(response.content)
        chunk = np.asarray(payload["action_chunk"], dtype=np.float32)
        t3 = time.perf_counter()
        return chunk, ((t1 - t0) + (t3 - t2)) * 1000, payload["timing_ms"]


class Websocket(Transport):
    def __init__(self, connection, frames, proprio, steps):
        super().__init__("websocket")
        self.connection, self.frames, self.proprio, self.steps = connection, frames, proprio, steps
        self.packer = MessagePacker()

    def request(self):
        t0 = time.perf_counter()
        obs = {f"observation/{cam}": typed_msgpack(f) for cam, f in self.frames.items()}
        frame = self.packer.pack({**obs, "observation/state": typed_msgpack(self.proprio),
                                  "num_inference_steps": self.steps, "seed": SEED})
        t1 = time.perf_counter()
        self.connection.send(frame)
        reply = self.connection.recv()
        t2 = time.perf_counter()
        if isinstance(reply, str):
            raise SystemExit(f"websocket: {reply}")
        payload = msgpack.unpackb(reply)
        chunk = unpack_array(payload["actions"])  # from the current step: (F+1, A)
        t3 = time.perf_counter()
        timing = payload["server_timing"]
        server = {"queue": timing["queue_ms"], "infer": timing["infer_ms"]}
        if "prev_total_ms" in timing:
            server["prev total"] = timing["prev_total_ms"]
        return chunk, ((t1 - t0) + (t3 - t2)) * 1000, server


# ----------------------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench(n_cameras: int, args, workdir: Path) -> dict[str, Any]:
    cameras = [f"cam{i}" for i in range(n_cameras)]
    checkpoint = build_policy(workdir / f"policy-{n_cameras}cam", cameras, args.size)
    rng = np.random.default_rng(n_cameras)
    frames = {cam: rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for cam in cameras}
    proprio = rng.normal(0.5, 1.0, (PAST + 1, DIM)).astype(np.float32)
    pipeline = load_pipeline(checkpoint, device="cpu")
    pipeline.warmup()
    with serve(checkpoint, args.threads) as base, closing(KeepAliveConnection(base, timeout=60)) as client, \
            closing(WebsocketConnection(base.replace("http://", "ws://") + "/ws/diffusion_policy",
                                        max_size=None)) as connection, \
            floor_server(checkpoint, cameras, args.size, args.steps, args.threads) as floor_port:
        metadata = msgpack.unpackb(connection.recv())  # openpi: the metadata frame comes first
        assert metadata["cameras"] == cameras, metadata
        transports = [Direct(pipeline, frames, proprio, args.steps),
                      Floor(floor_port, frames, proprio),
                      Http(client, frames, proprio, args.steps, binary=False),
                      Http(client, frames, proprio, args.steps, binary=True),
                      Websocket(connection, frames, proprio, args.steps)]
        for transport in transports:
            for _ in range(args.warmup):
                transport.call(record=False)
        # Same checkpoint, seed and inputs ⇒ the same chunk over HTTP as in process (the websocket's session
        # conditions on its previous plan, so its chunk differs after the first request).
        direct = transports[0].last_chunk
        for transport in transports[1:4]:
            if not np.allclose(transport.last_chunk, direct, atol=1e-4):
                print(f"  warning: {transport.name} actions differ from the direct call's")
        for _ in range(args.requests):
            for transport in transports:
                transport.call(record=True)
    results: dict[str, Any] = {t.name: t for t in transports}
    results["codec"] = codec_steps(pipeline.robot_io, frames, proprio, args.steps, repeats=max(20, args.requests // 2),
                                   checkpoint=checkpoint)
    return results


def app_without_model(checkpoint: Path, body: bytes, repeats: int) -> float:
    """Median ms of one msgpack ``POST /predict/diffusion_policy`` through the whole app (middleware, FastAPI,
    validation, frame decoding, the reply) as an ASGI call in this process, the model call stubbed: what the
    server's Python costs per request, apart from the HTTP server and the model."""
    import asyncio

    from service import DeploymentSpec, Settings, create_app
    from service.executor import Timed

    app = create_app(Settings(deployments=[DeploymentSpec(name="bench-policy", checkpoint=str(checkpoint))],
                              device="cpu", warmup=False))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict/diffusion_policy", "raw_path": b"/predict/diffusion_policy", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"host", b"bench"), (b"content-type", b"application/msgpack"),
                         (b"accept", b"application/msgpack"), (b"content-length", str(len(body)).encode())]}

    async def run() -> float:
        manager = app.state.manager
        manager.start()
        try:
            deployment = manager.resolve("diffusion_policy", "bench-policy")
            while deployment.status == "loading":
                await asyncio.sleep(0.05)
            real_call, first = deployment.call, {}  # every prediction goes through Deployment.call

            async def stubbed(call):  # the first call runs the model; later ones reuse its result
                if "value" not in first:
                    first["value"] = (await real_call(call)).value
                return Timed(first["value"], 0.0, 0.0)

            deployment.call = stubbed

            async def once() -> None:
                sent, delivered = [], False

                async def receive():
                    nonlocal delivered
                    if delivered:
                        await asyncio.sleep(3600)  # as a client that keeps the connection open
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}

                async def send(message):
                    sent.append(message)

                await app(dict(scope), receive, send)
                if sent[0]["status"] != 200:
                    raise SystemExit(f"the stubbed app answered {sent[0]['status']}: {sent[1].get('body', b'')[:300]}")

            times = []
            for i in range(20 + repeats):
                start = time.perf_counter()
                await once()
                if i >= 20:
                    times.append(time.perf_counter() - start)
            return statistics.median(times) * 1000
        finally:
            manager.shutdown()

    return asyncio.run(run())


def codec_steps(robot_io, frames: dict[str, np.ndarray], proprio: np.ndarray, steps: int,
                repeats: int, checkpoint: Path) -> list[tuple[str, float]]:
    """Medians (ms) of the server's own decoding steps for these bodies, run in this process."""
    from service.codecs import unpack_msgpack
    from service.modalities.action import ActionPredictRequest
    from service.routes.robot_ws import nested_observation

    tail = {"num_inference_steps": steps, "seed": SEED}
    json_body = json.dumps({"observation": {"images": {c: typed_json(f) for c, f in frames.items()},
                                            "lowdim": {PROPRIO: typed_json(proprio)}}, **tail}).encode()
    msgpack_body = msgpack.packb({"observation": {"images": {c: typed_msgpack(f) for c, f in frames.items()},
                                                  "lowdim": {PROPRIO: typed_msgpack(proprio)}}, **tail},
                                 use_bin_type=True)
    ws_frame = msgpack.packb({**{f"observation/{c}": typed_msgpack(f) for c, f in frames.items()},
                              "observation/state": typed_msgpack(proprio), **tail}, use_bin_type=True)
    obj = json.loads(json_body)
    unpacked = unpack_msgpack(msgpack_body)

    def decode_frames(body: dict) -> Callable[[], float]:
        def run() -> float:
            request = ActionPredictRequest.model_validate(body)
            start = time.perf_counter()
            request.observation.decoded_frames(request, "observation")
            return time.perf_counter() - start
        return run

    def median_ms(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(out if isinstance(out, float) else time.perf_counter() - start)
        return statistics.median(times) * 1000

    return [
        (f"JSON body ({len(json_body) / 1024:.0f} KiB) → dict: json.loads", median_ms(lambda: json.loads(json_body))),
        (f"msgpack body ({len(msgpack_body) / 1024:.0f} KiB) → dict, bytes kept: codecs.unpack_msgpack",
         median_ms(lambda: unpack_msgpack(msgpack_body))),
        ("websocket frame → dict: unpack_msgpack + nested_observation",
         median_ms(lambda: nested_observation(unpack_msgpack(ws_frame), robot_io))),
        ("dict → ActionPredictRequest (pydantic)", median_ms(lambda: ActionPredictRequest.model_validate(obj))),
        ("frames (JSON): base64 decode + decode_array + image_from_array", median_ms(decode_frames(obj))),
        ("frames (msgpack): decode_array + image_from_array", median_ms(decode_frames(unpacked))),
        ("the whole app for the msgpack body (an ASGI call, model call stubbed)",
         app_without_model(checkpoint, msgpack_body, repeats)),
    ]


def report(n_cameras: int, args, results: dict[str, Any]) -> None:
    payload_kib = n_cameras * args.size * args.size * 3 / 1024
    print(f"\n{n_cameras} camera{'s' if n_cameras > 1 else ''} ({args.size}x{args.size} uint8, {payload_kib:.0f} KiB "
          f"raw), {args.steps} steps, {args.requests} requests each")
    direct_p50 = statistics.median(results["direct"].total_ms)
    floor_p50 = statistics.median(results["raw TCP floor"].total_ms)
    print(f"  {'transport':<13} {'p50 ms':>8} {'p99 ms':>8} {'overhead p50':>13} {'over floor':>11} "
          f"{'client codec':>13}  goal")
    for name in TRANSPORTS:
        t = results[name]
        p50, p99 = statistics.median(t.total_ms), percentile(t.total_ms, 99)
        overhead = "" if name == "direct" else f"{p50 - direct_p50:+10.2f} ms"
        over_floor = "" if name in ("direct", "raw TCP floor") else f"{p50 - floor_p50:+8.2f} ms"
        codec = "" if name in ("direct", "raw TCP floor") else f"{statistics.median(t.client_ms):10.2f} ms"
        goal = ""
        if name in ("msgpack HTTP", "websocket"):
            goal = "met" if p50 - direct_p50 <= 1.0 else "NOT met"
        print(f"  {name:<13} {p50:8.2f} {p99:8.2f} {overhead:>13} {over_floor:>11} {codec:>13}  {goal}")
    print("  server-reported medians (ms):")
    for name in TRANSPORTS:
        t = results[name]
        if not t.server:
            continue
        parts = ", ".join(f"{key} {statistics.median(values):.2f}" for key, values in t.server.items())
        extra = ""
        # Round trip − client codec − the server's own total: the HTTP stack, middleware (msgpack unpacking), body
        # parsing and validation, reply encoding and the loopback hops (HTTP); framing and the hops (websocket,
        # whose reply k carries frame k−1's receive-to-send time).
        if "total" in t.server:
            outside = [a - c - b for a, c, b in zip(t.total_ms, t.client_ms, t.server["total"])]
            extra = f" | outside the handler {statistics.median(outside):.2f}"
        elif "prev total" in t.server:
            outside = [a - c - b for a, c, b in zip(t.total_ms[:-1], t.client_ms[:-1], t.server["prev total"][1:])]
            extra = f" | outside the frame handler {statistics.median(outside):.2f}"
        print(f"    {name:<13} {parts}{extra}")
    print("  server-side decoding steps, run in this process (medians, ms):")
    for label, ms in results["codec"]:
        print(f"    {ms:7.3f}  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", default="1,3", help="camera counts, comma-separated")
    parser.add_argument("--size", type=int, default=224, help="frame height and width (pixels)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per transport")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per transport first")
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per request")
    parser.add_argument("--floor-serve", nargs=4, metavar=("PORT", "CHECKPOINT", "CAMERAS", "SIZE"),
                        help=argparse.SUPPRESS)  # the floor server's process
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in the servers (OMP_NUM_THREADS); default: what the server's "
                             "VLA_TORCH_THREADS=auto picks on this host (its usable CPUs less one), so that the "
                             "direct call and the floor run as the server does")
    args = parser.parse_args()
    if args.threads is None and not args.floor_serve:
        from service.torch_threads import choose_torch_threads

        # (None under OMP_NUM_THREADS, which this process and both servers read alike)
        args.threads = choose_torch_threads("auto")[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.floor_serve:
        port, checkpoint, cameras, size = args.floor_serve
        serve_floor(int(port), Path(checkpoint), cameras.split(","), int(size))
        return

    counts = [int(c) for c in args.cameras.split(",")]
    print(f"diffusion_policy, ViT 32 px + transformer width 64, P={PAST} F={FUTURE}, proprio/action dim {DIM} | "
          f"cpu, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()} | loopback, "
          "keep-alive")
    with tempfile.TemporaryDirectory() as workdir:
        for n in counts:
            report(n, args, bench(n, args, Path(workdir)))


if __name__ == "__main__":
    main()
