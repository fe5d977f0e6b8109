"""What one front-door refusal costs the event loop: the app called in process, its policy deployment's expected wait
forced over its max_queue_ms, so that every request is refused before its body (503 overloaded, no hold).

    python bench/refusal_cost.py [--requests 20000] [--rounds 2] [--checkpoint DIR]

Each round serves the demo policy twice, with an access line for every refusal (VLA_LOG_REFUSALS_PER_S at its
maximum) and with the default sampling (20 lines a second), and prints the CPU time per refusal of each (the
process's CPU time, every thread's: the test client's and the model's threads are idle meanwhile); the log lines go
to /dev/null through the server's own formatter. Not measured here: uvicorn's HTTP parsing and writes,
which come on top of this in a live server (bench/overload.py measures that server whole).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_support import demo_policy  # noqa: E402
from service.app import create_app  # noqa: E402
from service.request_ids import configure_logging  # noqa: E402
from service.settings import DeploymentSpec, Settings  # noqa: E402

EVERY = 1_000_000  # the setting's maximum: a line for every refusal


def per_refusal_us(checkpoint: Path, log_refusals_per_s: int, requests: int) -> float:
    spec = DeploymentSpec(name="policy", checkpoint=str(checkpoint), max_queue_ms=50)
    app = create_app(Settings(deployments=[spec], device="cpu", shed_pacing_s=0,
                              log_refusals_per_s=log_refusals_per_s))
    with TestClient(app) as client:
        deadline = time.monotonic() + 300
        while client.get("/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the policy did not load within 300 s")
            time.sleep(0.1)
        executor = app.state.manager.deployments["policy"].executor
        executor.expected_wait_s = lambda batchable=True, own_pending=None: 2.4  # 2.4 s queued: every one refused
        body = b'{"observation": {}}'  # never read
        scope = {"type": "http", "method": "POST", "path": "/predict/diffusion_policy", "raw_path": b"",
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "scheme": "http", "http_version": "1.1",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        statuses = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def refusals():
            for _ in range(requests):
                await app(dict(scope), receive, send)

        started = time.process_time()
        asyncio.run(refusals())
        used = time.process_time() - started
    assert statuses == [503] * requests, f"not every request was refused: {set(statuses)}"
    return used / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint", help="a diffusion_policy experiment directory (default: the demo policy)")
    args = parser.parse_args()
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)
    configure_logging("text")
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_policy()
    rows = []
    for round_ in range(1, args.rounds + 1):
        for label, per_s in (("a line each", EVERY), ("sampled, 20 lines a second", 20)):
            us = per_refusal_us(checkpoint, per_s, args.requests)
            rows.append((round_, label, us))
            print(f"round {round_}, {label}: {us:.1f} µs of CPU per refusal", flush=True)
    print("\n| round | access lines | CPU per refusal |\n| ---: | --- | ---: |")
    for round_, label, us in rows:
        print(f"| {round_} | {label} | {us:.1f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
