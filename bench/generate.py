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


def timed_generate(model, prompt, new_tokens: int, use_cache: bool, device: torch.device, graph: bool = False) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache, cuda_graph=graph)
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
    # (label, use_cache, cuda_graph); the graph path exists on CUDA only
    variants = [("with KV cache", True, False), ("without KV cache", False, False)]
    if device.type == "cuda":
        variants.insert(0, ("KV cache + CUDA graph", True, True))
    with torch.inference_mode():
        results = {}
        for label, use_cache, graph in variants:
            timed_generate(model, prompt, args.new_tokens, use_cache, device, graph)  # warm-up (and capture)
            times = [timed_generate(model, prompt, args.new_tokens, use_cache, device, graph)
                     for _ in range(args.repeats)]
            results[label] = statistics.median(times)
    for label, seconds in results.items():
        tps = args.batch * args.new_tokens / seconds
        print(f"{label:<22}: {tps:9.1f} tokens/s ({seconds * 1000:8.1f} ms per generate, median of {args.repeats})")
    best_cached = min(v for k, v in results.items() if k != "without KV cache")
    ratio = results["without KV cache"] / best_cached
    print(f"KV cache speed-up: {ratio:.2f}x (goal >= 3x) -> {'met' if ratio >= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
