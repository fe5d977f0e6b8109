"""Stacking a batch's camera frames beside a busy Python thread: numpy's stack against torch's.

    python bench/frame_stacking.py [--frames 48] [--size 224] [--seconds 1.5]

A policy server's model thread stacks the batch's uint8 frames (`RawPixels.frames`) while the event loop, another
Python thread, parses requests. numpy lets go of the interpreter lock for each frame it copies and must take it
back each time (waiting out the busy thread's switch interval); torch's stack lets go once. Printed: milliseconds
per stack of --frames frames of --size px, alone and beside a thread that spins in Python, for `np.stack`,
`np.array` of the list, and `torch.stack` (what `RawPixels.frames` does).
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch


def per_stack_ms(fn, seconds: float, busy: bool) -> float:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    if busy:
        spinner.start()
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        fn()
        count += 1
    elapsed = time.perf_counter() - started
    stop.set()
    if busy:
        spinner.join()
    return elapsed / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48, help="frames per stack (16 robots' three cameras: 48)")
    parser.add_argument("--size", type=int, default=224, help="frame side, px")
    parser.add_argument("--seconds", type=float, default=1.5, help="per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.frames)]
    ways = {"np.stack": lambda: np.stack(frames), "np.array": lambda: np.array(frames),
            "torch.stack": lambda: torch.stack([torch.from_numpy(f) for f in frames])}
    print(f"| way | {args.frames} frames of {args.size} px, alone | beside a busy Python thread |")
    print("|---|---:|---:|")
    for name, fn in ways.items():
        alone, busy = per_stack_ms(fn, args.seconds, False), per_stack_ms(fn, args.seconds, True)
        print(f"| {name} | {alone:.2f} ms | {busy:.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
