"""``demo-diffusion_policy``: a policy trained on the synthetic reach task (``reach_task``).

The camera shows a coloured target near one corner and the agent; the instruction names the
target's colour; proprioception is the agent's position; actions are position deltas. The
policy is a ``diffusion_policy`` with a tiny ``clip_backbone`` (text and image towers trained
with it) and a bidirectional transformer denoiser, trained with flow matching through its own
batch handler on expert demonstrations: about four minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from vla_foundry.demo import reach_task as task
from vla_foundry.demo import vlm as shapes
from vla_foundry.demo.hf_models import build_tiny_clip
from vla_foundry.demo.training import train
from vla_foundry.models.registry import create_batch_handler, create_model
from vla_foundry.params.clip import ClipBackboneParams
from vla_foundry.params.diffusion import DiffusionPolicyParams, NoiseSchedulerParams
from vla_foundry.params.transformer import TransformerParams
from vla_foundry.robotics.experiment import normalizer_block, save_policy_experiment
from vla_foundry.robotics.normalizer import NormalizerConfig, RoboticsNormalizer
from vla_foundry.robotics.observations import RawObservation, build_inputs, normalize_fields
from vla_foundry.robotics.robot_io import RobotIO

CLIP_DIR = "clip"  # relative to the experiment, so the member can be moved
PAST, FUTURE = 1, 3  # one executed action as context; the current and 3 future actions
EPISODES = 800
STEPS = 6000
BATCH = 64
LR = 1e-3


def robot_io(processor: str) -> RobotIO:
    return RobotIO(camera_names=[task.CAMERA], image_indices=[0], image_names=[f"{task.CAMERA}_t0"],
                   proprioception_fields=[task.PROPRIO_FIELD], action_fields=[task.ACTION_FIELD],
                   field_dims={task.PROPRIO_FIELD: 2, task.ACTION_FIELD: 2}, past_steps=PAST, future_steps=FUTURE,
                   processor=processor, image_size=task.IMAGE_SIZE,
                   resize_images_size=[task.IMAGE_SIZE, task.IMAGE_SIZE], max_text_seq_len=32)


def demo_params(clip_dir: str) -> DiffusionPolicyParams:
    return DiffusionPolicyParams(
        vision_language_backbone=ClipBackboneParams(hf_pretrained=clip_dir),
        transformer=TransformerParams(hidden_dim=64, n_layers=3, n_heads=4, vocab_size=8, max_seq_len=32,
                                      is_causal=False),
        noise_scheduler=NoiseSchedulerParams(num_timesteps=100, clamp_range=(-3.0, 3.0)),
        use_flow_matching_scheduler=True, action_dim=2, proprioception_dim=2)


def observation_from(obs: dict, past: int = PAST) -> RawObservation:
    """A reach-task observation as the policy takes it: the last P+1 positions (the first repeated before the
    episode began) and the last P executed deltas (zeros before it began)."""
    history = [np.asarray(p, np.float32) for p in obs["agent_xy_history"]]
    padded = [history[0]] * max(0, past + 1 - len(history)) + history[-(past + 1):]
    deltas = [np.zeros(2, np.float32)] * (past + 1) + [b - a for a, b in zip(history[:-1], history[1:])]
    return RawObservation(images={f"{task.CAMERA}_t0": obs["images"][task.CAMERA]},
                          lowdim={task.PROPRIO_FIELD: np.stack(padded)}, instruction=obs["instruction"],
                          past_actions={task.ACTION_FIELD: np.stack(deltas[-past:])} if past else None)


def pipeline_policy(pipeline, steps: Optional[int] = None, seed: int = 0) -> Callable[[dict], np.ndarray]:
    """A ``reach_task`` policy calling the pipeline in process: the chunk from the current action on."""
    calls = [seed]

    def policy(obs: dict) -> np.ndarray:
        calls[0] += 1
        out = pipeline.predict([observation_from(obs)], num_inference_steps=steps, seed=calls[0])
        first = out["first_action_index"]
        return out["action_chunk"][0, first:first + out["n_action_steps"]]

    return policy


def build(experiment_dir: Path, progress: bool = True, steps: int = STEPS) -> None:
    experiment_dir = Path(experiment_dir)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clip_dir = build_tiny_clip(experiment_dir / CLIP_DIR, shapes.train_tokenizer())
    windows = task.training_windows(EPISODES, PAST, FUTURE, rng)
    stats = task.compute_stats(windows, PAST)
    # Most windows of an episode come after the expert has arrived (all-zero actions); keep a third of those,
    # so training time goes to the windows where the image decides the action.
    windows = [w for w in windows if np.abs(w["lowdim"][task.ACTION_FIELD][PAST:]).max() > 1e-3 or rng.random() < 1 / 3]
    normalizer = normalizer_block([task.PROPRIO_FIELD, task.ACTION_FIELD], past=PAST, future=FUTURE)
    io = robot_io(processor=str(clip_dir))
    model = create_model(demo_params(str(clip_dir)), load_pretrained=True)
    norm = RoboticsNormalizer(stats, NormalizerConfig.from_dict(normalizer))
    processor = model.vision_language_backbone.input_processor(str(clip_dir), io.image_size)

    generator = torch.Generator().manual_seed(0)

    # Every window through the same processing the server applies, once.
    samples = [RawObservation({f"{task.CAMERA}_t0": w["images"][task.CAMERA]},
                              {task.PROPRIO_FIELD: w["lowdim"][task.PROPRIO_FIELD]}, w["instruction"])
               for w in windows]
    inputs = build_inputs(samples, io, norm, processor, uses_language=True)
    actions = normalize_fields([w["lowdim"] for w in windows], [task.ACTION_FIELD], norm, PAST)  # (N, Ta, 2)
    handler = create_batch_handler("diffusion_policy")

    def batch() -> dict:
        rows = torch.randint(0, len(samples), (BATCH,), generator=generator)
        past_mask = torch.zeros(BATCH, PAST + 1 + FUTURE, dtype=torch.bool)
        # Half the batch sees the executed past action, as a robot that sends it does; half does not.
        past_mask[:, :PAST] = (torch.rand(BATCH, generator=generator) < 0.5)[:, None]
        return {"input_ids": inputs.input_ids[rows], "attention_mask": inputs.attention_mask[rows],
                "pixel_values": inputs.pixel_values[rows], "attention_mask_images": inputs.attention_mask_images[rows],
                "actions": actions[rows], "past_mask": past_mask, "proprioception": inputs.proprioception[rows]}

    loss = train(model, handler, batch, steps=steps, lr=LR, warmup=100, desc="demo-diffusion_policy",
                 progress=progress, generator=generator)
    model.params = demo_params(CLIP_DIR)  # relative, so the member can be moved
    save_policy_experiment(model, experiment_dir, robot_io(processor=CLIP_DIR), stats, normalizer,
                           global_step=steps, training_config={"name": "demo-diffusion_policy"})
    (experiment_dir / "demo.json").write_text(json.dumps({
        "description": "A diffusion policy (tiny CLIP backbone + 3-layer denoiser, flow matching) trained on CPU "
                       "on a synthetic reach task: the 32 px 'scene' camera shows a coloured target near a corner "
                       "and the white agent; 'move to the <colour> target' names it; proprioception is the "
                       "agent's xy, actions are xy deltas. vla_foundry/demo/reach_task.py generates and scores it.",
        "random_weights": False, "train_steps": steps, "final_train_loss": round(loss, 4),
    }, indent=2))
