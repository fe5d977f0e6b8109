"""A fleet of robots on one policy: throughput and latency vs concurrency, our server (batching off / on) vs LitServe.

    python bench/fleet.py [--checkpoint DIR | --tiny | --gpu-policy | --simulated-gpu [BASE_MS,PER_ROBOT_MS]]
                          [--device cpu|cuda] [--dtype auto|bfloat16]
                          [--concurrency 1,4,16,64]
                          [--seconds 10] [--warmup 2]
                          [--transport msgpack|websocket|both] [--steps N] [--threads N] [--batch-timeout 0.005]
                          [--no-starvation] [--no-litserve] [--no-model-process] [--robot-processes N]
    python bench/fleet.py --replicas N [--robots 16] [--checkpoint DIR | --tiny] [--seconds 10]

(--replicas: robots on HTTP sessions against 1 and N replicas on Ray Serve; bench/fleet_replicas.py says how.)

N simulated robots run in a closed loop (each sends a request, waits for the reply, sends the
next), one thread and one client each (threads of this process, or of --robot-processes
processes), against a live server serving one `diffusion_policy`
checkpoint (default: the demo policy, built first if missing, several minutes; --tiny: a
random-weight ViT policy saved in a temporary directory, for checking the script). Each row
runs --warmup seconds, then measures for --seconds: a request counts (latency, req/s, batch
size) when its reply arrives inside that window; errors count over the whole row. Latency is
`time.perf_counter()` around the client call, so the client's encoding and decoding count.
Four servers, per concurrency in turn (so drift on a shared CPU hits them alike):
- `ours, batching off`: `vla-foundry serve` with `VLA_MAX_BATCH_SIZE=1`;
- `ours, batching on`: the same with `VLA_MAX_BATCH_SIZE` = the largest concurrency asked for
  (one server for all rows; each model call takes every queued request, up to that many);
- `ours, batching on, model process`: the same with `VLA_MODEL_PROCESS=true` (the policy's model calls in
  a child process, `service/model_process.py`; --no-model-process leaves it out);
- `LitServe`: the same pipeline (`load_pipeline`, `ActionPipeline.predict_each`, the call our
  server makes) behind LitServe's own batching, `max_batch_size` = the row's concurrency,
  `batch_timeout` --batch-timeout, one worker, on --device, on 127.0.0.1. It is installed with pip
  on first use (it is not a dependency of the package) and started per row; where it cannot be
  installed (a GPU host without the registry and without its wheels) its rows are left out, and so
  with --no-litserve.
Our server is asked through the robot client (`vla_foundry_client`): msgpack HTTP
(`HttpPolicyClient`, one keep-alive connection per robot) or the websocket
(`WebsocketPolicyClient`, one connection = one session per robot). LitServe gets JSON over
HTTP (`httpx.Client` per robot, keep-alive), arrays as typed arrays with base64 data. Every
request carries the stateless observation (one frame per camera and image index, [P+1][d]
proprioception rows, the instruction when the policy reads one), a seed of its own
(robot × 100000 + request) and the deployment's default step count.
Printed: per server and concurrency req/s, p50/p99 ms, the mean batch size requests shared
(from `timing_ms.batch_size` / `server_timing.batch_size`; LitServe does not report it), the
medians of our replies' own timing (queue, model call, and over HTTP the whole route, so the
p50 minus the route is the clients' and the HTTP stack's share), errors; then ratios against
LitServe and the goals of the issue (on CUDA, and with --simulated-gpu, also the GPU goals:
16 robots ≥ 10× one robot's req/s, and one robot's p50 ≤ 1.5× the compute floor: the policy's
sampling alone from its graphs for one robot, `policy_sampling.sampling_floor_ms`, measured on
--device in this process before the servers start, on CPU too). Then "starvation": one
msgpack-HTTP robot on each batching server (in-thread, model process) alone, while 16 threads poll `GET /health/live` 20
times a second each, and while 16 threads flood it; the health threads run in a second
process, so they take no GIL time from the robot's process (only CPU, as any client would).
Torch threads: 1 in every server process by default (OMP_NUM_THREADS / MKL_NUM_THREADS, the
same for ours and LitServe's worker); --threads 0 sets none (ours then runs VLA_TORCH_THREADS=auto,
the usable CPUs less one; LitServe's worker torch's default, every core). Why: the
robots' threads run on the same host, so a server with 2 torch threads on a 2-core machine
oversubscribes the cores, and every op of the intra-op pool waits for its slowest, possibly
descheduled, thread: on the 2-core dev VM with the tiny policy, other jobs sharing it, 4 robots
got 0.7-46 req/s at p50 50 ms-4 s from run to run at the default, 84-141 req/s at p50 29-45 ms
with 1 thread. A real fleet's robots are other machines; here they take CPU from the servers.

--simulated-gpu: the GPU-sized policy's requests (3 cameras at 224 px) against servers whose device is
simulated (`bench/simulated_gpu/sitecustomize.py`, on every server's PYTHONPATH, LitServe's worker included): each
batch's sampling sleeps BASE_MS + PER_ROBOT_MS × (robots − 1) without the interpreter lock, as a thread waits for
a GPU's graph replay (default 6.2,0.45: the bfloat16 CUDA graphs measured on an H100 and an H200), the frames are
copied once as uint8, and everything else runs as on a GPU host; the compute floor is BASE_MS. It lets a CPU host
study the host side of GPU serving (what bounds 16 robots there, `make gpu-check`'s fleet step); its figures are
the CPU host's, and the README compares them with the H100's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import astuple, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench_support import build_policy, demo_policy, free_port, main_thread_cpu_s, serve_command, server_process
from service.gc_pauses import freeze_long_lived
from vla_foundry_client import HttpPolicyClient, WebsocketPolicyClient
from vla_foundry_client.arrays import pack, unpack

try:  # not a dependency of the package: installed on first use (ensure_litserve)
    import litserve
except ImportError:
    litserve = None

HERE = Path(__file__).resolve().parent
HEALTH_THREADS, POLL_HZ = 16, 20
REPLY_TIMEOUT_S = 60.0  # one request; every robot loop also ends at its row's end
START_TIMEOUT_S = 180.0  # connected robots wait this long for their row to start (robot processes: for the slowest)
GOAL_SCALING, GOAL_VS_LITSERVE, GOAL_TAIL = 3.0, 1.5, 3.0
GOAL_GPU_SCALING, GOAL_GPU_FLOOR = 10.0, 1.5  # on CUDA: 16 robots ÷ 1 robot; one robot's p50 ÷ the compute floor
GOAL_HEALTH_P50, GOAL_FLOOD_RPS = 1.2, 0.5


# ----------------------------------------------------------------------------- the policy


def resolve_checkpoint(args: argparse.Namespace, scratch: Path) -> Path:
    """--tiny, else --checkpoint, else the demo policy (trained here first when its pack lacks it)."""
    if args.tiny:
        print("checkpoint: a tiny random-weight policy (--tiny), in a temporary directory", flush=True)
        return build_policy(scratch / "tiny-policy", ["front"], 64)
    if args.simulated_gpu:
        print(f"checkpoint: the GPU-sized policy's inputs (3 cameras at 224 px) on a tiny random-weight model, its "
              f"sampling simulated (--simulated-gpu {args.simulated_gpu}), in a temporary directory", flush=True)
        return build_policy(scratch / "simulated-gpu-policy", ["left", "right", "wrist"], 224, model_input=224)
    if args.gpu_policy:
        print("checkpoint: a GPU-sized random-weight policy (--gpu-policy: 3 cameras at 224 px, a ViT-B/32-sized "
              "backbone, 10 flow steps), in a temporary directory", flush=True)
        return build_policy(scratch / "gpu-policy", ["left", "right", "wrist"], 224, gpu_sized=True)
    if args.checkpoint:
        return Path(args.checkpoint)
    return demo_policy()


def simulated_gpu_setting(text: str) -> str:
    """--simulated-gpu's value, checked: two non-negative numbers of milliseconds, BASE_MS,PER_ROBOT_MS."""
    try:
        base, per = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BASE_MS,PER_ROBOT_MS (e.g. 6.2,0.45); got {text!r}") from None
    if base < 0 or per < 0:
        raise argparse.ArgumentTypeError(f"the milliseconds must not be negative; got {text!r}")
    return f"{base:g},{per:g}"


