"""``transformer_hf``: any Hugging Face causal LM behind the ``transformer`` interface (format spec §1.3, B6, B8).

The reference wrapper has no ``generate``; this one decodes with HF's KV cache and our
sampling (one loop for every text model), so sampling settings and seeds mean the same
as for ``transformer``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from vla_foundry.generation import LanguageModelStep, batch_prompt, sample_loop
from vla_foundry.models.hf_loading import HFWrapper, positions_from_mask
from vla_foundry.models.registry import register_model
from vla_foundry.models.transformer import TransformerOutput
from vla_foundry.params.transformer import TransformerHFParams


def hf_max_positions(config, default: int = 2048) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@register_model("transformer_hf")
class TransformerHF(HFWrapper):
    modality = "text"
    AUTO_CLASS = "AutoModelForCausalLM"
    params: TransformerHFParams

    @property
    def tokenizer_source(self) -> Optional[str]:
        """Where the tokenizer lives when the experiment brings none: the HF directory itself."""
        return self.params.hf_pretrained

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def max_seq_len(self) -> int:
        return hf_max_positions(self.model.config)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, T, H)

    def forward(self, input_ids=None, past_key_values=None, use_cache=False, attention_mask=None,
                output_hidden_states=False, is_causal=None, inputs_embeds=None) -> TransformerOutput:
        """The ``transformer`` call signature over the HF model. HF applies ``attention_mask`` with and
        without the cache (no B3 quirk), and positions follow the mask."""
        new_tokens = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        return self.run_hf(past_key_values, use_cache, output_hidden_states, input_ids=input_ids,
                           inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=positions_from_mask(attention_mask, new_tokens))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50,
                 eos_token_id=None, use_cache=True, *, generator: Optional[torch.Generator] = None,
                 stopping: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Prompt + new ids, (B, T + n), with the sampling of ``transformer.generate``."""
        input_ids, attention_mask = batch_prompt(input_ids, attention_mask)
        step = LanguageModelStep(self, use_cache)
        return sample_loop(step, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                           stopping=stopping)
