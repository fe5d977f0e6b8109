"""Tiny models and checkpoints built on the spot (no downloads), one builder per registered type.

Every registered type must have a builder here: the parametrized service tests fail for
a type without one, so a new model cannot land untested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vla_foundry.checkpoint import save_experiment
from vla_foundry.models.registry import create_model
from vla_foundry.params.transformer import TransformerParams

TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a robot picks up the red block and places it in the bin",
    "shall i compare thee to a summer's day",
    "thou art more lovely and more temperate",
] * 4


def build_tiny_tokenizer():
    """A byte-level BPE with 300 tokens and an eos, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_transformer_params(**overrides: Any) -> TransformerParams:
    values = dict(hidden_dim=32, n_layers=2, n_heads=2, vocab_size=300, max_seq_len=64)
    values.update(overrides)
    return TransformerParams(**values)


def tiny_model(params, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(params, load_pretrained=False).eval()


def _transformer(path: Path, tokenizer) -> Path:
    save_experiment(tiny_model(tiny_transformer_params(vocab_size=len(tokenizer))), path, tokenizer=tokenizer)
    return path


def sharpen_hf(hf_dir: Path, auto_class: str, seed: int = 0, std: float = 0.2) -> Path:
    """Redraw every matrix of the HF model in ``hf_dir`` (loaded with ``transformers.<auto_class>``) with a larger
    std and save it back: with HF's 0.02 init a tiny model's greedy outputs hardly depend on its input, which would
    make equalities between two ways of running it too easy."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(hf_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(hf_dir)
    return hf_dir


def tiny_vlm_params(vocab_size: int, **overrides: Any):
    """A ViT (32 px, 8 px patches, shuffle 2 ⇒ 4 tokens per image) + transformer; the last id is the image
    placeholder."""
    from vla_foundry.params.vision import ViTParams, VLMParams

    vit = ViTParams(img_size=32, patch_size=8, hidden_dim=32, inter_dim=64, n_heads=2, n_layers=2,
                    projector_pixel_shuffle_factor=2)
    values = dict(vit=vit, transformer=tiny_transformer_params(vocab_size=vocab_size + 1),
                  image_token_id=vocab_size)
    values.update(overrides)
    return VLMParams(**values)


def _transformer_hf(path: Path, tokenizer) -> Path:
    """An experiment whose ``hf_pretrained`` is a tiny Llama saved beside it; the tokenizer comes from there."""
    from vla_foundry.demo.hf_models import build_tiny_causal_lm
    from vla_foundry.params.transformer import TransformerHFParams

    hf_dir = build_tiny_causal_lm(path / "hf_model", tokenizer)
    model = create_model(TransformerHFParams(hf_pretrained=str(hf_dir)), load_pretrained=True).eval()
    model.params = TransformerHFParams(hf_pretrained=str(hf_dir))
    save_experiment(model, path)
    return path


def _vlm(path: Path, tokenizer) -> Path:
    save_experiment(tiny_model(tiny_vlm_params(len(tokenizer))), path, tokenizer=tokenizer)
    return path


def _vlm_hf(path: Path, tokenizer) -> Path:
    """A bare HF directory (Idefics3, SmolVLM-style) served as is: its own weights are the checkpoint."""
    from vla_foundry.demo.hf_models import build_tiny_idefics3

    return build_tiny_idefics3(path, tokenizer)


def tiny_stable_diffusion_params(clip_dir: Optional[Path] = None, **overrides: Any):
    """A 16 px, 3-level UNet over 10 DDPM steps; text-conditioned through ``clip_dir`` when given."""
    from vla_foundry.params.clip import ClipHFParams
    from vla_foundry.params.diffusion import NoiseSchedulerParams, StableDiffusionParams, UNetParams

    unet = UNetParams(channels=[8, 16, 16], time_emb_dim=16, text_emb_dim=32 if clip_dir else 0, image_size=16)
    values = dict(unet=unet, noise_scheduler=NoiseSchedulerParams(num_timesteps=10),
                  clip=ClipHFParams(hf_pretrained=str(clip_dir) if clip_dir else None))
    values.update(overrides)
    return StableDiffusionParams(**values)


def _stable_diffusion(path: Path, tokenizer) -> Path:
    from vla_foundry.demo.hf_models import build_tiny_clip

    clip_dir = build_tiny_clip(path / "clip", tokenizer)
    save_experiment(tiny_model(tiny_stable_diffusion_params(clip_dir)), path)
    return path


def _clip_hf(path: Path, tokenizer) -> Path:
    from vla_foundry.demo.hf_models import build_tiny_clip
    from vla_foundry.params.clip import ClipHFParams

    clip_dir = build_tiny_clip(path / "clip", tokenizer)
    save_experiment(tiny_model(ClipHFParams(hf_pretrained=str(clip_dir))), path)
    return path


# A tiny OpenCLIP architecture (open_clip takes model configs as JSON files).
TINY_OPENCLIP = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def _clip_openclip(path: Path, tokenizer) -> Path:
    import json

    from vla_foundry.params.clip import ClipOpenClipParams

    path.mkdir(parents=True, exist_ok=True)
    (path / "tiny-openclip.json").write_text(json.dumps(TINY_OPENCLIP))
    model = tiny_model(ClipOpenClipParams(architecture=str(path / "tiny-openclip.json")))
    model.params = ClipOpenClipParams(architecture="tiny-openclip.json")  # relative to the experiment
    save_experiment(model, path)
    return path


POLICY_CAMERAS = ["front", "wrist"]
POLICY_PROPRIO = {"arm__pos": 2}
POLICY_ACTIONS = {"arm__delta": 2, "gripper": 1}


def tiny_policy_io(processor: str):
    """Two cameras with two frames each (t-1, t0), P = 1, F = 2 ⇒ Ta = 4, A = 3."""
    from vla_foundry.robotics.robot_io import RobotIO, image_names_for

    return RobotIO(camera_names=POLICY_CAMERAS, image_indices=[-1, 0],
                   image_names=image_names_for(POLICY_CAMERAS, [-1, 0]),
                   proprioception_fields=list(POLICY_PROPRIO), action_fields=list(POLICY_ACTIONS),
                   field_dims={**POLICY_PROPRIO, **POLICY_ACTIONS}, past_steps=1, future_steps=2,
                   processor=processor, image_size=32, resize_images_size=[32, 32], max_text_seq_len=64)


def tiny_policy_stats(seed: int = 0) -> dict:
    import numpy as np

    from vla_foundry.robotics.stats import field_stats

    rng = np.random.default_rng(seed)
    windows = {**{f: rng.normal(0.5, 2.0, (40, 2, d)) for f, d in POLICY_PROPRIO.items()},
               **{f: rng.uniform(-1.0, 3.0, (40, 4, d)) for f, d in POLICY_ACTIONS.items()}}
    return field_stats(windows)


def tiny_policy_params(backbone, **overrides: Any):
    from vla_foundry.params.diffusion import DiffusionPolicyParams, NoiseSchedulerParams

    values = dict(vision_language_backbone=backbone, transformer=tiny_transformer_params(is_causal=False),
                  noise_scheduler=NoiseSchedulerParams(num_timesteps=10, clamp_range=(-3.0, 3.0)),
                  use_flow_matching_scheduler=True, action_dim=sum(POLICY_ACTIONS.values()),
                  proprioception_dim=sum(POLICY_PROPRIO.values()))
    values.update(overrides)
    return DiffusionPolicyParams(**values)


def save_tiny_policy(model, path: Path, processor: str) -> Path:
    from vla_foundry.robotics.experiment import normalizer_block, save_policy_experiment

    normalizer = normalizer_block(list(POLICY_PROPRIO) + list(POLICY_ACTIONS), past=1, future=2)
    save_policy_experiment(model, path, tiny_policy_io(processor), tiny_policy_stats(), normalizer)
    return path


def _diffusion_policy(path: Path, tokenizer) -> Path:
    """A flow-matching policy on a tiny ``clip_backbone`` (the CLIP directory doubles as the processor)."""
    from vla_foundry.demo.hf_models import build_tiny_clip
    from vla_foundry.params.clip import ClipBackboneParams

    build_tiny_clip(path / "clip", tokenizer, max_text_length=64)  # room for 4 "<image>" placeholders
    model = tiny_model(tiny_policy_params(ClipBackboneParams(hf_pretrained=str(path / "clip"))))
    model.params = tiny_policy_params(ClipBackboneParams(hf_pretrained="clip"))  # relative to the experiment
    return save_tiny_policy(model, path, processor="clip")


def vlm_foundry_policy(path: Path, tokenizer, seed: int = 0):
    """A flow-matching policy on a ``vlm_foundry_backbone`` (spec §8.4), saved: our tiny ``vlm`` (a 16 px ViT with
    8 px patches, no shuffle: 4 tokens per image) read at its last 2 layers, behind a tiny Idefics3 (SmolVLM)
    processor that makes 32 px images (so the backbone resizes them) and 4 ``<image>`` tokens each. Returns the
    model (random weights) with its params as saved."""
    from transformers import AutoProcessor

    from vla_foundry.demo.hf_models import IDEFICS3_IMAGE_SEQ_LEN, build_tiny_idefics3
    from vla_foundry.params.clip import VLMFoundryBackboneParams
    from vla_foundry.params.vision import ViTParams, VLMParams

    build_tiny_idefics3(path / "processor", tokenizer)
    hf_tokenizer = AutoProcessor.from_pretrained(path / "processor").tokenizer
    vit = ViTParams(img_size=16, patch_size=8, hidden_dim=32, inter_dim=64, n_heads=2, n_layers=2,
                    projector_pixel_shuffle_factor=1)
    assert (16 // 8) ** 2 == IDEFICS3_IMAGE_SEQ_LEN  # the processor's image tokens are the ViT's
    # A vocabulary padded past the tokenizer (as trained models often are): the action token is the row after it.
    vlm = VLMParams(vit=vit, transformer=tiny_transformer_params(vocab_size=len(hf_tokenizer) + 8, max_seq_len=128),
                    image_token_id=hf_tokenizer.convert_tokens_to_ids("<image>"))
    model = tiny_model(tiny_policy_params(VLMFoundryBackboneParams(num_vlm_layers_to_use=2, vlm=vlm)), seed)
    save_tiny_policy(model, path, processor="processor")
    return model


def vlm_hf_policy(path: Path, tokenizer, seed: int = 0, family: str = "idefics3"):
    """A flow-matching policy on a ``vlm_backbone`` (spec §8.4): a tiny HF image-text model of ``family``
    (``idefics3``, the SmolVLM architecture, or ``qwen2_vl``) read at its last 2 hidden states; its directory
    doubles as the processor. Returns the model with its params as saved."""
    from vla_foundry.demo import hf_models
    from vla_foundry.params.clip import VLMBackboneParams

    build, auto_class = {"idefics3": (hf_models.build_tiny_idefics3, "Idefics3ForConditionalGeneration"),
                         "qwen2_vl": (hf_models.build_tiny_qwen2_vl, "Qwen2VLForConditionalGeneration")}[family]
    build(path / "vlm", tokenizer)
    sharpen_hf(path / "vlm", auto_class)
    model = tiny_model(tiny_policy_params(VLMBackboneParams(hf_pretrained=str(path / "vlm"),
                                                            num_vlm_layers_to_use=2)), seed)
    model.params = tiny_policy_params(VLMBackboneParams(hf_pretrained="vlm", num_vlm_layers_to_use=2))
    save_tiny_policy(model, path, processor="vlm")
    return model


BUILDERS: dict[str, Callable[[Path, Any], Path]] = {
    "diffusion_policy": _diffusion_policy,
    "transformer": _transformer,
    "transformer_hf": _transformer_hf,
    "vlm": _vlm,
    "vlm_hf": _vlm_hf,
    "stable_diffusion": _stable_diffusion,
    "clip_hf": _clip_hf,
    "clip_openclip": _clip_openclip,
}


def build_checkpoint(model_type: str, path: Path, tokenizer: Optional[Any] = None) -> Path:
    if model_type not in BUILDERS:
        raise AssertionError(f"tests/factories.py has no tiny-checkpoint builder for registered type {model_type!r}")
    return BUILDERS[model_type](path, tokenizer)


# Example requests per type: the parametrized service tests send these to every type.
def png_data_url(seed: int = 0, size: tuple[int, int] = (24, 40)) -> str:
    """A small random RGB PNG as a data: URL."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_TEXT_PREDICT = {"prompt": ["the quick brown", "a robot"], "max_new_tokens": 5, "temperature": 0.7, "seed": 1}
_TEXT_EVALUATE = {"texts": ["the quick brown fox jumps", "shall i compare thee"], "seed": 1}
_CAPTION_PREDICT = {"images": [[png_data_url(0)], [png_data_url(1)]], "prompt": ["what is this", "a"],
                    "max_new_tokens": 5, "temperature": 0.7, "seed": 1}
_CAPTION_EVALUATE = {"images": [[png_data_url(0)], [png_data_url(1)]], "texts": ["a red block", "the quick fox"],
                     "seed": 1}
_IMAGE_PREDICT = {"prompt": "a red circle", "num_images": 2, "num_inference_steps": 3, "seed": 1}
_IMAGE_EVALUATE = {"images": [png_data_url(0), png_data_url(1)], "texts": ["a red circle", "a blue square"],
                   "seed": 1}


def policy_observation(seed: int = 0, size: tuple[int, int] = (24, 40)) -> dict:
    """An observation for the tiny policy: two frames per camera (PNG), raw proprioception [P+1][2]."""
    return {"images": {cam: [png_data_url(seed + i, size), png_data_url(seed + i + 2, size)]
                       for i, cam in enumerate(POLICY_CAMERAS)},
            "lowdim": {"arm__pos": [[0.1, 0.2], [0.3, 0.4]]}, "language_instruction": "pick up the red block"}


_POLICY_PREDICT = {"observation": policy_observation(),
                   "past_actions": {"arm__delta": [[0.5, -0.5]], "gripper": [[1.0]]},
                   "num_inference_steps": 3, "seed": 1}
_POLICY_EVALUATE = {"samples": [{"observation": policy_observation(s),
                                 "actions": {"arm__delta": [[0.1 * s, 0.2]] * 4, "gripper": [[1.0]] * 4}}
                                for s in (0, 1)], "seed": 1}
PREDICT_REQUESTS: dict[str, dict] = {
    "diffusion_policy": _POLICY_PREDICT,
    "clip_hf": {"texts": ["a red circle", "a blue square"], "images": [png_data_url(0)]},
    "clip_openclip": {"texts": ["a red circle", "a blue square"], "images": [png_data_url(0)]},
    "stable_diffusion": _IMAGE_PREDICT,
    "transformer": _TEXT_PREDICT,
    "transformer_hf": _TEXT_PREDICT,
    "vlm": _CAPTION_PREDICT,
    "vlm_hf": _CAPTION_PREDICT,
}
EVALUATE_REQUESTS: dict[str, dict] = {
    "diffusion_policy": _POLICY_EVALUATE,
    "clip_hf": {"texts": ["a red circle", "a blue square"], "images": [png_data_url(0), png_data_url(1)], "seed": 1},
    "clip_openclip": {"texts": ["a red circle", "a blue square"], "images": [png_data_url(0), png_data_url(1)],
                      "seed": 1},
    "stable_diffusion": _IMAGE_EVALUATE,
    "transformer": _TEXT_EVALUATE,
    "transformer_hf": _TEXT_EVALUATE,
    "vlm": _CAPTION_EVALUATE,
    "vlm_hf": _CAPTION_EVALUATE,
}
