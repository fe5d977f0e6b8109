"""The first minute of a new user: `vla-foundry serve` with an empty demo folder, timed until it listens
and until `/health/ready` says 200, then the three curl lines `make serve` prints.

    .venv/bin/python bench/first_minute.py            # port 8765, a temporary demo folder
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.cli import serve_command  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as demo_dir, tempfile.TemporaryFile("w+") as log:
        env = {**os.environ, "VLA_DEMO_DIR": demo_dir, "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        server = subprocess.Popen(serve_command() + ["serve", "--port", str(args.port)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        listening = ready = None
        try:
            while time.perf_counter() - started < args.timeout and server.poll() is None:
                try:
                    status = httpx.get(f"{base}/health/ready", timeout=5).status_code
                    listening = listening or time.perf_counter() - started
                    if status == 200:
                        ready = time.perf_counter() - started
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            if ready is None:
                log.seek(0)
                print(f"not ready after {args.timeout:.0f} s:\n{log.read()[-3000:]}", file=sys.stderr)
                return 1
            print(f"listening after {listening:.1f} s, /health/ready 200 after {ready:.1f} s")
            for method, path, body in (("GET", "/models", None),
                                       ("POST", "/predict/transformer", {"prompt": "The robot", "max_new_tokens": 24}),
                                       ("POST", "/v1/completions", {"model": "demo-transformer",
                                                                    "prompt": "Once upon a time", "max_tokens": 24})):
                reply = httpx.request(method, base + path, json=body, timeout=60)
                print(f"{method} {path}: {reply.status_code} {reply.text[:100]}")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
