"""``bench/fleet.py --replicas N``: robots on HTTP sessions against 1 and N CPU replicas on Ray Serve, and a replica
killed mid-run.

A one-node Ray cluster on loopback (this process is its driver) and a Redis (``redis-server`` from the PATH, on a
free loopback port) as the session store; the policy deployed through ``service.ray_serve`` with ``num_gpus=0``,
``open_loop_steps`` = ``OPEN_LOOP`` (a model call every second step) and ``--threads`` torch threads per replica.
Robots are threads of this process, one ``HttpPolicyClient`` (msgpack, keep-alive) and one session each, in a closed
loop in step mode (one frame per camera and the current proprioception row per step, as a robot sends them).

Rows: 1 replica keeping sessions in its memory (no store: what the store costs); N replicas without a store (the
robots' checks must find their histories broken: Serve routes each step to any replica); 1 replica; N replicas;
N replicas with one of them killed (``ray.kill``, no drain) halfway through the row
(Serve starts another). A step without an answer (the replica it reached died) is not sent again: the robot goes on
with the next control step and a new observation, as a robot at its control rate would (the step may or may not
have been kept; either way the history goes on). A step counts when its reply arrives inside the row's window.

Each robot checks its own history on every reply, and the bench counts the robots whose history broke:
- the step counter: the reply's ``step`` is the step the robot sent;
- the plans: a step replans only when ``OPEN_LOOP`` steps of the last plan have been served (a session that lost its
  history replans at once on its next step), and a step that does not replan acts on the robot's latest plan;
- the session: the one ``GET /sessions`` lists after the row was created before it (a lost one is made again).
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx
import numpy as np
import yaml

from bench_support import free_port
from vla_foundry_client import HttpPolicyClient
from vla_foundry_client.errors import PolicyServerError

OPEN_LOOP = 2
RETRY_PAUSE_S = 0.2
APP = "fleet-bench"


@contextmanager
def redis_server() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("--replicas needs redis-server (the session store): `make redis-server`, or apt install it")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def ray_cluster(cpus: int) -> Iterator[Any]:
    """A one-node cluster on 127.0.0.1 whose processes bind loopback only (as the Ray tests start theirs)."""
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                               os.environ.get("PYTHONPATH")])))
    import ray  # after the variables: Ray reads some when it is imported
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    temp_dir = tempfile.mkdtemp(prefix="vla-ray-", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(address="local", num_cpus=cpus, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=temp_dir, object_store_memory=80 << 20, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def deploy(checkpoint: Path, replicas: int, port: int, threads: int, scratch: Path, robots: int,
           store: Optional[str]) -> str:
    """The policy on ``replicas`` CPU replicas behind Serve's proxy on 127.0.0.1:``port`` (started once); its URL.
    Each replica may take every robot's request at once (``max_ongoing_requests``), so its batching sees them all;
    at Serve's default of 5, requests beyond it wait in the proxy's router, which backs off between tries."""
    from ray import serve

    from service.ray_serve import deployment_for
    from service.settings import Settings

    config = scratch / "deploy.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "deployments": [
        {"name": "policy", "checkpoint": str(checkpoint), "open_loop_steps": OPEN_LOOP}]}))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    application = deployment_for(Settings.load(config, session_store=store)).options(
        num_replicas=replicas, ray_actor_options={"num_gpus": 0, "num_cpus": 0.5, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=robots, graceful_shutdown_timeout_s=5).bind()
    serve.run(application, name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def kill_one_replica(ray) -> None:
    """Kills a replica of the application at once (no drain); Serve starts another."""
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SERVE_REPLICA" in a["name"] and f"::{APP}#" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)


def session_step(io: dict, rng: np.random.Generator) -> dict:
    """One control step as a robot sends it in a session: a frame per camera, the current row per field."""
    size = io["image"].get("resize_to") or [io["image"].get("model_size") or 32] * 2
    observation: dict[str, Any] = {
        "images": {cam: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for cam in io["cameras"]},
        "lowdim": {p["field"]: rng.normal(0, 1, p["dim"]).astype(np.float32) for p in io["proprioception"]}}
    if io.get("uses_language"):
        observation["language_instruction"] = "move to the red target"
    return observation


@dataclass
class Robot:
    index: int
    latencies: list = field(default_factory=list)
    unanswered: int = 0
    broken: str = ""  # the first break of its history, if any
    first_reply: Optional[float] = None  # wall time of the row's first reply: its session existed from then on

    def check(self, k: int, reply: dict, last_plan: Optional[int]) -> int:
        """The robot's checks of one reply (module notes); the plan step it acts on now."""
        problem = ""
        if reply["step"] != k:
            problem = f"step {k} answered as step {reply['step']}"
        elif reply["replanned"]:
            if reply["plan_step"] != k:
                problem = f"step {k} replanned at step {reply['plan_step']}"
            elif last_plan is not None and k - last_plan < OPEN_LOOP:
                problem = f"step {k} replanned {k - last_plan} step(s) after the last plan: the history was lost"
        elif last_plan is None or not last_plan <= reply["plan_step"] <= k:
            problem = f"step {k} acts on plan {reply['plan_step']}, the robot's latest is {last_plan}"
        self.broken = self.broken or problem
        return reply["plan_step"]


