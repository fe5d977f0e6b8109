"""``vlm``: VLA Foundry's captioning model — ViT, pixel-shuffle projector, language model (format spec §6).

Reads top to bottom: the projector, then the model with ``forward`` and ``generate``.
Shapes: B batch, N cameras, P patches, D vision width, s shuffle factor, T tokens,
H language-model width, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from vla_foundry.generation import batch_prompt, sample_loop
from vla_foundry.models.registry import create_model, register_model
from vla_foundry.models.vit import ViT
from vla_foundry.models.vit_hf import ViTHF
from vla_foundry.params.vision import VLMParams


VISION_TOWERS = {"vit": ViT, "vit_hf": ViTHF}  # the `vit` block's type: ours (§5), or a timm model


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """Space-to-depth by ``s`` over the patch grid: (B, P, D) → (B, P/s², D·s²); (B, N, P, D) → (B, N·P/s², D·s²).

    Output token (bi, bj) concatenates the patches (bi·s + di, bj·s + dj) with di outer, so
    channel = (di·s + dj)·D + c (spec §6). Cameras are concatenated camera-major.
    """
    if x.dim() == 4:
        B, N, P, D = x.shape
        return pixel_shuffle(x.reshape(B * N, P, D), s).reshape(B, -1, D * s * s)
    if s == 1:
        return x  # also for a non-square P
    B, P, D = x.shape
    G = math.isqrt(P)
    if G * G != P or G % s:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by {s}; got {P} patches")
    x = x.view(B, G // s, s, G // s, s, D)  # (B, bi, di, bj, dj, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, bi, bj, di, dj, D)
    return x.reshape(B, (G // s) ** 2, s * s * D)


class Projection(nn.Module):
    def __init__(self, vision_dim: int, shuffle: int, lm_dim: int):
        super().__init__()
        self.shuffle = shuffle
        self.proj = nn.Linear(vision_dim * shuffle * shuffle, lm_dim, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (B[, N], P, D)
        return self.proj(pixel_shuffle(patches, self.shuffle))  # (B, N·P/s², H)


@register_model("vlm")
class VLM(nn.Module):
    modality = "caption"

    def __init__(self, params: VLMParams, load_pretrained: bool = True):
        super().__init__()
        self.params = params
        if params.vit.type not in VISION_TOWERS:
            raise ValueError(f"vlm vision tower type {params.vit.type!r} is unknown; one of "
                             f"{', '.join(VISION_TOWERS)} (check `vit.type` in config_model.yaml)")
        if params.image_token_id is None:
            raise ValueError("vlm config needs image_token_id (the placeholder id image embeddings replace)")
        self.vit = VISION_TOWERS[params.vit.type](params.vit)
        self.transformer = create_model(params.transformer, load_pretrained=load_pretrained)
        s = params.vit.projector_pixel_shuffle_factor
        if s > 1 and (not self.vit.patches_per_side or self.vit.patches_per_side % s):
            raise ValueError(f"the vit's {self.vit.tokens} tokens per image must form a square grid whose side is "
                             f"divisible by projector_pixel_shuffle_factor ({s}); a tower with class or register "
                             "tokens takes only factor 1")
        self.projection = Projection(params.vit.hidden_dim, s, self.transformer.hidden_size)

    # ------------------------------------------------------------------ what a client needs

    @property
    def image_token_id(self) -> int:
        return self.params.image_token_id

    @property
    def image_size(self) -> int:
        return self.vit.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.vit.tokens // self.params.vit.projector_pixel_shuffle_factor ** 2

    @property
    def vocab_size(self) -> int:
        return self.transformer.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.transformer.max_seq_len

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
              image_columns: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with the image embeddings scattered into the placeholder positions. (B, T, H)

        ``image_columns`` limits placeholders to the first columns (the prompt): a generated id
        that equals ``image_token_id`` is then a normal token (the fix for reference bug B2).
        ``attention_mask`` (B, T) limits them to real tokens: padding is never a placeholder, even where
        the pad id is ``image_token_id`` (0 for the debug processor, spec §13 B15).
        """
        if pixel_values is None:
            return self.transformer.embed_tokens(input_ids)
        img = self.projection(self.vit(pixel_values))  # (B, n_tok, H)
        is_img = input_ids == self.image_token_id  # (B, T)
        if image_columns is not None:
            is_img[:, image_columns:] = False
        if attention_mask is not None:
            is_img &= attention_mask.bool()
        emb = self.transformer.embed_tokens(input_ids.masked_fill(is_img, 0))  # placeholders look up row 0
        if int(is_img.sum()) != img.shape[0] * img.shape[1]:
            raise ValueError(f"the prompt has {int(is_img.sum())} image placeholders (id {self.image_token_id}) but "
                             f"the images give {img.shape[0] * img.shape[1]} embeddings "
                             f"({self.tokens_per_image} per image)")
        emb[is_img] = img.reshape(-1, img.shape[-1]).to(emb.dtype)  # row-major (batch, position) order
        return emb

    def forward(self, input_ids, pixel_values=None, attention_mask=None, output_hidden_states=False,
                use_cache=False, past_key_values=None):
        emb = self.embed(input_ids, pixel_values, attention_mask=attention_mask)
        return self.transformer(inputs_embeds=emb, attention_mask=attention_mask, past_key_values=past_key_values,
                                output_hidden_states=output_hidden_states, use_cache=use_cache)

    # ------------------------------------------------------------------ continuous batching (continuous.py)

    def prefill(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None):
        """One prompt (1, T) and its images as ``generate``'s first step runs them: next-token logits (1, V) and the
        language model's cache; later tokens are the language model's alone."""
        emb = self.embed(input_ids, pixel_values, image_columns=input_ids.shape[1])
        out = self.transformer(inputs_embeds=emb, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def step_alone(self, input_ids: torch.Tensor, cache):
        """One sequence's next token on its own cache: the language model's step (see ``Transformer.step_alone``)."""
        return self.transformer.step_alone(input_ids, cache)

    def slot_bytes(self) -> int:
        """The cache memory of one sequence's slot: the language model's."""
        return self.transformer.slot_bytes()

    def slot_decoder(self, num_slots: int, graphs: bool = False):
        """Decode steps of the language model for ``num_slots`` sequences at once (kv_slots.py)."""
        return self.transformer.slot_decoder(num_slots, graphs)

    # ------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=20, temperature=1.0, top_p=0.9,
                 top_k=50, eos_token_id=None, use_cache=True, *, generator: Optional[torch.Generator] = None,
                 stopping: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Prompt + new ids, (B, T + n). The first step is the multimodal forward (spec §6).

        With the cache, later steps feed the new token to the language model alone. Without
        it, every step re-runs the multimodal forward, merging images at the prompt's
        placeholders only.
        """
        input_ids, attention_mask = batch_prompt(input_ids, attention_mask)
        prompt_len = input_ids.shape[1]
        past = None

        def step(generated, mask):
            nonlocal past
            if use_cache and past is not None:
                out = self.transformer(input_ids=generated[:, -1:], attention_mask=mask, past_key_values=past,
                                       use_cache=True)
            else:
                emb = self.embed(generated, pixel_values, image_columns=prompt_len, attention_mask=mask)
                out = self.transformer(inputs_embeds=emb, attention_mask=mask, use_cache=use_cache)
            past = out.past_key_values if use_cache else None
            return out.logits[:, -1]  # (B, V)

        return sample_loop(step, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                           stopping=stopping)
