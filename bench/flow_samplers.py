"""Flow-matching samplers: how close each gets to the ODE solution at 5, 10 and 20 steps, one run.

    python bench/flow_samplers.py [--experiment DIR] [--train-steps 3000] [--images-per-prompt 2]

The model is the demo's `stable_diffusion` member (16 px UNet + CLIP text tower, classifier-free
guidance 3.0) trained the same way but with VLA Foundry's flow-matching scheduler (`--experiment`
is built there on first use, then reused). For each prompt and seed, every sampler starts from the
same initial noise; the reference is `flow_euler` at 1000 steps from that noise. Printed per sampler
and step count: the RMS distance of the final sample to the reference (in 8-bit pixel levels: the
sample's [-1, 1] range is 255 levels), the UNet calls per image (NFE) and the time per image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vla_foundry.demo import stable_diffusion as demo
from vla_foundry.models.stable_diffusion import StableDiffusion
from vla_foundry.pipelines import load_pipeline
from vla_foundry.schedulers import FLOW_SCHEDULERS

STEPS = (5, 10, 20)
REFERENCE_STEPS = 1000
LEVELS = 127.5  # 8-bit levels per unit of the [-1, 1] sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=Path(".bench/flow-stable_diffusion"))
    parser.add_argument("--train-steps", type=int, default=demo.STEPS)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not (args.experiment / "checkpoints").is_dir():
        started = time.perf_counter()
        demo.build(args.experiment, progress=True, steps=args.train_steps, flow_matching=True)
        print(f"trained {args.experiment} ({args.train_steps} steps) in {time.perf_counter() - started:.0f} s")
    model: StableDiffusion = load_pipeline(args.experiment).model
    assert model.is_flow_matching, f"{args.experiment} is not a flow-matching model"

    calls = [0]
    model.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    prompts = list(demo.SHEET_PROMPTS)
    n = len(prompts) * args.images_per_prompt
    batch_prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    shape = (n, model.params.unet.in_channels, model.image_size, model.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))

    def sample(scheduler: str, steps: int) -> tuple[torch.Tensor, float, float]:
        calls[0] = 0
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(n, prompt=batch_prompts, max_text_seq_len=16, initial_noise=noise,
                                 scheduler=scheduler, num_inference_steps=steps)
        seconds = (time.perf_counter() - started) / n
        return out.sample.float(), calls[0], seconds

    reference, _, reference_s = sample("flow_euler", REFERENCE_STEPS)
    print(f"{n} images ({len(prompts)} prompts x {args.images_per_prompt}), T={model.num_timesteps}, guidance "
          f"{model.params.guidance_scale}, torch {torch.__version__}, {torch.get_num_threads()} threads; reference "
          f"flow_euler x {REFERENCE_STEPS}: {reference_s * 1000:.0f} ms/image")
    print()
    print("| sampler | steps | UNet calls | RMS to reference (8-bit levels) | ms/image |")
    print("| --- | --- | --- | --- | --- |")
    distances = {}
    for scheduler in FLOW_SCHEDULERS:
        for steps in STEPS:
            out, unet_calls, seconds = sample(scheduler, steps)
            distances[scheduler, steps] = (out - reference).pow(2).mean().sqrt().item() * LEVELS
            # a guided batch is one UNet call over cond + uncond halves: report calls per image
            print(f"| {scheduler} | {steps} | {unet_calls} | {distances[scheduler, steps]:.2f} | "
                  f"{seconds * 1000:.1f} |")
    print()
    euler = distances["flow_euler", 10]
    for scheduler in FLOW_SCHEDULERS[1:]:
        verdict = "closer" if distances[scheduler, 10] < euler else "NOT closer"
        print(f"{scheduler} at 10 steps is {verdict} than flow_euler at 10 steps "
              f"({distances[scheduler, 10]:.2f} vs {euler:.2f} levels)")


if __name__ == "__main__":
    main()
