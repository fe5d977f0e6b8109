"""Generation speed with and without the KV cache, side by side in one run, for every text-producing type.

    python bench/generate.py [--models transformer,transformer_hf,vlm] [--device cpu|cuda]
                             [--dtype float32|bfloat16] [--new-tokens 256]

Each model (random weights; speed does not depend on them) generates --new-tokens tokens
greedily from a 16-token prompt, once with the KV cache and once without; the goal is a
cache speed-up of at least 3x. Sizes follow --layers/--width/--vocab:
- `transformer`: ours (on CUDA also with CUDA-graph decoding);
- `transformer_hf`: a Hugging Face Llama of the same size through our wrapper;
- `vlm`: our ViT (64 px, 8 px patches, shuffle 2 ⇒ 16 image tokens) + the same transformer,
  the prompt being the image tokens and 16 text tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

from vla_foundry.checkpoint import resolve_dtype
from vla_foundry.devices import resolve_device
from vla_foundry.models import create_model
from vla_foundry.params.transformer import TransformerHFParams, TransformerParams
from vla_foundry.params.vision import ViTParams, VLMParams

PROMPT_TOKENS = 16


def build(model_type: str, args, workdir: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The model, its prompt ids (1, T) and any other generate inputs (on CPU)."""
    lm = TransformerParams(hidden_dim=args.width, n_layers=args.layers, n_heads=max(1, args.width // 64),
                           vocab_size=args.vocab, max_seq_len=max(512, 64 + args.new_tokens))
    text = torch.randint(0, args.vocab - 1, (args.batch, PROMPT_TOKENS))
    torch.manual_seed(0)
    if model_type == "transformer":
        return create_model(lm, load_pretrained=False), text, {}
    if model_type == "transformer_hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
                             num_hidden_layers=args.layers, num_attention_heads=lm.n_heads,
                             num_key_value_heads=lm.n_heads, max_position_embeddings=lm.max_seq_len)
        LlamaForCausalLM(config).save_pretrained(workdir)
        return create_model(TransformerHFParams(hf_pretrained=workdir), load_pretrained=True), text, {}
    if model_type == "vlm":
        vit = ViTParams(img_size=64, patch_size=8, hidden_dim=args.width, inter_dim=4 * args.width,
                        n_heads=lm.n_heads, n_layers=args.layers, projector_pixel_shuffle_factor=2)
        image_token = args.vocab - 1
        model = create_model(VLMParams(vit=vit, transformer=lm, image_token_id=image_token), load_pretrained=False)
        prompt = torch.cat([torch.full((args.batch, model.tokens_per_image), image_token), text], dim=1)
        return model, prompt, {"pixel_values": torch.randn(args.batch, 3, 64, 64)}
    raise SystemExit(f"unknown model {model_type!r}; choose from transformer, transformer_hf, vlm")


def timed_generate(model, prompt, extra, new_tokens: int, use_cache: bool, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache, **extra)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def bench(model_type: str, args, device: torch.device, dtype: torch.dtype) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        model, prompt, extra = build(model_type, args, workdir)
        model = model.eval().to(device=device, dtype=dtype)
        prompt = prompt.to(device)
        extra = {k: v.to(device=device, dtype=dtype) for k, v in extra.items()}
        # (label, use_cache, extra generate kwargs); graph decoding exists for our transformer on CUDA
        variants = [("with KV cache", True, {}), ("without KV cache", False, {})]
        if device.type == "cuda" and getattr(model, "supports_cuda_graph", False):
            variants.insert(0, ("KV cache + CUDA graph", True, {"cuda_graph": True}))
        results = {}
        with torch.inference_mode():
            for label, use_cache, more in variants:
                timed_generate(model, prompt, {**extra, **more}, args.new_tokens, use_cache, device)  # warm-up
                times = [timed_generate(model, prompt, {**extra, **more}, args.new_tokens, use_cache, device)
                         for _ in range(args.repeats)]
                results[label] = statistics.median(times)
    print(f"\n{model_type} (prompt {prompt.shape[1]} tokens)")
    for label, seconds in results.items():
        tps = args.batch * args.new_tokens / seconds
        print(f"  {label:<22}: {tps:9.1f} tokens/s ({seconds * 1000:8.1f} ms per generate, median of {args.repeats})")
    best_cached = min(v for k, v in results.items() if k != "without KV cache")
    ratio = results["without KV cache"] / best_cached
    print(f"  KV cache speed-up: {ratio:.2f}x (goal >= 3x) -> {'met' if ratio >= 3 else 'NOT met'}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer,transformer_hf,vlm")
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
    print(f"{args.layers} layers, width {args.width}, vocab {args.vocab} | device {device} {dtype} | batch "
          f"{args.batch}, new tokens {args.new_tokens}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for model_type in args.models.split(","):
        bench(model_type.strip(), args, device, dtype)


if __name__ == "__main__":
    main()
