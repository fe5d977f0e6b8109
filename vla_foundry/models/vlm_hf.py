"""``vlm_hf``: any Hugging Face image-text-to-text model behind the ``vlm`` interface (format spec §1.3, B6, B8).

The reference ``generate`` is greedy without a cache and forwards sampling settings into
the HF forward (B8); this one prefills with the images, then decodes with HF's KV cache and
our sampling (one loop for every text model), seeded by an explicit generator.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from vla_foundry.generation import batch_prompt, sample_loop
from vla_foundry.models.hf_loading import HFWrapper, hf_image_token_id
from vla_foundry.models.registry import register_model
from vla_foundry.models.transformer import TransformerOutput
from vla_foundry.models.transformer_hf import hf_max_positions
from vla_foundry.params.vision import VLMHFParams


@register_model("vlm_hf")
class VLMHF(HFWrapper):
    modality = "caption"
    AUTO_CLASS = "AutoModelForImageTextToText"
    params: VLMHFParams

    @property
    def processor_source(self) -> Optional[str]:
        """Where the HF processor lives: the config's ``processor`` when given, else the model directory."""
        return self.params.processor or self.params.hf_pretrained

    @property
    def image_token_id(self) -> int:
        return hf_image_token_id(self.model.config)

    @property
    def video_token_id(self) -> Optional[int]:
        """The video placeholder of a family that also takes videos (Qwen2-VL's), which this server never sends."""
        for attribute in ("video_token_id", "video_token_index"):
            value = getattr(self.model.config, attribute, None)
            if value is not None:
                return int(value)
        return None

    @property
    def never_sampled_ids(self) -> list[int]:
        """Ids no generation may sample: the image placeholder (see ``generate``)."""
        return [self.image_token_id]

    @property
    def max_seq_len(self) -> int:
        return hf_max_positions(getattr(self.model.config, "text_config", None) or self.model.config)

    @property
    def prefix_lm(self) -> bool:
        """Its language model attends both ways over what its processor marks as the prefix (PaliGemma): only a
        caption marked as the suffix is decoded causally, so a plain next-token loss over a sequence would see the
        tokens it predicts."""
        text = getattr(self.model.config, "text_config", None) or self.model.config
        return bool(getattr(text, "use_bidirectional_attention", False))

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False,
                output_hidden_states=False, **image_inputs) -> TransformerOutput:
        """``image_inputs``: what the model's processor made of the images (``pixel_values``, and per family
        e.g. ``pixel_attention_mask`` or ``image_sizes``); none on cached decode steps."""
        return self.run_hf(past_key_values, use_cache, output_hidden_states, input_ids=input_ids,
                           attention_mask=attention_mask, **image_inputs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50,
                 eos_token_id=None, use_cache=True, *, generator: Optional[torch.Generator] = None,
                 stopping: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **image_inputs) -> torch.Tensor:
        """Prompt + new ids, (B, T + n). The image placeholder id is never sampled: HF models merge images at
        every placeholder, so a generated one would break the uncached path (reference bug B2), and a caption
        has no use for it. With that, greedy decoding is the same with and without the cache."""
        input_ids, attention_mask = batch_prompt(input_ids, attention_mask)
        past = None

        def step(generated, mask):
            nonlocal past
            if use_cache and past is not None:
                out = self(generated[:, -1:], attention_mask=mask, past_key_values=past, use_cache=True)
            else:
                out = self(generated, attention_mask=mask, use_cache=use_cache, **image_inputs)
            past = out.past_key_values
            return out.logits[:, -1]  # (B, V)

        return sample_loop(step, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                           stopping=stopping, suppress_token_ids=self.never_sampled_ids)
