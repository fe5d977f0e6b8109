"""Demo members ``demo-transformer_hf`` and ``demo-vlm_hf``: tiny Hugging Face models with random weights.

They show the HF wrappers' path end to end (an experiment whose ``hf_pretrained`` is a
local HF directory beside it, loaded offline); their output is noise, and ``demo.json``
(shown in ``GET /models``) says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from vla_foundry.checkpoint import save_experiment
from vla_foundry.demo import transformer as transformer_demo
from vla_foundry.demo import vlm as vlm_demo
from vla_foundry.demo.hf_models import build_tiny_causal_lm, build_tiny_idefics3
from vla_foundry.models.registry import create_model
from vla_foundry.params.transformer import TransformerHFParams
from vla_foundry.params.vision import VLMHFParams

HF_DIR = "hf_model"  # relative to the experiment, so the member can be moved


def _save_member(experiment_dir: Path, params, description: str) -> None:
    model = create_model(params, load_pretrained=True)
    model.params = type(params)(hf_pretrained=HF_DIR)  # written relative; resolved at load time
    save_experiment(model, experiment_dir, checkpoint_num=1, training_config={"name": experiment_dir.name})
    (experiment_dir / "demo.json").write_text(json.dumps({"description": description, "random_weights": True},
                                                         indent=2))


def build_transformer_hf(experiment_dir: Path, progress: bool = True) -> None:
    tokenizer = transformer_demo.train_tokenizer(transformer_demo.corpus_documents())
    hf_dir = build_tiny_causal_lm(experiment_dir / HF_DIR, tokenizer, family="llama")
    _save_member(experiment_dir, TransformerHFParams(hf_pretrained=str(hf_dir)),
                 "A tiny Llama (2 layers, width 32) with RANDOM weights, saved in Hugging Face format: it shows the "
                 "transformer_hf path (and chat through its template); its text is noise.")


def build_vlm_hf(experiment_dir: Path, progress: bool = True) -> None:
    hf_dir = build_tiny_idefics3(experiment_dir / HF_DIR, vlm_demo.train_tokenizer())
    _save_member(experiment_dir, VLMHFParams(hf_pretrained=str(hf_dir)),
                 "A tiny Idefics3 (SmolVLM architecture) with RANDOM weights, saved in Hugging Face format: it shows "
                 "the vlm_hf path (images, chat template, processor); its captions are noise.")
