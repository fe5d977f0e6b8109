"""The GPU check in one command (`make gpu-check`): the GPU tests, then the GPU rows of every bench, one table.

    python bench/gpu_check.py [--only tests,generate,images,policy,fleet]

Steps, in order, each a subprocess with its own time limit (the whole check is meant to fit in
8 minutes on an H100/H200 with the serving stack installed):
- `tests`: `pytest -m gpu` (CUDA device choice, fp32/bf16/fp16 loads, CUDA-graph text decoding,
  the policy's CUDA graphs == eager for every bucket, the service on CUDA);
- `generate`: `bench/generate.py --device cuda --dtype bfloat16` (tokens/s with and without the KV
  cache and the CUDA-graph decoder);
- `images`: `bench/images.py --device cuda --dtype bfloat16`;
- `policy`: `bench/policy_sampling.py --device cuda --gpu-policy` (eager vs CUDA-graph sampling per
  batch size: the compute floor a robot's round trip is compared with);
- `fleet`: `bench/fleet.py --device cuda --gpu-policy --concurrency 1,16` (robots over HTTP,
  batching off and on, LitServe beside it; its starvation rows are skipped: they are a CPU matter).
Each step's own table is printed as it finishes; the summary at the end lists every step with its
status and seconds, dated, ready to paste into the README. Exit status 1 when a step failed.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

STEPS = {
    "tests": ([PY, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests")], 150),
    "generate": ([PY, str(HERE / "generate.py"), "--device", "cuda", "--dtype", "bfloat16"], 60),
    "images": ([PY, str(HERE / "images.py"), "--device", "cuda", "--dtype", "bfloat16"], 60),
    "policy": ([PY, str(HERE / "policy_sampling.py"), "--device", "cuda", "--gpu-policy"], 90),
    "fleet": ([PY, str(HERE / "fleet.py"), "--device", "cuda", "--gpu-policy", "--concurrency", "1,16",
               "--seconds", "6", "--no-starvation"], 150),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(STEPS), help="steps, comma-separated")
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; steps: {', '.join(STEPS)}")
    summary = []
    for name in chosen:
        command, limit = STEPS[name]
        print(f"\n## {name}: {' '.join(Path(c).name if c.startswith('/') else c for c in command)}\n", flush=True)
        started = time.perf_counter()
        try:
            result = subprocess.run(command, timeout=limit, cwd=HERE.parent)
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
        summary.append((name, status, time.perf_counter() - started))
    print(f"\n## GPU check, {datetime.date.today().isoformat()}\n")
    print("| step | status | seconds |\n|---|---|---:|")
    for name, status, seconds in summary:
        print(f"| {name} | {status} | {seconds:.0f} |")
    return 0 if all(status == "ok" for _, status, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
