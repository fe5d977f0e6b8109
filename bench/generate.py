"""Generation speed with and without the KV cache, side by side in one run.

    python bench/generate.py [--device cpu|cuda] [--dtype float32|bfloat16] [--new-tokens 256]

A 4-layer, width-256 `transformer` by default (random weights; speed does not depend on
them; --layers/--width/--vocab change it) generates --new-tokens tokens greedily from a 16-token prompt, once with the KV cache
and once without; the goal is a cache speed-up of at least 3x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vla_foundry.devices import resolve_device
from vla_foundry.checkpoint import resolve_dtype
from vla_foundry.models import create_model
from vla_foundry.params.transformer import TransformerParams


def timed_generate(model, prompt, new_tokens: int, use_cache: bool, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    params = TransformerParams(hidden_dim=args.width, n_layers=args.layers, n_heads=max(1, args.width // 64),
                               vocab_size=args.vocab, max_seq_len=max(512, 16 + args.new_tokens))
    torch.manual_seed(0)
    model = create_model(params, load_pretrained=False).eval().to(device=device, dtype=dtype)
    prompt = torch.randint(0, params.vocab_size, (args.batch, 16), device=device)
    print(f"model: {args.layers} layers, width {args.width}, vocab {args.vocab} | device {device} {dtype} | batch {args.batch}, "
          f"prompt 16, new tokens {args.new_tokens}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with torch.inference_mode():
        timed_generate(model, prompt, 8, True, device)  # warm-up
        timed_generate(model, prompt, 8, False, device)
        results = {}
        for use_cache in (True, False):
            times = [timed_generate(model, prompt, args.new_tokens, use_cache, device) for _ in range(args.repeats)]
            results[use_cache] = statistics.median(times)
    for use_cache in (True, False):
        seconds = results[use_cache]
        tps = args.batch * args.new_tokens / seconds
        print(f"{'with KV cache   ' if use_cache else 'without KV cache'}: {tps:9.1f} tokens/s "
              f"({seconds * 1000:8.1f} ms per generate, median of {args.repeats})")
    ratio = results[False] / results[True]
    print(f"KV cache speed-up: {ratio:.2f}x (goal >= 3x) -> {'met' if ratio >= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
