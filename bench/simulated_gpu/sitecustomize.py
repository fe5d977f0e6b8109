"""`bench/fleet.py --simulated-gpu`: a policy server whose device is simulated, so a CPU host can study how the
server's host side (HTTP, decoding, batching, the model process's hand-offs, replies) behaves around a GPU.

Python imports ``sitecustomize`` at start-up from the first folder on ``sys.path`` that has one; the fleet bench
puts this folder first on the servers' ``PYTHONPATH`` (our server, its model process, LitServe's worker) and sets
``VLA_BENCH_SIMULATED_GPU=BASE_MS,PER_ROBOT_MS``. Once ``vla_foundry.pipelines.action`` is imported there:

- a policy's sampling (``ActionPipeline._sample``: the backbone and every denoising step) sleeps BASE_MS +
  PER_ROBOT_MS × (robots − 1) and returns zeros: the time a GPU's graph replay takes, during which the calling
  thread waits without the interpreter lock, as it waits for a CUDA stream. The default 6.2 ms + 0.45 ms per
  extra robot is the GPU-sized policy's bfloat16 sampling from CUDA graphs (6.20 ms for one robot on an H100,
  13.0 ms for 16 on an H200; README, Benchmarks);
- a raw-pixel processor (``RawPixels``) stacks the batch's uint8 frames as it does (``RawPixels.frames``) and copies
  them once more, as they are copied to a GPU, without making floats on the host (a GPU makes them);
- a policy captures no graphs at warm-up (they would be the tiny model's, fed uint8 pixels, and never replayed).

Everything else (the route, admission, the executor, the model process's channel, preparing the batch's other
inputs, building the chunks, the replies) runs as it does on a GPU host. Without the variable nothing changes.
Bench-only: the package never imports this.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

TARGET = "vla_foundry.pipelines.action"


def simulate(base_ms: float, per_robot_ms: float) -> None:
    import torch

    from vla_foundry.pipelines.action import ActionPipeline
    from vla_foundry.robotics.processor import RawPixels

    def sample(self, inputs, steps, generator, initial_noise):  # (B, Ta, A) normalized actions
        time.sleep((base_ms + per_robot_ms * (inputs.actions.shape[0] - 1)) / 1000)
        return torch.zeros_like(inputs.actions)

    def pixels(self, frames, device=None):  # (n, 3, S, S) uint8: the copy a GPU would get, no floats made here
        return self.frames(frames, device).clone().permute(0, 3, 1, 2)

    init = ActionPipeline.__init__

    def __init__(self, *args, **kwargs):  # no graph of the tiny model: the simulated sampling never replays one
        init(self, *args, **{**kwargs, "cuda_graphs": False, "traced_sampling": False})

    ActionPipeline.__init__ = __init__
    ActionPipeline._sample = sample
    RawPixels.__call__ = pixels


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``simulate`` right after ``TARGET`` is executed (a post-import hook: Python has none of its own)."""

    def __init__(self, base_ms: float, per_robot_ms: float):
        self.base_ms, self.per_robot_ms = base_ms, per_robot_ms

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            simulate(self.base_ms, self.per_robot_ms)

        spec.loader.exec_module = exec_module
        return spec


_setting = os.environ.get("VLA_BENCH_SIMULATED_GPU")
if _setting:
    _base, _per = (float(x) for x in _setting.split(","))
    sys.meta_path.insert(0, _AfterImport(_base, _per))
