"""Image generation speed: the training scheduler over all its steps vs DPM-Solver++ at 20 steps, one run.

    python bench/images.py [--device cpu|cuda] [--dtype float32|bfloat16] [--size 32] [--timesteps 1000]

The same `stable_diffusion` model (random weights; speed does not depend on them; a 3-level
UNet like the demo's, unconditional) samples --batch images with VLA Foundry's DDPM over
T−1 steps and with DPM-Solver++ over --fast-steps steps; prints images/s, time per image
and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from vla_foundry.checkpoint import resolve_dtype
from vla_foundry.devices import resolve_device
from vla_foundry.models import create_model
from vla_foundry.params.diffusion import NoiseSchedulerParams, StableDiffusionParams, UNetParams


def timed(model, args, device, scheduler: str, steps) -> float:
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(args.batch)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(args.batch, device, generator=generators, scheduler=scheduler, num_inference_steps=steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert out.images.shape == (args.batch, args.size, args.size, 3)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", default="16,32,32")
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--fast-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    unet = UNetParams(channels=[int(c) for c in args.channels.split(",")], time_emb_dim=32, text_emb_dim=0,
                      image_size=args.size)
    params = StableDiffusionParams(unet=unet, noise_scheduler=NoiseSchedulerParams(num_timesteps=args.timesteps))
    torch.manual_seed(0)
    model = create_model(params, load_pretrained=False).eval().to(device=device, dtype=dtype)
    print(f"UNet {args.channels} at {args.size} px, T={args.timesteps} | {device} {dtype} | batch {args.batch} | "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    runs = {}
    with torch.inference_mode():
        timed(model, args, device, "dpmsolver++", 2)  # warm-up: kernels, allocator
        for label, scheduler, steps in [(f"training DDPM, {args.timesteps - 1} steps", "training", None),
                                        (f"DPM-Solver++, {args.fast_steps} steps", "dpmsolver++", args.fast_steps)]:
            runs[label] = timed(model, args, device, scheduler, steps)
    for label, seconds in runs.items():
        print(f"  {label:<28}: {args.batch / seconds:8.2f} images/s, {seconds / args.batch * 1000:9.1f} ms per image")
    slow, fast = runs.values()
    print(f"  DPM-Solver++ speed-up: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
