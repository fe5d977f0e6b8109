"""A continuous batch's decode step: eager against replayed from its graph, side by side in one process.

    .venv/bin/python bench/decode_steps.py [--checkpoint DIR|demo-transformer] [--sequences 1,8,32] [--steps N]
                                           [--prompt-tokens 30]

For each batch size, two batchers of the same model (``graphs`` off and on: one TorchScript trace on the CPU,
CUDA graphs per bucket on CUDA, ``models/slot_graphs.py``) decode the same sequences (prompts of
``--prompt-tokens`` random ids, so the keys a step reads grow from there;
temperature 1, a seed each) in turn, one step each, for ``--steps`` steps after warm-up; medians of the
``ContinuousBatcher.step`` times (the step: its decode, sampling and bookkeeping; no admissions in the measured
steps). Both make the same tokens (checked). Then 600 decode calls of the trace alone at random batch sizes and key
lengths: the slowest call, to show that no shape waits for a re-specialization.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from text_serving import text_checkpoint  # noqa: E402
from vla_foundry.pipelines import load_pipeline  # noqa: E402
from vla_foundry.sampling import SamplingParams  # noqa: E402


def batchers(pipeline, sequences: int, steps: int, prompt_tokens: int = 30) -> dict:
    """Two batchers (eager, graphs) with the same ``sequences`` running, warmed up; name → (batcher, outcomes)."""
    made = {}
    for name, graphs in (("eager", False), ("graphs", True)):
        batcher = pipeline.continuous_batcher(sequences, graphs=graphs)
        batcher.warmup()
        outcomes: dict = {}
        rng = np.random.default_rng(0)
        for i in range(sequences):
            ids = rng.integers(0, pipeline.model.vocab_size, size=prompt_tokens).tolist()
            generation = pipeline.start_completion(prompt_token_ids=[ids], seed=i,
                                                   sampling=SamplingParams(steps + 20, 1.0, 0, 1.0))
            batcher.submit(generation, lambda out, i=i, outcomes=outcomes: outcomes.__setitem__(i, out))
        for _ in range(10):  # admissions, then steps of every sequence
            batcher.step()
        made[name] = (batcher, outcomes)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo-transformer")
    parser.add_argument("--sequences", default="1,8,32")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps (default 200, fewer where the prompt leaves less room in the context)")
    parser.add_argument("--prompt-tokens", type=int, default=30,
                        help="each sequence's prompt length: a step reads its keys and the ones decoded since")
    args = parser.parse_args()
    pipeline = load_pipeline(text_checkpoint(args.checkpoint))
    # Every sequence decodes through the warm-up and the measured steps, and more (``batchers``): a prompt takes
    # that room from the model's context.
    room = pipeline.model.max_seq_len - args.prompt_tokens - 20
    if args.steps is None:
        args.steps = min(200, room)
    if room < 1:
        parser.error(f"--prompt-tokens {args.prompt_tokens} leaves no room for a measured step in this model's "
                     f"context ({pipeline.model.max_seq_len} tokens, 20 of them for the warm-up); ask for a shorter "
                     "prompt")
    if args.steps < 1 or args.steps > room:
        parser.error(f"--prompt-tokens {args.prompt_tokens} leaves room for at most {room} measured steps "
                     f"in this model's context ({pipeline.model.max_seq_len} tokens); ask for fewer")
    print(f"{args.checkpoint} on {pipeline.device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| sequences | eager step ms | step from graph ms | eager ÷ graph |")
    print("|---:|---:|---:|---:|")
    for sequences in (int(s) for s in args.sequences.split(",")):
        made = batchers(pipeline, sequences, args.steps, args.prompt_tokens)
        times: dict = {name: [] for name in made}
        for _ in range(args.steps):
            for name, (batcher, _) in made.items():  # in turn: the host's noise falls on both alike
                started = time.perf_counter()
                batcher.step()
                times[name].append(time.perf_counter() - started)
        for batcher, _ in made.values():
            while batcher.active:
                batcher.step()
        (_, eager), (_, graphs) = made["eager"], made["graphs"]
        assert [eager[i].completions[0].token_ids for i in range(sequences)] == \
            [graphs[i].completions[0].token_ids for i in range(sequences)], "the two made other tokens"
        e, g = (statistics.median(times[name]) * 1000 for name in ("eager", "graphs"))
        print(f"| {sequences} | {e:.3f} | {g:.3f} | {e / g:.2f}× |")
    decoder = pipeline.model.slot_decoder(32, graphs=True)
    if decoder.mode == "traced":
        rng = np.random.default_rng(1)
        slowest = 0.0
        with torch.inference_mode():
            decoder.warmup()
            for _ in range(600):
                rows = int(rng.integers(1, 33))
                length = int(rng.integers(rows, decoder.cache.max_len))
                positions = rng.integers(0, length, size=rows).tolist()
                positions[0] = length - 1
                started = time.perf_counter()
                decoder.decode(torch.zeros(rows, dtype=torch.long), list(range(rows)), positions)
                slowest = max(slowest, time.perf_counter() - started)
        print(f"\ntrace, 600 random shapes (1-32 rows, keys up to {decoder.cache.max_len}): slowest call "
              f"{slowest * 1000:.1f} ms")


if __name__ == "__main__":
    main()