# ----------------------------------------------------------------------------- the servers


DEVICE = "cpu"  # --device: where every server runs its model
DTYPE = "auto"  # --dtype: the model's dtype in every server (auto: the rule our server applies, float32 on CPU)
TORCH_THREADS: Optional[int] = 1  # --threads: the same torch thread count in every server; 0 or None: each its own
SIMULATED_GPU: Optional[str] = None  # --simulated-gpu: "BASE_MS,PER_ROBOT_MS" of every server's simulated sampling


def server_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    if SIMULATED_GPU:  # bench/simulated_gpu/sitecustomize.py, imported first by every server process
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "simulated_gpu"), env.get("PYTHONPATH")]))
        env["VLA_BENCH_SIMULATED_GPU"] = SIMULATED_GPU
    if TORCH_THREADS:  # torch reads these at start-up, in our server and in LitServe's spawned worker alike
        env.update(OMP_NUM_THREADS=str(TORCH_THREADS), MKL_NUM_THREADS=str(TORCH_THREADS))
    return env


@contextmanager
def our_server(checkpoint: Path, max_batch_size: int, model_process: bool = False) -> Iterator[Optional[str]]:
    port = free_port()
    command = serve_command() + ["serve", "--checkpoint", f"{checkpoint}=policy", "--host", "127.0.0.1", "--port",
                           str(port), "--device", DEVICE, "--dtype", DTYPE]
    env = server_env(VLA_MAX_BATCH_SIZE=str(max_batch_size), VLA_MODEL_PROCESS=str(model_process).lower())
    with server_process(command, env, port, "/health/ready", f"our server (VLA_MAX_BATCH_SIZE={max_batch_size}, "
                        f"VLA_MODEL_PROCESS={str(model_process).lower()})") as b:
        yield b


@contextmanager
def litserve_server(checkpoint: Path, max_batch_size: int, batch_timeout: float, steps: int) -> Iterator[str]:
    """This script's --litserve-worker mode in a subprocess: LitServe on 127.0.0.1 and a free port."""
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--litserve-worker", "--checkpoint", str(checkpoint),
               "--port", str(port), "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout),
               "--steps", str(steps), "--device", DEVICE, "--dtype", DTYPE]
    with server_process(command, server_env(), port, "/health", f"LitServe (max_batch_size={max_batch_size})") as b:
        yield b


def ensure_litserve() -> Optional[str]:
    """LitServe's version, installed with pip first when missing; None (its rows are left out) when it cannot be."""
    global litserve
    if litserve is None:
        print(f"litserve is not installed: running {sys.executable} -m pip install litserve", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--retries", "1", "--timeout", "15",
                            "litserve"], check=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as e:
            print(f"LitServe could not be installed ({e}): its rows are left out", flush=True)
            return None
        import importlib

        importlib.invalidate_caches()  # the import system's directory listings predate the install
        import litserve as installed

        litserve = installed
    return getattr(litserve, "__version__", "?")


