"""Torch's CPU threads in the server (``VLA_TORCH_THREADS``) on a host that is quiet, and on one where other
processes are busy.

    .venv/bin/python bench/cpu_threads.py [--threads auto,2] [--busy 0,1] [--concurrency 1,8] [--rounds 3]
                                          [--seconds 5] [--checkpoint DIR|demo-transformer]

One server per thread setting, all alive at once, each serving the demo transformer with continuous batching, and
``bench/text_serving.py``'s clients (threads of this process, each the official ``openai`` client streaming
``/v1/completions``, the same requests on every server). For each count of busy processes (each a Python loop that
never sleeps, started beside the servers and ended with the bench, as a robot's own control process or a sidecar
would be), the rows run in rounds: every concurrency in turn and, at each, every server in turn (both orders
alternating from round to round), ``--seconds`` measured after 1 s of warm-up. Reported: completion tokens/s (the
median of the rounds) and time to first token p99 (every round's requests pooled). What it shows
(service/torch_threads.py): an operator split over as many threads as the host has cores waits at its end for its
slowest thread, and stalls whenever any other thread wants one of those cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_support import free_port, server_process  # noqa: E402
from text_serving import percentile_ms, run_clients, text_checkpoint  # noqa: E402

from service.cli import serve_command  # noqa: E402


# A busy process: it spins until this bench ends, or until its parent is gone (a bench killed before its cleanup
# leaves no spinner on the host). The parent's pid comes on its command line: read from getppid() at its start, a
# parent killed while the interpreter started would be init's pid already, and it would spin for good. The marker
# names it in `ps`.
BUSY_MARKER = "vla-foundry bench/cpu_threads.py busy process"
BUSY_CODE = f"""# {BUSY_MARKER}
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


def busy_command() -> list[str]:
    """The command of a busy process whose parent is this process."""
    return [sys.executable, "-c", BUSY_CODE, str(os.getpid())]


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes that each keep a core busy until the block ends."""
    procs = [subprocess.Popen(busy_command()) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="auto,2", help="VLA_TORCH_THREADS of each server, comma-separated")
    parser.add_argument("--busy", default="0,1", help="busy processes beside the servers, comma-separated")
    parser.add_argument("--concurrency", default="1,8", help="client counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--checkpoint", default="demo-transformer")
    args = parser.parse_args()
    settings, busy = args.threads.split(","), [int(b) for b in args.busy.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    checkpoint = text_checkpoint(args.checkpoint)
    results: dict[tuple[int, str, int], list] = {}
    with contextlib.ExitStack() as servers:
        bases = {}
        for threads in settings:
            port = free_port()
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            env.update(HF_HUB_OFFLINE="1", VLA_TORCH_THREADS=threads, VLA_MAX_BATCH_SIZE="32")
            command = serve_command() + ["serve", "--checkpoint", f"{checkpoint}=text", "--host", "127.0.0.1",
                                         "--port", str(port)]
            bases[threads] = servers.enter_context(server_process(command, env, port, "/health/ready",
                                                                  f"threads={threads}"))
        for c in concurrency:  # warm-up: every server at every concurrency, untimed
            for base in bases.values():
                run_clients(base, c, 1.0, 0.0)
        for n_busy in busy:
            with busy_processes(n_busy):
                for r in range(args.rounds):
                    order = settings if r % 2 == 0 else settings[::-1]
                    for c in (concurrency if r % 2 == 0 else concurrency[::-1]):
                        for threads in order:
                            logs = run_clients(bases[threads], c, 1.0, args.seconds)
                            tokens = sum(log.tokens for log in logs) / args.seconds
                            ttft = [t for log in logs for t in log.ttft]
                            errors = sum(log.errors for log in logs)
                            results.setdefault((n_busy, threads, c), []).append((tokens, ttft, errors))
                            print(f"  busy {n_busy}, threads {threads}, {c} clients: {tokens:.0f} tokens/s, "
                                  f"{errors} errors", flush=True)
    print(f"\n## torch threads: {checkpoint.name}, {args.rounds} rounds of {args.seconds:g} s per row, "
          f"{os.cpu_count()} CPUs\n")
    print("| busy processes | VLA_TORCH_THREADS | clients | tokens/s | TTFT p99 ms | errors |")
    print("|---:|---|---:|---:|---:|---:|")
    for (n_busy, threads, c), rows in results.items():
        tokens = statistics.median(row[0] for row in rows)
        ttft = percentile_ms([t for row in rows for t in row[1]], 99)
        print(f"| {n_busy} | {threads} | {c} | {tokens:.0f} | {ttft:.1f} | {sum(row[2] for row in rows)} |")


if __name__ == "__main__":
    main()