def robot_loop(robot: Robot, base: str, io: dict, start: float, end: float, go: threading.Event) -> None:
    rng = np.random.default_rng(robot.index)
    with HttpPolicyClient(base, session_id=f"robot-{robot.index}", format="msgpack", timeout=60) as client:
        go.wait()
        k, last_plan = 0, None
        while time.perf_counter() < end:
            observation = session_step(io, rng)
            sent = time.perf_counter()
            try:
                reply = client.step(observation, step=k)
            except PolicyServerError as e:
                if e.status < 500:  # a refusal of the step itself: the robot's history is not what it sent
                    robot.broken = robot.broken or f"step {k} refused: {e}"
                    return
                robot.unanswered += 1
                k += 1
                time.sleep(RETRY_PAUSE_S)
                continue
            except (OSError, http.client.HTTPException):  # the connection broke: a new one, the next step
                robot.unanswered += 1
                k += 1
                time.sleep(RETRY_PAUSE_S)
                continue
            done = time.perf_counter()
            robot.first_reply = robot.first_reply or time.time()
            last_plan = robot.check(k, reply, last_plan)
            if start <= done <= end:
                robot.latencies.append(done - sent)
            k += 1


@dataclass
class ReplicaRow:
    label: str
    robots: int
    rps: float
    p50: float
    p99: float
    unanswered: int
    broken: list[str]


def run_row(label: str, base: str, io: dict, robots: int, warmup: float, seconds: float,
            kill: Optional[Callable[[], None]] = None) -> ReplicaRow:
    """``robots`` robots for ``warmup`` + ``seconds``; ``kill()`` halfway through the measured part when given."""
    with httpx.Client(base_url=base, timeout=60) as admin:
        for i in range(robots):  # a new episode per row: each robot's session starts empty
            admin.post(f"/sessions/robot-{i}/reset")
    crew = [Robot(i) for i in range(robots)]
    go = threading.Event()
    start = time.perf_counter() + warmup
    end = start + seconds
    threads = [threading.Thread(target=robot_loop, args=(r, base, io, start, end, go), daemon=True) for r in crew]
    for t in threads:
        t.start()
    go.set()
    if kill is not None:
        time.sleep(max(0.0, start + seconds / 2 - time.perf_counter()))
        kill()
    for t in threads:
        t.join(timeout=max(0.0, end - time.perf_counter()) + 120)
    with httpx.Client(base_url=base, timeout=60) as admin:
        listed = {s["session_id"]: s for s in admin.get("/sessions").json()["sessions"]}
    for robot in crew:
        session = listed.get(f"robot-{robot.index}")
        if session is None:
            robot.broken = robot.broken or "its session is not listed after the row"
        elif robot.first_reply is None or session["created"] > robot.first_reply:  # made again: the first was lost
            robot.broken = robot.broken or "its session was made again during the row"
    ms = np.asarray([x for r in crew for x in r.latencies]) * 1000
    row = ReplicaRow(label, robots, len(ms) / seconds, float(np.percentile(ms, 50)) if len(ms) else np.nan,
                     float(np.percentile(ms, 99)) if len(ms) else np.nan, sum(r.unanswered for r in crew),
                     [f"robot {r.index}: {r.broken}" for r in crew if r.broken])
    first = f" ({row.broken[0]})" if row.broken else ""
    print(f"  {label}: {row.rps:.1f} steps/s, p50 {row.p50:.1f} ms, p99 {row.p99:.1f} ms, {row.unanswered} steps "
          f"unanswered, {len(row.broken)} of {robots} robots lost history{first}", flush=True)
    return row