if litserve is not None:
    # At module level so LitServe can pickle it into its spawned worker (which imports this file again).

    class PolicyAPI(litserve.LitAPI):
        """The policy pipeline behind LitServe: the same `predict_each` call our server's batches make."""

        def __init__(self, checkpoint: str, steps: int, device: str = "cpu", dtype: str = "auto", **kwargs: Any):
            super().__init__(**kwargs)
            self.checkpoint, self.steps, self.device_name, self.dtype = checkpoint, steps, device, dtype

        def setup(self, device: str) -> None:
            from vla_foundry.pipelines import load_pipeline

            self.pipeline = load_pipeline(self.checkpoint, device=self.device_name, dtype=self.dtype)
            # As our server does before it reports ready: the sampling graph of every batch size it may form.
            self.pipeline.warmup(max(1, self.max_batch_size))

        def decode_request(self, request: dict, **kwargs: Any) -> Any:
            from vla_foundry.pipelines.action import PolicyRequest
            from vla_foundry.robotics.observations import RawObservation
            from vla_foundry.robotics.robot_io import image_names_for

            observation = unpack(request["observation"])
            indices = self.pipeline.robot_io.image_indices
            images = {}
            for camera, frames in observation["images"].items():  # one frame per image index, oldest first
                frames = frames if isinstance(frames, list) else [frames]
                images.update(zip(image_names_for([camera], indices), frames))
            lowdim = {name: np.asarray(rows, np.float32) for name, rows in observation["lowdim"].items()}
            sample = RawObservation(images, lowdim, observation.get("language_instruction") or "")
            return PolicyRequest(sample, seed=request.get("seed"))

        def batch(self, inputs: list) -> list:
            return list(inputs)

        def predict(self, x: Any, **kwargs: Any) -> Any:
            # max_batch_size 1 runs LitServe's unbatched loop: one request, one output.
            if isinstance(x, list):
                return self.pipeline.predict_each(x, num_inference_steps=self.steps)
            return self.pipeline.predict_each([x], num_inference_steps=self.steps)[0]

        def unbatch(self, output: list) -> list:
            return list(output)

        def encode_response(self, output: Any, **kwargs: Any) -> dict:
            return {"action_chunk": output.action_chunk.tolist()}  # an ActionChunk


def litserve_worker(args: argparse.Namespace) -> None:
    """--litserve-worker: LitServe serving the checkpoint, one worker (on --device), bound to 127.0.0.1 only."""
    api = PolicyAPI(args.checkpoint, args.steps, args.device, args.dtype, max_batch_size=args.max_batch_size,
                    batch_timeout=args.batch_timeout)
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = litserve.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


# ----------------------------------------------------------------------------- the robots


def observation_for(io: dict, rng: np.random.Generator) -> dict:
    """A stateless observation of the deployment's io: one random frame per camera and image index (the size
    the policy resizes to), [P+1][d] proprioception rows, the instruction when the policy reads one."""
    size = io["image"].get("resize_to") or [io["image"].get("model_size") or 32] * 2
    frames = len(io["image_indices"])
    observation: dict[str, Any] = {
        "images": {cam: [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(frames)]
                   for cam in io["cameras"]},
        "lowdim": {p["field"]: rng.normal(0, 1, (p["steps"], p["dim"])).astype(np.float32)
                   for p in io["proprioception"]}}
    if io.get("uses_language"):
        observation["language_instruction"] = "move to the red target"
    return observation


class OurRobot:
    """Our server through the robot client: `HttpPolicyClient` (msgpack, one keep-alive connection) or
    `WebsocketPolicyClient` (one connection = one session); the reply says how many requests shared its call."""

    def __init__(self, base: str, observation: dict, steps: int, *, client: type,
                 timing: Callable[[dict], "ServerTiming"]):
        extra = {"format": "msgpack"} if client is HttpPolicyClient else {}
        self.client = client(base, timeout=REPLY_TIMEOUT_S, **extra)
        self.observation, self.steps, self.timing = observation, steps, timing

    def call(self, seed: int) -> Optional["ServerTiming"]:
        """What the reply says of its time in the server."""
        return self.timing(self.client.infer(self.observation, seed=seed, num_inference_steps=self.steps))

    def close(self) -> None:
        self.client.close()


class LitServeRobot:
    """LitServe over JSON HTTP: `httpx.Client` (keep-alive), typed arrays with base64 data."""

    def __init__(self, base: str, observation: dict, steps: int):
        self.client = httpx.Client(base_url=base, timeout=REPLY_TIMEOUT_S)
        self.observation = observation

    def call(self, seed: int) -> Optional[dict]:
        # Packed per request, as a robot would with a fresh frame (the msgpack client packs every request too).
        body = json.dumps({"observation": pack(self.observation, binary=False), "seed": seed})
        reply = self.client.post("/predict", content=body, headers={"content-type": "application/json"})
        reply.raise_for_status()
        if not reply.json()["action_chunk"]:
            raise ValueError("empty action_chunk")
        return None

    def close(self) -> None:
        self.client.close()


@dataclass
class ServerTiming:
    """A reply's time in our server (ms), the same fields whichever transport carried it."""

    batch_size: int
    queue: float  # waiting for the model thread
    run: float  # the model call: over HTTP the pipeline's sampling and chunks (its preparation counts as the
    # route's), over the websocket the whole call
    handler: Optional[float]  # the route, body decoded to reply encoded (HTTP only: the websocket reports none)
    prep: Optional[float] = None  # the request's preparation: its images decoded before it queued, and the batch's
    # inputs made (stacked, on the device) in the call before the sampling (HTTP only)


def http_timing(reply: dict) -> ServerTiming:
    t = reply["timing_ms"]
    return ServerTiming(t["batch_size"], t["queue"], t["infer"], t["total"], t.get("preprocess"))


def websocket_timing(reply: dict) -> ServerTiming:
    t = reply["server_timing"]
    return ServerTiming(t["batch_size"], t["queue_ms"], t["infer_ms"], None)


ROBOTS = {"msgpack": partial(OurRobot, client=HttpPolicyClient, timing=http_timing),
          "websocket": partial(OurRobot, client=WebsocketPolicyClient, timing=websocket_timing),
          "litserve": LitServeRobot}
