"""Demo member ``demo-vlm``: our ViT + projector + transformer, trained briefly to caption synthetic shapes.

Images are drawn on the spot (a coloured square, circle or triangle on the left or right of a
dark 32 px canvas) and captioned "a red circle on the left"; training runs through the type's
own batch handler on the same inputs the server builds (``caption_inputs.VLMCaptionProcessor``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from vla_foundry.caption_inputs import VLMCaptionProcessor
from vla_foundry.checkpoint import save_experiment
from vla_foundry.demo.training import train
from vla_foundry.models.registry import create_batch_handler, create_model
from vla_foundry.params.transformer import TransformerParams
from vla_foundry.params.vision import ViTParams, VLMParams
from vla_foundry.pipelines.text import pad_rows

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
          "white": (240, 240, 240), "purple": (150, 60, 200)}
SHAPES = ("square", "circle", "triangle")
SIDES = ("left", "right")
EOS = "<|endoftext|>"
IMAGE_SIZE = 32
STEPS = 800
BATCH = 32
SEED = 0


def draw(color: str, shape: str, side: str, rng: random.Random) -> np.ndarray:
    """A (32, 32, 3) uint8 image of one shape, with a little jitter in size, place and background."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(0, 40) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    pen = ImageDraw.Draw(image)
    r = rng.randint(5, 7)
    cx = (8 if side == "left" else 24) + rng.randint(-2, 2)
    cy = 16 + rng.randint(-6, 6)
    fill = COLORS[color]
    if shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return np.array(image)


def sample(rng: random.Random) -> tuple[np.ndarray, str]:
    color, shape, side = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIDES)
    return draw(color, shape, side, rng), f"a {color} {shape} on the {side}"


def train_tokenizer():
    """A word-level BPE over the caption vocabulary (plus bytes, so any prompt still tokenizes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    captions = [f"a {c} {s} on the {side}" for c in COLORS for s in SHAPES for side in SIDES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(captions * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def demo_params(vocab_size: int) -> VLMParams:
    vit = ViTParams(img_size=IMAGE_SIZE, patch_size=8, hidden_dim=64, inter_dim=128, n_heads=4, n_layers=2,
                    projector_pixel_shuffle_factor=2)
    lm = TransformerParams(hidden_dim=64, n_layers=2, n_heads=4, vocab_size=vocab_size + 1, max_seq_len=64)
    return VLMParams(vit=vit, transformer=lm, image_token_id=vocab_size, processor="none")


def build(experiment_dir: Path, progress: bool = True, steps: int = STEPS) -> None:
    tokenizer = train_tokenizer()
    params = demo_params(len(tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = create_model(params, load_pretrained=False)
    model.params = params
    processor = VLMCaptionProcessor(model, tokenizer)
    handler = create_batch_handler("vlm")
    rng = random.Random(SEED)

    def batch() -> dict:
        images, captions = zip(*(sample(rng) for _ in range(BATCH)))
        inputs = processor.encode(list(captions), None, [[im] for im in images], answers=True)
        input_ids, mask = pad_rows(inputs.ids, tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask, **inputs.image_inputs}

    loss_value = train(model, handler, batch, steps=steps, lr=3e-3, betas=(0.9, 0.95), warmup=30, desc="demo-vlm",
                       progress=progress, generator=torch.Generator().manual_seed(SEED))
    save_experiment(model, experiment_dir, checkpoint_num=1, global_step=steps, tokenizer=tokenizer,
                    training_config={"name": "demo-vlm", "data": {"image_size": IMAGE_SIZE}})
    (experiment_dir / "demo.json").write_text(json.dumps({
        "description": "A 2-layer ViT + 2-layer GPT captioner trained on CPU for a few hundred steps on "
                       "synthetic 32 px images of one coloured shape (e.g. 'a red circle on the left'). Send "
                       "such an image with no prompt.",
        "random_weights": False, "train_steps": steps, "final_train_loss": round(loss_value, 4),
    }, indent=2))