def replicas_bench(checkpoint: Path, replicas: int, robots: int, warmup: float, seconds: float,
                   threads: int) -> list[ReplicaRow]:
    if importlib.util.find_spec("ray") is None:  # found, not imported: Ray reads its variables when imported
        raise SystemExit("--replicas needs Ray Serve: pip install -e '.[serve,ray]' (`make test` installs it)")
    rows: list[ReplicaRow] = []
    with tempfile.TemporaryDirectory(prefix="fleet-replicas-") as scratch, redis_server() as store:
        os.environ["VLA_MAX_BATCH_SIZE"] = str(robots)  # read by Settings.load in deploy(), shipped to the replicas
        os.environ.pop("VLA_SESSION_STORE", None)
        with ray_cluster(cpus=max(2, replicas)) as ray:
            port = free_port()
            base = deploy(checkpoint, 1, port, threads, Path(scratch), robots, None)
            with HttpPolicyClient(base, format="msgpack") as client:
                io = client.metadata()
            print(f"checkpoint {checkpoint}: {robots} robots on HTTP sessions (msgpack), open_loop_steps {OPEN_LOOP}, "
                  f"Redis session store, {warmup:g} s warm-up + {seconds:g} s per row\n", flush=True)
            rows.append(run_row("1 replica, sessions in its memory (no store)", base, io, robots, warmup, seconds))
            deploy(checkpoint, replicas, port, threads, Path(scratch), robots, None)
            rows.append(run_row(f"{replicas} replicas, sessions in their memory (no store)", base, io, robots, warmup,
                                seconds))
            deploy(checkpoint, 1, port, threads, Path(scratch), robots, store)
            rows.append(run_row("1 replica", base, io, robots, warmup, seconds))
            deploy(checkpoint, replicas, port, threads, Path(scratch), robots, store)
            rows.append(run_row(f"{replicas} replicas", base, io, robots, warmup, seconds))
            rows.append(run_row(f"{replicas} replicas, one killed mid-row", base, io, robots, warmup, seconds,
                                kill=lambda: kill_one_replica(ray)))
    print(f"\n## fleet across replicas: Ray Serve on loopback, {robots} robots\n")
    print("| replicas | steps/s | p50 | p99 | steps unanswered | robots whose history broke |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row.label} | {row.rps:.1f} | {row.p50:.1f} ms | {row.p99:.1f} ms | {row.unanswered} | "
              f"{len(row.broken)} of {row.robots} |")
    alone, scattered, one, several, killed = rows
    scaling = several.rps / one.rps if one.rps else float("nan")
    print(f"\nthe store on one replica: {one.rps / alone.rps:.2f}× the steps per second of sessions in memory, p50 "
          f"{one.p50 - alone.p50:+.1f} ms; {replicas} replicas ÷ 1: {scaling:.2f}× the steps per second (on "
          f"{os.cpu_count()} cores, shared with the robots); history kept through the kill: "
          f"{'yes' if not killed.broken else 'NO'}; without a store on {replicas} replicas: "
          f"{len(scattered.broken)} of {robots} robots found their history broken")
    return rows