TRANSPORT_NAMES = {"msgpack": "msgpack HTTP", "websocket": "websocket", "litserve": "JSON HTTP"}


@dataclass
class Row:
    server: str
    concurrency: int
    rps: float
    p50: float  # ms
    p99: float  # ms
    mean_batch: Optional[float]
    errors: int
    requests: int
    first_error: str = ""
    queue_p50: Optional[float] = None  # ms, from the replies' own timing (ours only): waiting for the model thread
    run_p50: Optional[float] = None  # ms: the model call (ServerTiming.run)
    handler_p50: Optional[float] = None  # ms: the whole route (HTTP only); p50 minus this is outside the route
    prep_p50: Optional[float] = None  # ms: the preparation (ServerTiming.prep, HTTP only)
    loop_us: Optional[float] = None  # the server's main thread (event loop) CPU time per request, µs (LoopClock)
    loop_busy: Optional[float] = None  # the same over the window: the share of one core it kept busy
    extra: dict = field(default_factory=dict)


@dataclass
class Window:
    """The row's clock: robots start together once all are connected; replies count inside [start, end]."""

    barrier: threading.Barrier
    go: threading.Event = field(default_factory=threading.Event)
    start: float = 0.0
    end: float = 0.0


@dataclass
class RobotLog:
    latencies: list = field(default_factory=list)
    timings: list = field(default_factory=list)  # ServerTiming per reply (ours only)
    errors: int = 0
    first_error: str = ""

    def error(self, e: BaseException) -> None:
        self.errors += 1
        self.first_error = self.first_error or f"{type(e).__name__}: {e}"[:200]


def robot_loop(index: int, connect: Callable[[int], Any], window: Window, log: RobotLog) -> None:
    """One robot: connect, wait for the others, then request after request until the window ends."""
    robot = None
    try:
        robot = connect(index)
    except Exception as e:
        log.error(e)
    try:
        window.barrier.wait()
    except threading.BrokenBarrierError:
        return
    if not window.go.wait(timeout=START_TIMEOUT_S):
        log.error(TimeoutError(f"the row did not start within {START_TIMEOUT_S:.0f} s"))
        if robot is not None:
            robot.close()
        return
    i = 0
    try:
        while time.perf_counter() < window.end:
            if robot is None:  # after a failure: a fresh client (a websocket is closed after an error)
                try:
                    robot = connect(index)
                except Exception as e:
                    log.error(e)
                    time.sleep(0.1)
                    continue
            seed = index * 100000 + i
            i += 1
            started = time.perf_counter()
            try:
                timing = robot.call(seed)
            except Exception as e:
                log.error(e)
                robot.close()
                robot = None
                time.sleep(0.1)  # no hot loop against a failing server
                continue
            done = time.perf_counter()
            if window.start <= done <= window.end:
                log.latencies.append(done - started)
                if timing is not None:
                    log.timings.append(timing)
    finally:
        if robot is not None:
            robot.close()


def run_robots(name: str, indices: list[int], connect: Callable[[int], Any], window_start: Callable[[], float],
               seconds: float, on_window: Callable[[float], None] = lambda start: None
               ) -> tuple[list[RobotLog], int]:
    """Robot threads ``indices``: they connect, then ``window_start()`` (called once all have) gives the measured
    window's start (a ``time.perf_counter`` time), which lasts ``seconds``. Their logs, and how many were stuck
    (still waiting for a reply REPLY_TIMEOUT_S + 5 s after the window's end). ``on_window(start)`` is called once
    the start is known."""
    window = Window(threading.Barrier(len(indices) + 1, timeout=120))
    logs = [RobotLog() for _ in indices]
    threads = [threading.Thread(target=robot_loop, args=(i, connect, window, log), daemon=True, name=f"robot-{i}")
               for i, log in zip(indices, logs)]
    for t in threads:
        t.start()
    try:
        window.barrier.wait()
    except threading.BrokenBarrierError:
        raise SystemExit(f"{name}: the robots did not connect within 120 s") from None
    window.start = window_start()
    window.end = window.start + seconds
    on_window(window.start)
    window.go.set()
    deadline = window.end + REPLY_TIMEOUT_S + 5  # each ends after its request in flight at the window's end
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))
    return logs, sum(t.is_alive() for t in threads)


def robot_process(transport: str, base: str, io: dict, steps: int, indices: list[int], seconds: float,
                  ready: Any, starts: Any, out: Any) -> None:
    """--robot-processes: one process's share of the robots (its own interpreter, so the robots' Python work is
    not all under one lock). Reports ready once its robots are connected, takes the window's start from
    ``starts`` (``time.perf_counter`` is the system's monotonic clock on Linux, the same in every process),
    and sends back its logs as plain values."""
    connect = robot_connector(transport, base, io, steps)

    def window_start() -> float:
        ready.put(os.getpid())
        return starts.get(timeout=START_TIMEOUT_S)

    logs, stuck = run_robots(f"robot process {os.getpid()}", indices, connect, window_start, seconds)
    out.put(([(log.latencies, [astuple(t) for t in log.timings], log.errors, log.first_error)
              for log in logs], stuck))


