"""Params of the language models: ``transformer`` (ours, format spec §4.1) and ``transformer_hf``."""

from dataclasses import dataclass
from typing import Optional

from vla_foundry.params.model_params import ModelParams, register_model_params


@register_model_params("transformer")
@dataclass
class TransformerParams(ModelParams):
    positive = ("hidden_dim", "n_layers", "n_heads", "vocab_size", "max_seq_len")

    hidden_dim: int = 96
    n_layers: int = 8
    n_heads: int = 4
    vocab_size: int = 50432
    max_seq_len: int = 2048
    norm_type: str = "default_layer_norm"
    norm_eps: float = 1e-5
    ffn_type: str = "swiglu"
    qk_norm: bool = False
    positional_embedding_type: str = "rotary"
    attn_name: str = "torch_attn"
    post_embed_norm: bool = False
    weight_tying: bool = False
    cast_output_to_float32: bool = False
    is_causal: bool = True


@register_model_params("transformer_hf")
@dataclass
class TransformerHFParams(ModelParams):
    # A Hugging Face causal-LM directory (or hub id, usable only with a filled HF cache).
    hf_pretrained: Optional[str] = None
