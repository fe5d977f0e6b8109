"""The GPU check in one command (`make gpu-check`): the GPU tests, then the GPU rows of every bench, one table.

    python bench/gpu_check.py [--only tests,generate,images,policy,fleet,text] [--smoke]

Steps, in order, each a subprocess with its own time limit (the limits add up to 17 minutes; the
first run, on an H200 on 2026-12-04, took 5.5 minutes for tests, policy, fleet and text with batching
on only, and on an H100 on 2026-12-05 tests and fleet took 68 and 137 s; device calls of at most 10
minutes take it in three: `--only tests,fleet`, `--only text,policy`, `--only generate,images`, the
goals' steps first):
- `tests`: `pytest -m gpu` (CUDA device choice, fp32/bf16/fp16 loads, CUDA-graph text decoding,
  the policy's CUDA graphs == eager for every bucket, continuous batching's CUDA graphs, the
  service on CUDA);
- `generate`: `bench/generate.py --device cuda --dtype bfloat16` (tokens/s with and without the KV
  cache and the CUDA-graph decoder);
- `images`: `bench/images.py --device cuda --dtype bfloat16`;
- `policy`: `bench/policy_sampling.py --device cuda --dtype bfloat16 --gpu-policy` (eager vs CUDA-graph sampling
  per batch size: the compute floor a robot's round trip is compared with, in the fleet step's dtype);
- `fleet`: `bench/fleet.py --device cuda --dtype bfloat16 --gpu-policy --concurrency 1,16 --robot-processes 4`
  (robots over HTTP, in bfloat16, where the policy's batch of 16 costs about twice one robot (the 16-robot goal
  cannot be met in float32, where it costs 4.4×),
  batching off and on, on with the policy's model in a process of its own, LitServe beside it when it is
  installed, e.g. from the carried wheels (this step never pip-installs it: a GPU host has no registry, and
  pip's retries would spend the step's time); the GPU goals: 16 robots ≥ 10× one, one robot's p50 ≤ 1.5×
  the compute floor; its starvation rows are skipped: a CPU matter);
- `text`: `bench/text_serving.py --device cuda --random-model 24x2048 --concurrency 1,32 --rounds 2 --servers on,off`
  (OpenAI clients streaming from a 24-layer width-2048 model, continuous batching on and off; the GPU
  goal: 32 clients ≥ 10× one client's tokens/s; `--servers on,process,off` adds the model process's rows, at
  about two more minutes).
Each step's own table is printed as it finishes; the summary at the end lists every step with its
status and seconds, dated, ready to paste into the README. Exit status 1 when a step failed.

--smoke: the same steps on the CPU with tiny models and short rows (the tests only collected), to
check that every script of the check still runs; `tests/test_benches.py` runs it, so the check
cannot rot unseen between the sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

# step: (the GPU command, the --smoke command, time limit in seconds)
STEPS = {
    # The GPU tests live in one module, so a development-only package the GPU host lacks
    # (Schemathesis, Ray, ...) cannot break the collection of the rest of the suite there.
    "tests": ([PY, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests" / "test_gpu.py")],
              [PY, "-m", "pytest", "-q", "-m", "gpu", "--collect-only", str(HERE.parent / "tests" / "test_gpu.py")],
              150),
    "generate": ([PY, str(HERE / "generate.py"), "--device", "cuda", "--dtype", "bfloat16"],
                 [PY, str(HERE / "generate.py"), "--device", "cpu", "--dtype", "bfloat16", "--layers", "2",
                  "--width", "64", "--new-tokens", "8", "--repeats", "1"], 150),  # HF's eager steps: slow on a GPU
    "images": ([PY, str(HERE / "images.py"), "--device", "cuda", "--dtype", "bfloat16"],
               [PY, str(HERE / "images.py"), "--device", "cpu", "--size", "16", "--timesteps", "4", "--fast-steps",
                "2", "--batch", "1"], 60),
    "policy": ([PY, str(HERE / "policy_sampling.py"), "--device", "cuda", "--dtype", "bfloat16", "--gpu-policy"],
               [PY, str(HERE / "policy_sampling.py"), "--device", "cpu", "--batch-sizes", "1,2", "--repeats", "3"],
               90),
    # The robots in 4 processes there: a GPU host has the cores, and one process's threads share one interpreter.
    "fleet": ([PY, str(HERE / "fleet.py"), "--device", "cuda", "--dtype", "bfloat16", "--gpu-policy", "--concurrency",
               "1,16", "--seconds", "6", "--no-starvation", "--robot-processes", "4"]
              + ([] if importlib.util.find_spec("litserve") else ["--no-litserve"]),  # no registry there to get it
              [PY, str(HERE / "fleet.py"), "--device", "cpu", "--tiny", "--concurrency", "1,2", "--seconds", "1",
               "--warmup", "0.5", "--no-starvation", "--no-litserve", "--robot-processes", "2"], 150),
    "text": ([PY, str(HERE / "text_serving.py"), "--device", "cuda", "--random-model", "24x2048",
              "--concurrency", "1,32", "--seconds", "5", "--rounds", "2", "--servers", "on,off"],
             [PY, str(HERE / "text_serving.py"), "--device", "cpu", "--random-model", "2x64", "--concurrency", "1,2",
              "--seconds", "1", "--warmup", "0.5", "--servers", "on,process"], 420),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(STEPS), help="steps, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="every step on the CPU with tiny models: checks the "
                        "scripts run, measures nothing")
    args = parser.parse_args()
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():  # (each step would end in a traceback, and the tests step skip them all)
            parser.error("no CUDA device here: run it on a GPU host, or with --smoke to check the steps on the CPU")
    chosen = [s for s in args.only.split(",") if s]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; steps: {', '.join(STEPS)}")
    summary = []
    for name in chosen:
        gpu_command, smoke_command, limit = STEPS[name]
        command = smoke_command if args.smoke else gpu_command
        print(f"\n## {name}: {' '.join(Path(c).name if c.startswith('/') else c for c in command)}\n", flush=True)
        started = time.perf_counter()
        try:
            result = subprocess.run(command, timeout=limit, cwd=HERE.parent)
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
        summary.append((name, status, time.perf_counter() - started))
    print(f"\n## GPU check{' (smoke, CPU)' if args.smoke else ''}, {datetime.date.today().isoformat()}\n")
    print("| step | status | seconds |\n|---|---|---:|")
    for name, status, seconds in summary:
        print(f"| {name} | {status} | {seconds:.0f} |")
    return 0 if all(status == "ok" for _, status, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