def run_robot_processes(transport: str, base: str, io: dict, steps: int, robots: int, processes: int,
                        warmup: float, seconds: float, on_window: Callable[[float], None] = lambda start: None
                        ) -> tuple[list[RobotLog], int]:
    """The robots spread over ``processes`` processes (robot i in process i mod processes); their logs.
    ``on_window(start)`` is called once the measured window's start is known."""
    context = multiprocessing.get_context("spawn")  # the parent may hold a CUDA context (the compute floor)
    ready, starts, out = context.Queue(), context.Queue(), context.Queue()
    shares = [list(range(p, robots, processes)) for p in range(processes)]
    children = [context.Process(target=robot_process, args=(transport, base, io, steps, share, seconds, ready,
                                                            starts, out), daemon=True) for share in shares]
    for child in children:
        child.start()
    try:
        for _ in children:
            take(ready, children, START_TIMEOUT_S)
        start = time.perf_counter() + warmup
        on_window(start)
        for _ in children:
            starts.put(start)
        results = [take(out, children, warmup + seconds + REPLY_TIMEOUT_S + 60) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    logs = [RobotLog(latencies, [ServerTiming(*t) for t in timings], errors, first_error)
            for plain, _ in results for latencies, timings, errors, first_error in plain]
    return logs, sum(stuck for _, stuck in results)


def take(messages: Any, children: list, timeout: float) -> Any:
    """The next message from the robot processes, checking every second that none of them died without one."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            return messages.get(timeout=1.0)
        except queue.Empty:
            dead = [c.exitcode for c in children if c.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"a robot process exited with status {dead[0]} (its error is above)") from None
            if time.perf_counter() > deadline:
                raise SystemExit(f"a robot process did not report within {timeout:.0f} s") from None


def row_of(server: str, robots: int, logs: list[RobotLog], stuck: int, seconds: float) -> Row:
    """The row of the robots' logs over the ``seconds`` measured."""
    latencies = [x for log in logs for x in log.latencies]
    timings = [t for log in logs for t in log.timings]
    errors = sum(log.errors for log in logs) + stuck
    first_error = next((log.first_error for log in logs if log.first_error), "")
    if stuck:
        first_error = first_error or f"{stuck} robot threads still waiting after the row"
    ms = np.asarray(latencies) * 1000
    return Row(server, robots, len(latencies) / seconds,
               float(np.percentile(ms, 50)) if len(ms) else float("nan"),
               float(np.percentile(ms, 99)) if len(ms) else float("nan"),
               statistics.fmean(t.batch_size for t in timings) if timings else None, errors, len(latencies),
               first_error, queue_p50=median_of(timings, "queue"), run_p50=median_of(timings, "run"),
               handler_p50=median_of(timings, "handler"), prep_p50=median_of(timings, "prep"))


def median_of(timings: list[ServerTiming], name: str) -> Optional[float]:
    values = [getattr(t, name) for t in timings if getattr(t, name) is not None]
    return statistics.median(values) if values else None


def robot_connector(transport: str, base: str, io: dict, steps: int) -> Callable[[int], Any]:
    """A new client for robot ``index``, with the observation it sends every time (its own random frames)."""
    robot_cls = ROBOTS[transport]
    observations: dict[int, dict] = {}

    def connect(index: int) -> Any:  # robot ``index`` keeps its observation across reconnects
        if index not in observations:
            observations[index] = observation_for(io, np.random.default_rng(index))
        return robot_cls(base, observations[index], steps)

    return connect


class LoopClock:
    """The CPU time the server's main thread (its event loop: HTTP, msgpack, validation, replies) spends in a row's
    measured window, read at the window's start and end by a thread of its own (Linux only: else None)."""

    def __init__(self, base: str, seconds: float):
        self.base, self.seconds, self.used_s = base, seconds, None
        self.thread: Optional[threading.Thread] = None

    def start(self, window_start: float) -> None:
        self.thread = threading.Thread(target=self._read, args=(window_start,), daemon=True)
        self.thread.start()

    def _read(self, window_start: float) -> None:
        time.sleep(max(0.0, window_start - time.perf_counter()))
        before = main_thread_cpu_s(self.base)
        time.sleep(max(0.0, window_start + self.seconds - time.perf_counter()))
        after = main_thread_cpu_s(self.base)
        if before is not None and after is not None:
            self.used_s = after - before

    def result(self) -> Optional[float]:
        if self.thread is not None:
            self.thread.join()
        return self.used_s


def measure(server: str, transport: str, base: str, robots: int, io: dict, steps: int,
            args: argparse.Namespace) -> Row:
    processes = min(robots, max(1, args.robot_processes))
    clock = LoopClock(base, args.seconds)
    on_window = clock.start if transport != "litserve" else lambda start: None  # ours: LitServe's loop is elsewhere
    if processes > 1:
        logs, stuck = run_robot_processes(transport, base, io, steps, robots, processes, args.warmup, args.seconds,
                                          on_window)
    else:
        logs, stuck = run_robots(server, list(range(robots)), robot_connector(transport, base, io, steps),
                                 lambda: time.perf_counter() + args.warmup, args.seconds, on_window)
    row = row_of(server, robots, logs, stuck, args.seconds)
    loop_s = clock.result()
    if loop_s is not None and row.requests:
        row.loop_us, row.loop_busy = loop_s / row.requests * 1e6, loop_s / args.seconds
    batch = f", mean batch {row.mean_batch:.2f}" if row.mean_batch is not None else ""
    print(f"  {server}, {robots} robots: {row.rps:.1f} req/s, p50 {row.p50:.1f} ms, p99 {row.p99:.1f} ms{batch}, "
          f"{row.errors} errors{(' (' + row.first_error + ')') if row.first_error else ''}", flush=True)
    return row


# ----------------------------------------------------------------------------- starvation: /health/live load


def health_load(url: str, mode: str, threads: int, seconds: float) -> None:
    """--health-load: ``threads`` threads, each on its own keep-alive connection, GET /health/live for
    ``seconds``: 20 times a second each (poll) or as fast as they can (flood). Prints a JSON summary."""
    parts = urlsplit(url)
    counts, errors = [0] * threads, [0] * threads

    def worker(i: int, deadline: float) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        next_at = time.perf_counter()
        while time.perf_counter() < deadline:
            try:
                conn.request("GET", "/health/live")
                conn.getresponse().read()
                counts[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                time.sleep(0.05)
            if mode == "poll":
                next_at += 1 / POLL_HZ
                time.sleep(max(0.0, next_at - time.perf_counter()))
        conn.close()

    print("ready", flush=True)
    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i, started + seconds), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=seconds + 30)
    elapsed = time.perf_counter() - started
    print(json.dumps({"requests": sum(counts), "errors": sum(errors), "rps": sum(counts) / elapsed}), flush=True)


