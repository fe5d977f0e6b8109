"""What a request of a new shape costs the other robots of a deployment.

    python bench/new_shapes.py [--checkpoint DIR] [--steps 60,7] [--quiet-seconds 3]

Serves one policy (default: the demo policy) with `vla-foundry serve`, warmed up as a server is. One robot
(msgpack HTTP, the deployment's default step count) runs in a closed loop the whole time. After `--quiet-seconds`
a second robot sends, one after the other, requests of shapes the warm-up did not prepare: each step count of
`--steps`, then its first request with past action rows (another graph key at the default step count). Printed:
each of those calls' time, and the first robot's latency (p50 and worst) while they ran against before.

Why: a serving policy never captures a graph in a call any more (``vla_foundry/models/policy_graphs.py``). Before,
a request naming 60 denoising steps traced a graph of 60 steps on the model thread, and every other robot's
request waited for it (15.3 s on the 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench_support import demo_policy
from fleet import REPLY_TIMEOUT_S, observation_for, our_server
from vla_foundry_client import HttpPolicyClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--steps", default="60,7", help="step counts the second robot asks for, in turn")
    parser.add_argument("--quiet-seconds", type=float, default=3.0)
    args = parser.parse_args()
    checkpoint = args.checkpoint or demo_policy()
    with our_server(checkpoint, max_batch_size=8) as base:
        io = json.load(urllib.request.urlopen(base + "/models"))["deployments"][0]["io"]
        observation = observation_for(io, np.random.default_rng(0))
        steady, other = (HttpPolicyClient(base, format="msgpack", timeout=REPLY_TIMEOUT_S) for _ in range(2))
        latencies: list[tuple[float, float]] = []  # (end time, seconds)
        stop = threading.Event()

        def robot() -> None:
            k = 0
            while not stop.is_set():
                started = time.perf_counter()
                steady.infer(observation, seed=k)
                latencies.append((time.perf_counter(), time.perf_counter() - started))
                k += 1

        thread = threading.Thread(target=robot)
        thread.start()
        time.sleep(args.quiet_seconds)
        began = time.perf_counter()
        calls = []
        for steps in [int(s) for s in args.steps.split(",") if s]:
            started = time.perf_counter()
            other.infer(observation, seed=1, num_inference_steps=steps)
            calls.append((f"num_inference_steps {steps}", time.perf_counter() - started))
        past = {a["field"]: np.zeros((io["past_steps"], a["dim"]), np.float32) for a in io["actions"]}
        started = time.perf_counter()
        other.infer(observation, seed=2, past_actions=past)
        calls.append(("first request with past actions", time.perf_counter() - started))
        ended = time.perf_counter()
        time.sleep(0.5)
        stop.set()
        thread.join()
    before = [s for t, s in latencies if t < began]
    during = [s for t, s in latencies if began <= t <= ended + 0.5]
    print(f"\n## new shapes: {checkpoint.name}, default {io['default_inference_steps']} steps\n")
    print("| the second robot's call | ms |\n|---|---:|")
    for name, seconds in calls:
        print(f"| {name} | {seconds * 1000:.1f} |")
    print("\n| the first robot | requests | p50 ms | worst ms |\n|---|---:|---:|---:|")
    for name, rows in (("before", before), ("while they ran", during)):
        if rows:
            print(f"| {name} | {len(rows)} | {statistics.median(rows) * 1000:.1f} | {max(rows) * 1000:.1f} |")


if __name__ == "__main__":
    main()
