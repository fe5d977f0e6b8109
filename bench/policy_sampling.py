"""A policy's sampling call, from captured graphs and eagerly, side by side, per batch size.

    python bench/policy_sampling.py [--checkpoint DIR | --gpu-policy] [--device auto|cpu|cuda]
                                    [--dtype float32|bfloat16] [--batch-sizes 1,2,4,8] [--repeats 20]

The same checkpoint is loaded twice on one device: sampling from graphs (`policy_graphs.py`: a
TorchScript trace per batch size on CPU, a CUDA graph per bucket on CUDA; captured at warm-up) and
eagerly (`VLA_TRACED_SAMPLING=false`, `VLA_CUDA_GRAPHS=false`). Per batch size, in turn, the median
over --repeats of:
- `sample`: the sampling alone (backbone once + every denoiser step and flow update), the compute
  floor of a request: `PolicyGraphs.sample` vs `DiffusionPolicy.generate_actions`;
- `predict_each`: the pipeline call a server batch makes (preprocessing, sampling, denormalizing).
On CUDA every timing is bracketed by `torch.cuda.synchronize`. The graph's actions are compared
with eager's (max |difference| printed). Default checkpoint: the random-weight bench policy of
`bench_support.build_policy` (one 96 px camera, 32 px model input); --gpu-policy: 3 cameras at
224 px through a ViT-B/32-sized backbone, 10 flow steps, which is what the GPU figures are for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench_support import build_policy
from vla_foundry.devices import resolve_device
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.action import PolicyRequest
from vla_foundry.robotics.observations import RawObservation


def requests_for(pipeline, batch: int) -> list[PolicyRequest]:
    r = pipeline.robot_io
    rng = np.random.default_rng(batch)
    size = r.resize_images_size or [r.image_size] * 2
    return [PolicyRequest(RawObservation({n: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for n in r.image_names},
                                         {f: rng.normal(size=(r.past_steps + 1, r.field_dims[f])).astype(np.float32)
                                          for f in r.proprioception_fields}, "move to the red target"), seed=i)
            for i in range(batch)]


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median ms of ``fn()`` over ``repeats`` calls after two untimed ones."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a diffusion_policy experiment (default: a random one)")
    parser.add_argument("--gpu-policy", action="store_true", help="3 cameras at 224 px, a ViT-B/32-sized backbone")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--batch-sizes", default=None, help="default 1,2,4,8 on CPU, 1,2,4,8,16,32 on CUDA")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in (args.batch_sizes or ("1,2,4,8,16,32" if device.type == "cuda" else "1,2,4,8"))
             .split(",")]
    with tempfile.TemporaryDirectory(prefix="policy-sampling-") as scratch:
        path = args.checkpoint
        if path is None:
            cameras = ["left", "right", "wrist"] if args.gpu_policy else ["scene"]
            path = build_policy(Path(scratch) / "policy", cameras, 224 if args.gpu_policy else 96,
                                gpu_sized=args.gpu_policy)
        kwargs = {"device": device, "dtype": args.dtype}
        graphs = load_pipeline(path, **kwargs)
        eager = load_pipeline(path, **kwargs, traced_sampling=False, cuda_graphs=False)
        started = time.perf_counter()
        graphs.warmup(max(sizes))
        capture_s = time.perf_counter() - started
        eager.warmup(1)
        weight = next(graphs.model.parameters())
        print(f"{path.name}: {sum(p.numel() for p in graphs.model.parameters()) / 1e6:.1f} M parameters, "
              f"{len(graphs.robot_io.image_names)} camera frames of {graphs.robot_io.image_size} px, "
              f"{graphs.num_inference_steps} flow steps; {device} {weight.dtype}; graphs: "
              f"{graphs.io()['sampling_graphs']} ({len(graphs.graphs)} captured at warm-up in {capture_s:.1f} s); "
              f"torch threads {torch.get_num_threads()}; median of {args.repeats}\n")
        print("| batch | sample eager ms | sample graph ms | speed-up | predict_each eager ms | predict_each graph ms "
              "| graph ms per robot | max abs diff |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for batch in sizes:
            print(row(graphs, eager, batch, device, args.repeats), flush=True)


def sampling_inputs(pipeline, batch: int) -> tuple[dict, torch.Tensor]:
    """The model inputs of ``batch`` requests and their initial noise (seeded by the batch size)."""
    inputs = pipeline.prepare([r.sample for r in requests_for(pipeline, batch)]).model_kwargs()
    noise = torch.randn(inputs["actions"].shape, generator=torch.Generator().manual_seed(batch)).to(inputs["actions"])
    return inputs, noise


def sampling_floor_ms(checkpoint: Path, device: str, steps: Optional[int] = None, batch: int = 1,
                      repeats: int = 20, dtype: str = "auto") -> float:
    """The compute floor of a request of ``batch`` robots: the median ms of the policy's sampling alone from its
    graphs (captured at warm-up, as a server does), on ``device`` in ``dtype`` (auto: the dtype a server picks
    there), with ``steps`` denoising steps (default: the policy's). What a robot's round trip is compared with."""

    @torch.inference_mode()
    def measure() -> float:
        where = resolve_device(device)
        pipeline = load_pipeline(checkpoint, device=where, dtype=dtype)
        pipeline.warmup(batch)
        inputs, noise = sampling_inputs(pipeline, batch)
        return timed(lambda: pipeline.graphs.sample(inputs, steps or pipeline.num_inference_steps, noise),
                     where, repeats)

    floor = measure()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the pipeline is gone: its memory goes back before servers start on the GPU
    return floor


def row(graphs, eager, batch: int, device: torch.device, repeats: int) -> str:
    """One batch size's line of the table."""
    steps = graphs.num_inference_steps
    requests = requests_for(graphs, batch)
    inputs, noise = sampling_inputs(graphs, batch)
    floor_graph = timed(lambda: graphs.graphs.sample(inputs, steps, noise), device, repeats)
    floor_eager = timed(lambda: graphs.model.generate_actions(**inputs, num_inference_steps=steps,
                                                              initial_noise=noise), device, repeats)
    call_graph = timed(lambda: graphs.predict_each(requests), device, repeats)
    call_eager = timed(lambda: eager.predict_each(requests), device, repeats)
    diff = max(float(np.abs(a.action_chunk - b.action_chunk).max())
               for a, b in zip(graphs.predict_each(requests), eager.predict_each(requests)))
    return (f"| {batch} | {floor_eager:.2f} | {floor_graph:.2f} | {floor_eager / floor_graph:.2f}x | "
            f"{call_eager:.2f} | {call_graph:.2f} | {call_graph / batch:.2f} | {diff:.1e} |")

if __name__ == "__main__":
    sys.exit(main())