@contextmanager
def health_traffic(base: str, mode: Optional[str], seconds: float) -> Iterator[dict]:
    """The /health/live load (none, poll or flood) in a second process for ``seconds``; yields a dict that
    holds its summary afterwards."""
    summary: dict = {}
    if mode is None:
        yield summary
        return
    command = [sys.executable, str(Path(__file__).resolve()), "--health-load", base, "--health-mode", mode,
               "--health-seconds", str(seconds)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":  # EOF: it died; the summary below says so
            raise SystemExit(f"the /health/live load process failed (exit {proc.wait()})")
        yield summary
        out, _ = proc.communicate(timeout=seconds + 60)
        summary.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def starvation(base: str, io: dict, steps: int, args: argparse.Namespace) -> list[tuple[str, Row, dict]]:
    rows = []
    for label, mode in [("quiet", None), (f"{HEALTH_THREADS} threads polling /health/live at {POLL_HZ} Hz", "poll"),
                        (f"{HEALTH_THREADS} threads flooding /health/live", "flood")]:
        # The load runs a little past the robot's warm-up and window, so it covers all of both.
        with health_traffic(base, mode, args.warmup + args.seconds + 1.0) as summary:
            row = measure(f"starvation: {label}", "msgpack", base, 1, io, steps, args)
        rows.append((label, row, summary))
    return rows


# ----------------------------------------------------------------------------- the report


def fmt(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or a != a or b != b or b == 0:
        return None
    return a / b


def times(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("met" if ok else "not met")


def print_table(rows: list[Row]) -> None:
    print("| server | robots | req/s | p50 ms | p99 ms | mean batch | server p50 ms: queue, prep, run, route "
          "| main thread µs/request (busy) | errors |")
    print("|---|---:|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        server = (f"{fmt(r.queue_p50)}, {fmt(r.prep_p50)}, {fmt(r.run_p50)}, {fmt(r.handler_p50)}"
                  if r.queue_p50 is not None else "-")
        loop = f"{r.loop_us:.0f} ({r.loop_busy:.0%})" if r.loop_us is not None else "-"
        print(f"| {r.server} | {r.concurrency} | {fmt(r.rps)} | {fmt(r.p50)} | {fmt(r.p99)} | "
              f"{fmt(r.mean_batch, 2)} | {server} | {loop} | {r.errors} |")
    print("(server p50: from the replies' own timing: queue = waiting for the model thread, prep = the request's "
          "images decoded before it queued and the batch's inputs made in the call (HTTP only), run = the model call "
          "(over HTTP its sampling and chunks, over the websocket all of it), route = the whole route from the "
          "decoded body to the encoded reply, HTTP only; the p50 minus the route is the client's and the HTTP "
          "stack's share; main thread: the server's event loop's CPU time per request in the window, and the share "
          "of one core it kept busy)")
    for r in rows:
        if r.first_error:
            print(f"first error of {r.server} at {r.concurrency}: {r.first_error}")


def compute_floor(checkpoint: Path, steps: Optional[int]) -> float:
    """One robot's compute floor on --device: the policy's sampling alone from its graphs, in this process (with the
    servers' torch threads on CPU), before the servers start; with --simulated-gpu its simulated sampling."""
    if SIMULATED_GPU:
        floor_ms = float(SIMULATED_GPU.split(",")[0])
        print(f"compute floor of one robot's request (simulated GPU): {floor_ms:.2f} ms", flush=True)
        return floor_ms
    import torch
    from policy_sampling import sampling_floor_ms

    if DEVICE == "cpu" and TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)
    floor_ms = sampling_floor_ms(checkpoint, DEVICE, steps, dtype=DTYPE)
    print(f"compute floor of one robot's request on {DEVICE} ({DTYPE}): {floor_ms:.2f} ms (the policy's sampling "
          "alone from its graphs, median of 20)", flush=True)
    return floor_ms


def print_ratios(results: dict[tuple[str, int], Row], transports: list[str], concurrency: list[int],
                 floor_ms: float) -> None:
    """Ratios and goals per transport (on CUDA the GPU goals too); ``floor_ms``: one robot's compute floor."""
    lit = "LitServe (JSON HTTP)"
    for transport, variant in [(t, v) for t in transports for v in ("on", "on, model process")]:
        name = TRANSPORT_NAMES[transport]
        on, off = f"ours, batching {variant} ({name})", f"ours, batching off ({name})"
        if (on, concurrency[0]) not in results:  # (--no-model-process)
            continue
        print(f"\nratios, {on}:")
        for c in concurrency:
            r_on, r_off, r_lit = results[(on, c)], results[(off, c)], results.get((lit, c))
            print(f"- {c} robots: req/s ÷ LitServe {times(ratio(r_on.rps, r_lit and r_lit.rps))}, "
                  f"p50 ÷ LitServe {times(ratio(r_on.p50, r_lit and r_lit.p50))}, "
                  f"req/s ÷ batching off {times(ratio(r_on.rps, r_off.rps))}")
        r1, r16, l16 = results.get((on, 1)), results.get((on, 16)), results.get((lit, 16))
        scaling = ratio(r16.rps, r1.rps) if r1 and r16 else None
        tail = ratio(r16.p99, r16.p50) if r16 else None
        vs_lit = ratio(r16.rps, l16.rps) if r16 and l16 else None
        print(f"- req/s at 16 ÷ req/s at 1: {times(scaling)}; p99 ÷ p50 at 16: {times(tail)}")
        print(f"goals ({on}):")
        print(f"- throughput at concurrency 16 ≥ {GOAL_SCALING:g}× concurrency 1: {times(scaling)} — "
              f"{verdict(None if scaling is None else scaling >= GOAL_SCALING)}")
        p50_ok = None if not (r16 and l16) else r16.p50 <= l16.p50
        lit_ok = None if vs_lit is None or p50_ok is None else (vs_lit >= GOAL_VS_LITSERVE and p50_ok)
        p50s = f"p50 {fmt(r16.p50)} ms vs LitServe {fmt(l16.p50)} ms" if r16 and l16 else "p50 -"
        print(f"- ≥ {GOAL_VS_LITSERVE:g}× LitServe's throughput at concurrency 16 with p50 no worse than "
              f"LitServe's: {times(vs_lit)}, {p50s} — {verdict(lit_ok)}")
        print(f"- p99 at concurrency 16 ≤ {GOAL_TAIL:g}× its p50: {times(tail)} — "
              f"{verdict(None if tail is None else tail <= GOAL_TAIL)}")
        over_floor = ratio(r1.p50, floor_ms) if r1 else None
        print(f"- one robot's p50 ÷ its compute floor ({floor_ms:.2f} ms): {times(over_floor)}")
        if DEVICE.startswith("cuda") or SIMULATED_GPU:
            print(f"GPU goals ({on}{', simulated GPU' if SIMULATED_GPU else ''}):")
            print(f"- throughput at concurrency 16 ≥ {GOAL_GPU_SCALING:g}× concurrency 1: {times(scaling)} — "
                  f"{verdict(None if scaling is None else scaling >= GOAL_GPU_SCALING)}")
            floor = "the simulated sampling" if SIMULATED_GPU else "sampling from the CUDA graphs alone"
            print(f"- one robot's p50 ≤ {GOAL_GPU_FLOOR:g}× the compute floor ({floor_ms:.2f} ms, {floor}): "
                  f"{times(over_floor)} — "
                  f"{verdict(None if over_floor is None else over_floor <= GOAL_GPU_FLOOR)}")
    if 16 not in concurrency:
        print("(concurrency 16 was not run: the goals at 16 are n/a)")


def print_starvation(server: str, rows: list[tuple[str, Row, dict]]) -> None:
    print(f"\n## starvation (ours, {server}; one robot, msgpack HTTP)\n")
    print("| load | robot req/s | robot p50 ms | robot p99 ms | server run p50 ms | /health/live req/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, row, summary in rows:
        health = fmt(summary.get("rps")) if summary else "-"
        errors = row.errors + summary.get("errors", 0)
        print(f"| {label} | {fmt(row.rps)} | {fmt(row.p50, 2)} | {fmt(row.p99, 2)} | {fmt(row.run_p50, 2)} | "
              f"{health} | {errors} |")
    quiet, poll, flood = (r for _, r, _ in rows)
    p50_ratio, rps_ratio = ratio(poll.p50, quiet.p50), ratio(flood.rps, quiet.rps)
    print(f"- p50 polled ÷ quiet: {times(p50_ratio)} (goal < {GOAL_HEALTH_P50:g}) — "
          f"{verdict(None if p50_ratio is None else p50_ratio < GOAL_HEALTH_P50)}")
    print(f"- req/s flooded ÷ quiet: {times(rps_ratio)} (goal ≥ {GOAL_FLOOD_RPS:g}) — "
          f"{verdict(None if rps_ratio is None else rps_ratio >= GOAL_FLOOD_RPS)}")


# ----------------------------------------------------------------------------- main


def check_same_chunk(ours: str, lit: str, io: dict, steps: int) -> str:
    """One request to each server with the same observation and seed: the same pipeline gives the same chunk."""
    observation = observation_for(io, np.random.default_rng(12345))
    with HttpPolicyClient(ours, format="msgpack", timeout=REPLY_TIMEOUT_S) as client:
        a = client.infer(observation, seed=12345, num_inference_steps=steps)["action_chunk"]
    with httpx.Client(base_url=lit, timeout=REPLY_TIMEOUT_S) as client:
        reply = client.post("/predict", json={"observation": pack(observation, binary=False), "seed": 12345})
        reply.raise_for_status()
        b = np.asarray(reply.json()["action_chunk"], np.float32)
    return f"max |ours - LitServe| = {float(np.abs(a - b).max()):.2e} over a {list(a.shape)} chunk"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the diffusion_policy experiment directory (default: the demo policy)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random-weight policy instead (to check the script)")
    parser.add_argument("--gpu-policy", action="store_true",
                        help="a GPU-sized random-weight policy (3 cameras at 224 px, ViT-B/32-sized backbone)")
    parser.add_argument("--simulated-gpu", nargs="?", const="6.2,0.45", metavar="BASE_MS,PER_ROBOT_MS",
                        type=simulated_gpu_setting,
                        help="the GPU-sized policy's requests against servers whose device is simulated: a batch's "
                             "sampling sleeps BASE_MS + PER_ROBOT_MS × (robots − 1) (default 6.2,0.45: bfloat16 on an "
                             "H100); the host side is real (see above)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where both servers run the model")
    parser.add_argument("--dtype", default=os.environ.get("VLA_DTYPE", "auto"),
                        help="auto | float32 | bfloat16 | float16: the model's dtype in both servers and in the "
                        "compute floor (default: VLA_DTYPE, else auto: float32 on CPU; on CUDA the run's, as our "
                        "server picks it)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="robot counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per row before measuring")
    parser.add_argument("--transport", choices=["msgpack", "websocket", "both"], default="msgpack",
                        help="how the robots talk to our server")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the deployment's)")
    parser.add_argument("--robot-processes", type=int, default=1,
                        help="spread each row's robots over this many processes (robot i in process i mod N), so "
                        "their Python work is not all under one interpreter lock: for hosts with cores to spare "
                        "(a GPU host); on 2 cores they take CPU from the servers (default 1: threads of this one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every server (default 1; 0: each server's own: ours "
                        "VLA_TORCH_THREADS=auto, LitServe's worker torch's default, all cores)")
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="LitServe's batch_timeout, seconds")
    parser.add_argument("--starvation", action=argparse.BooleanOptionalAction, default=True,
                        help="the /health/live starvation section")
    parser.add_argument("--model-process", action=argparse.BooleanOptionalAction, default=True,
                        help="the rows of our batching server with VLA_MODEL_PROCESS=true")
    parser.add_argument("--litserve", action=argparse.BooleanOptionalAction, default=True,
                        help="LitServe's rows (installed with pip when missing; left out when that fails)")
    # Hidden modes: this script as the LitServe server, and as the /health/live load.
    parser.add_argument("--replicas", type=int, help="instead: robots on HTTP sessions against 1 and N CPU replicas "
                                                     "on Ray Serve (a Redis session store), then one replica killed "
                                                     "mid-row (bench/fleet_replicas.py)")
    parser.add_argument("--robots", type=int, default=16, help="with --replicas: robots (default 16)")
    parser.add_argument("--litserve-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--health-load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--health-mode", choices=["poll", "flood"], help=argparse.SUPPRESS)
    parser.add_argument("--health-seconds", type=float, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.litserve_worker:
        return litserve_worker(args)
    if args.health_load:
        return health_load(args.health_load, args.health_mode, HEALTH_THREADS, args.health_seconds)
    freeze_long_lived()  # the robots' own collections skip the imports' objects (service/gc_pauses.py)
    if args.simulated_gpu and args.device != "cpu":
        raise SystemExit("--simulated-gpu simulates the device on a CPU host: leave --device out (a GPU host measures "
                         "the GPU itself: --gpu-policy --device cuda)")
    if args.device.startswith("cuda"):  # (before anything is installed or built for it)
        from vla_foundry.devices import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as e:
            raise SystemExit(f"{e}: run this on a GPU host, or leave --device out") from None
    global TORCH_THREADS, DEVICE, DTYPE, SIMULATED_GPU
    TORCH_THREADS, DEVICE, DTYPE, SIMULATED_GPU = args.threads, args.device, args.dtype, args.simulated_gpu
    if args.replicas:
        from fleet_replicas import replicas_bench

        with tempfile.TemporaryDirectory(prefix="fleet-bench-") as scratch:
            replicas_bench(resolve_checkpoint(args, Path(scratch)), args.replicas, args.robots, args.warmup,
                           args.seconds, args.threads)
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background by a shell without job control: SIGINT is ignored, and the servers would
        # inherit that, so LitServe would not stop on it (ours does: uvicorn installs its own handler).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    transports = ["msgpack", "websocket"] if args.transport == "both" else [args.transport]
    version = ensure_litserve() if args.litserve else None
    batching = max(concurrency)
    results: dict[tuple[str, int], Row] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as scratch:
        checkpoint = resolve_checkpoint(args, Path(scratch))
        floor_ms = compute_floor(checkpoint, args.steps)
        with our_server(checkpoint, 1) as off, our_server(checkpoint, batching) as on, \
                (our_server(checkpoint, batching, model_process=True) if args.model_process else nullcontext()) as proc:
            with HttpPolicyClient(off, format="msgpack") as client:
                io = client.metadata()
            steps = args.steps or io["default_inference_steps"]
            print(f"checkpoint {checkpoint} ({io['model']}): cameras {io['cameras']} × {len(io['image_indices'])} "
                  f"frames of {io['image']['resize_to']} px, proprioception "
                  f"{[(p['field'], p['steps'], p['dim']) for p in io['proprioception']]}, "
                  f"language {io['uses_language']}, {steps} denoising steps")
            threads = args.threads or f"torch's default ({os.cpu_count()} cores)"
            lit = (f"LitServe {version}: max_batch_size = the row's concurrency, batch_timeout {args.batch_timeout:g} s"
                   if version else "LitServe left out")
            print(f"ours: VLA_MAX_BATCH_SIZE=1 (off) and VLA_MAX_BATCH_SIZE={batching} (on, the largest concurrency, "
                  f"for every row), on with VLA_MODEL_PROCESS=true too{'' if args.model_process else ' (left out)'}; "
                  f"{lit}; torch threads: {threads} in all; "
                  f"{args.warmup:g} s warm-up + {args.seconds:g} s per row\n", flush=True)
            for c in concurrency:
                for label, base in (("off", off), ("on", on), ("on, model process", proc)):
                    if base is None:
                        continue
                    for transport in transports:
                        server = f"ours, batching {label} ({TRANSPORT_NAMES[transport]})"
                        rows.append(results.setdefault((server, c), measure(server, transport, base, c, io, steps,
                                                                              args)))
                if not version:
                    continue
                # LitServe only now (its batching worker polls its queue even when idle).
                with litserve_server(checkpoint, c, args.batch_timeout, steps) as lit:
                    if c == concurrency[0]:
                        print(f"  same pipeline check: {check_same_chunk(on, lit, io, steps)}", flush=True)
                    server = "LitServe (JSON HTTP)"
                    rows.append(results.setdefault((server, c), measure(server, "litserve", lit, c, io, steps, args)))
            starved = [(name, starvation(base, io, steps, args)) for name, base in
                       (("batching on", on), ("batching on, model process", proc))
                       if base is not None] if args.starvation else []
    print(f"\n## fleet: {args.seconds:g} s per row, closed-loop robots\n")
    print_table(rows)
    print_ratios(results, transports, concurrency, floor_ms)
    for name, rows in starved:
        print_starvation(name, rows)


if __name__ == "__main__":
    main()
