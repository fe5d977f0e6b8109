"""Demo member ``demo-stable_diffusion``: a small pixel-space UNet with a CLIP text encoder, trained briefly to
draw the synthetic shapes of ``demo-vlm`` from their captions ("a red circle").

The CLIP text tower (random init, trained along) reads the caption; the UNet learns the
denoising loss through the type's own batch handler, with 10% of captions dropped so
classifier-free guidance works.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from vla_foundry.checkpoint import save_experiment
from vla_foundry.demo import vlm as shapes
from vla_foundry.demo.hf_models import build_tiny_clip
from vla_foundry.demo.training import train
from vla_foundry.models.registry import create_batch_handler, create_model
from vla_foundry.params.clip import ClipHFParams
from vla_foundry.params.diffusion import NoiseSchedulerParams, StableDiffusionParams, UNetParams

CLIP_DIR = "clip"  # relative to the experiment, so the member can be moved
STEPS = 3000
TIMESTEPS = 100  # few diffusion steps: the training DDPM samples in 99 UNet calls, DPM-Solver++ in 20
BATCH = 32
TEXT_WIDTH = 64
IMAGE_SIZE = 16  # small enough to train on a CPU in minutes
SEED = 0


def draw(color: str, shape: str, rng: random.Random) -> np.ndarray:
    """One shape at 16 px (drawn at 32 and halved; the side is left out of the caption)."""
    from PIL import Image

    image = shapes.draw(color, shape, rng.choice(shapes.SIDES), rng)
    return np.array(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def demo_params(clip_dir: str, flow_matching: bool = False) -> StableDiffusionParams:
    """The demo member's config; ``flow_matching`` trains the same model with VLA Foundry's flow-matching
    scheduler instead (``bench/flow_samplers.py`` compares the flow samplers on it)."""
    unet = UNetParams(channels=[32, 64, 64], time_emb_dim=32, text_emb_dim=TEXT_WIDTH, image_size=IMAGE_SIZE)
    # Betas ×10 the usual linear 1e-4…0.02 (which is meant for T = 1000): over 100 steps they still end in pure
    # noise, where every sampler starts. No clamp: the fast samplers walk unclamped Gaussian noise.
    noise = NoiseSchedulerParams(num_timesteps=TIMESTEPS, beta_start=1e-3, beta_end=0.2, clamp_range=None)
    return StableDiffusionParams(unet=unet, noise_scheduler=noise, use_flow_matching_scheduler=flow_matching,
                                 clip=ClipHFParams(hf_pretrained=clip_dir), do_classifier_free_guidance=True,
                                 guidance_scale=3.0, dropout_percent=0.1)


def build(experiment_dir: Path, progress: bool = True, steps: int = STEPS, flow_matching: bool = False) -> None:
    experiment_dir.mkdir(parents=True, exist_ok=True)
    clip_dir = build_tiny_clip(experiment_dir / CLIP_DIR, shapes.train_tokenizer(), text_hidden_size=TEXT_WIDTH,
                               max_text_length=16, seed=SEED)
    params = demo_params(str(clip_dir), flow_matching)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = create_model(params, load_pretrained=True)
    handler = create_batch_handler("stable_diffusion", dropout_percent=params.dropout_percent)
    rng = random.Random(SEED)
    uncond_ids = model.clip.tokenize([""], 16)

    def batch() -> dict:
        picks = [(rng.choice(list(shapes.COLORS)), rng.choice(shapes.SHAPES)) for _ in range(BATCH)]
        pixels = torch.stack([torch.from_numpy(draw(c, s, rng)).permute(2, 0, 1).float() / 127.5 - 1
                              for c, s in picks])  # (B, 3, 16, 16) in [-1, 1]
        ids = model.clip.tokenize([f"a {c} {s}" for c, s in picks], 16)
        return {"pixel_values": pixels, "input_ids": ids, "uncond_input_ids": uncond_ids}

    loss_value = train(model, handler, batch, steps=steps, lr=1e-3, warmup=50, desc="demo-stable_diffusion",
                       progress=progress, generator=torch.Generator().manual_seed(SEED))
    model.clip.model.save_pretrained(experiment_dir / CLIP_DIR)  # the trained text tower, for reference
    model.params = demo_params(CLIP_DIR, flow_matching)
    save_experiment(model, experiment_dir, checkpoint_num=1, global_step=steps,
                    training_config={"name": "demo-stable_diffusion", "data": {"max_text_seq_len": 16}})
    (experiment_dir / "demo.json").write_text(json.dumps({
        "description": "A 3-level pixel-space UNet (16 px) with a 2-layer CLIP text encoder, trained on CPU for "
                       f"{steps} steps to draw one coloured shape from its caption: try 'a red circle', 'a blue "
                       "square', 'a yellow triangle' (colours: " + ", ".join(shapes.COLORS) + ").",
        "random_weights": False, "train_steps": steps, "final_train_loss": round(loss_value, 4),
    }, indent=2))


SHEET_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a green circle", "a white square",
                 "a purple triangle")


def contact_sheet(experiment_dir: Path, out_file: Path, prompts=SHEET_PROMPTS, per_prompt: int = 4,
                  seed: int = 0, scale: int = 6) -> Path:
    """A PNG grid of samples, one row per prompt with the prompt written beside it (the README's picture)."""
    from PIL import Image, ImageDraw

    from vla_foundry.pipelines import load_pipeline

    pipeline = load_pipeline(experiment_dir)
    cell, label_width = IMAGE_SIZE * scale, 150
    sheet = Image.new("RGB", (label_width + per_prompt * (cell + 4), len(prompts) * (cell + 4)), "white")
    pen = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(prompts):
        result = pipeline.generate(prompt, num_images=per_prompt, seed=seed)
        y = row * (cell + 4)
        pen.text((6, y + cell // 2 - 6), prompt, fill="black")
        for col, image in enumerate(result.images):
            tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_width + col * (cell + 4), y))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_file)
    return out_file
