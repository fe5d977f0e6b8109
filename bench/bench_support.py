"""What the benchmarks share: a random-weight policy or text model to serve, a free loopback port, the command
that serves, and a server process run until it is ready and stopped with everything it started.

Imported by the scripts beside it (``python bench/<script>.py`` puts this folder on the path). Light to
import: torch and the model package load only when a model is built.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import httpx
import numpy as np

from service.cli import serve_command  # noqa: F401  (the benches take it from here with the other helpers)

PROPRIO, ACTION, DIM = "joint_pos", "joint_delta", 7
PAST, FUTURE = 1, 7


def build_policy(path: Path, cameras: list[str], size: int, gpu_sized: bool = False,
                 model_input: Optional[int] = None) -> Path:
    """A random-weight ViT-backbone `diffusion_policy` (32 px model input, one frame of ``size`` px per camera, P = 1,
    F = 7, 7-value proprioception and actions, flow matching, T = 10) with its robotics side files, under ``path``.

    ``gpu_sized``: a policy whose GPU timings mean something: 224 px model input through a ViT-B/32-sized
    backbone (width 768, 12 layers, 12 heads, patch 32: CLIP-B/32's image tower) and a 6-layer width-512
    denoiser. ``model_input``: the tiny model's input size instead of 32 px (224: the GPU-sized policy's requests
    and inputs with a tiny model's compute, for `fleet.py --simulated-gpu`)."""
    import torch

    from vla_foundry.models import create_model
    from vla_foundry.params.clip import ViTBackboneParams
    from vla_foundry.params.diffusion import DiffusionPolicyParams, NoiseSchedulerParams
    from vla_foundry.params.transformer import TransformerParams
    from vla_foundry.robotics.experiment import normalizer_block, save_policy_experiment
    from vla_foundry.robotics.robot_io import RobotIO, image_names_for
    from vla_foundry.robotics.stats import field_stats

    robot_io = RobotIO(camera_names=cameras, image_indices=[0], image_names=image_names_for(cameras, [0]),
                       proprioception_fields=[PROPRIO], action_fields=[ACTION], field_dims={PROPRIO: DIM, ACTION: DIM},
                       past_steps=PAST, future_steps=FUTURE, processor="none",
                       image_size=224 if gpu_sized else model_input or 32,
                       resize_images_size=[size, size], max_text_seq_len=64)
    rng = np.random.default_rng(0)
    window = PAST + 1 + FUTURE
    stats = field_stats({PROPRIO: rng.normal(0.5, 2.0, (64, window, DIM)),
                         ACTION: rng.uniform(-1.0, 1.0, (64, window, DIM))})
    if gpu_sized:
        vit = ViTBackboneParams(img_size=224, patch_size=32, hidden_dim=768, inter_dim=3072, n_heads=12, n_layers=12)
        transformer = TransformerParams(hidden_dim=512, n_layers=6, n_heads=8, vocab_size=300, max_seq_len=512,
                                        is_causal=False)
    else:
        side = model_input or 32
        vit = ViTBackboneParams(img_size=side, patch_size=side // 4 if side <= 32 else 32, hidden_dim=32, inter_dim=64,
                                n_heads=2, n_layers=2)
        transformer = TransformerParams(hidden_dim=64, n_layers=2, n_heads=2, vocab_size=300, max_seq_len=256,
                                        is_causal=False)
    params = DiffusionPolicyParams(vision_language_backbone=vit, transformer=transformer,
                                   noise_scheduler=NoiseSchedulerParams(num_timesteps=10, clamp_range=(-3.0, 3.0)),
                                   use_flow_matching_scheduler=True, action_dim=DIM, proprioception_dim=DIM)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(params, load_pretrained=False).eval()
    save_policy_experiment(model, path, robot_io, stats,
                           normalizer_block([PROPRIO, ACTION], past=PAST, future=FUTURE))
    return path


def build_text_model(path: Path, n_layers: int, width: int, device: str = "cpu") -> Path:
    """A random-weight GPT-style ``transformer`` with ``n_layers`` layers of width ``width`` (heads of 128) and a
    1,024-token context, with the demo transformer's tokenizer, saved under ``path`` in bfloat16 (``precision:
    amp_bf16``, a bf16 training run's, so a CUDA server serves it in bfloat16). Built on ``device`` (a GPU builds
    a billion parameters in seconds). Its text is noise; its timings are those of a model of that shape."""
    import torch
    from transformers import AutoTokenizer

    from vla_foundry.checkpoint import save_experiment
    from vla_foundry.demo import ensure_demo_pack
    from vla_foundry.demo_paths import DEFAULT_DEMO_DIR
    from vla_foundry.models import create_model
    from vla_foundry.params.transformer import TransformerParams

    tokenizer = AutoTokenizer.from_pretrained(
        str(ensure_demo_pack(DEFAULT_DEMO_DIR, members=["demo-transformer"]) / "demo-transformer" / "tokenizer"))
    params = TransformerParams(hidden_dim=width, n_layers=n_layers, n_heads=max(1, width // 128),
                               vocab_size=len(tokenizer), max_seq_len=1024)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = create_model(params, load_pretrained=False).eval()
    save_experiment(model.to(torch.bfloat16), path, precision="amp_bf16", tokenizer=tokenizer, fmt="safetensors",
                    training_config={"name": f"random-transformer-{n_layers}x{width}"})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (LitServe forks an API server and spawns a worker), SIGKILL to what
    is left after 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the group's other members may still be shutting down
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait()


def wait_until_ready(proc: subprocess.Popen, base: str, ready_path: str, name: str, log,
                     timeout_s: float) -> float:
    """Polls ``ready_path`` until it answers 200; the seconds that took. Exits with the server's log (``log``,
    a file it writes) when it dies or is not ready within ``timeout_s``."""
    started = time.monotonic()
    with httpx.Client(base_url=base, timeout=10) as client:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"{name} exited before it was ready:\n{log.read()[-4000:]}")
            try:
                if client.get(ready_path).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() - started > timeout_s:
                log.seek(0)
                raise SystemExit(f"{name} was not ready within {timeout_s:.0f} s:\n{log.read()[-4000:]}")
            time.sleep(0.2)


@contextmanager
def server_process(command: list[str], env: dict[str, str], port: int, ready_path: str, name: str,
                   ready_timeout_s: float = 300.0) -> Iterator[str]:
    """Runs ``command`` (a server for 127.0.0.1:``port``) in its own process group; yields the base URL once
    ``ready_path`` answers 200, then stops the group."""
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would block the server once full
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, base, ready_path, name, log, ready_timeout_s)
        SERVER_PIDS[base] = proc.pid
        yield base
    finally:
        SERVER_PIDS.pop(base, None)
        stop_group(proc)
        log.close()


SERVER_PIDS: dict[str, int] = {}  # base URL → the process of a server that `server_process` runs


def main_thread_cpu_s(base: str) -> float | None:
    """The CPU seconds (user and system) that the main thread of the server at ``base`` (started by
    `server_process`) has used: for our server and uvicorn, the event loop's thread. None where it cannot be
    read (not Linux, or no such server)."""
    pid = SERVER_PIDS.get(base)
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def demo_policy() -> Path:
    """The demo pack's policy under the default demo directory: copied from the pack the package ships (checksums
    verified), trained only where the package lacks it."""
    from vla_foundry.demo import ensure_demo_pack
    from vla_foundry.demo_paths import DEFAULT_DEMO_DIR

    return ensure_demo_pack(DEFAULT_DEMO_DIR, members=["demo-diffusion_policy"]) / "demo-diffusion_policy"
