"""Embeddings (and the contrastive loss) for the ``encoder`` modality: ``clip_hf``.

An encoder model provides ``embed_texts(texts)``, ``embed_token_ids(ids)`` and ``embed_images(images)``
(unit-length (B, D) embeddings; ids as ``tokenize`` gives them, images as (H, W, 3) uint8 arrays),
``tokenize`` and ``pixel_values``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from vla_foundry.errors import InvalidInputError
from vla_foundry.models.registry import create_batch_handler
from vla_foundry.pipelines.base import Pipeline, register_pipeline
from vla_foundry.pipelines.text import make_generator, new_seed


@dataclass
class EncoderInputs:
    """One request's texts (tokenized: ``ids`` (B, L), padded to the encoder's full length) and images, checked."""

    texts: Optional[Sequence[str]]
    ids: Optional[torch.Tensor]
    images: Optional[Sequence[np.ndarray]]


@register_pipeline("encoder")
class EncoderPipeline(Pipeline):
    max_rows_per_call = 64  # batched requests' texts (and images) go through their tower this many at a time
    def __init__(self, model):
        super().__init__(model)
        self.batch_handler = create_batch_handler(model.params.type)

    def io(self) -> dict[str, Any]:
        return {"embedding_dim": self.model.embedding_dim, "max_text_tokens": self.model.max_text_length,
                "accepts": ["texts", "images"]}

    def warmup(self, max_batch_size: int = 1) -> None:
        self.embed(texts=["a photo"], images=[np.zeros((32, 32, 3), dtype=np.uint8)])

    def check(self, texts: Optional[Sequence[str]] = None, images: Optional[Sequence[np.ndarray]] = None,
              token_ids: Optional[torch.Tensor] = None) -> EncoderInputs:
        """Refuse what ``embed`` would refuse (nothing to embed, a text over the encoder's length), cheaply; the
        request's inputs, its texts tokenized (``token_ids``: their ids from an earlier check, not made again)."""
        if not texts and not images:
            raise InvalidInputError("send `texts`, `images` or both", field="texts")
        if texts and token_ids is None:
            token_ids = self.model.tokenize(list(texts), self.model.max_text_length, field="texts")
        return EncoderInputs(texts, token_ids if texts else None, images)

    @torch.inference_mode()
    def embed(self, texts: Optional[Sequence[str]] = None, images: Optional[Sequence[np.ndarray]] = None
              ) -> dict[str, Any]:
        """Unit-length embeddings of ``texts`` and/or ``images``; with both, their cosine similarities too."""
        return self.embed_each([self.check(texts, images)])[0]

    @torch.inference_mode()
    def embed_each(self, requests: Sequence[Union[EncoderInputs, tuple]]) -> list[dict[str, Any]]:
        """``embed`` for several requests (each ``check``'s inputs, or a (texts, images) pair, checked here): all
        their texts in one text-tower call, all their images in one image-tower call. Texts are padded to the
        encoder's full length and images embedded one per row, so a request's embeddings do not depend on its
        neighbours (a batch with a refused request fails as a whole)."""
        inputs = [r if isinstance(r, EncoderInputs) else self.check(*r) for r in requests]
        ids = [r.ids for r in inputs if r.ids is not None]
        all_images = [im for r in inputs for im in r.images or []]
        text_embeds = self._in_chunks(self.model.embed_token_ids, torch.cat(ids) if ids else None)
        image_embeds = self._in_chunks(self.model.embed_images, all_images)
        results, t0, i0 = [], 0, 0
        for r in inputs:
            out: dict[str, Any] = {}
            if r.texts:
                out["text_embeds"] = text_embeds[t0:t0 + len(r.texts)]
                t0 += len(r.texts)
            if r.images:
                out["image_embeds"] = image_embeds[i0:i0 + len(r.images)]
                i0 += len(r.images)
            if r.texts and r.images:
                out["similarity"] = out["text_embeds"] @ out["image_embeds"].T  # (texts, images)
            results.append({k: v.numpy() for k, v in out.items()})
        return results

    def _in_chunks(self, embed, rows: Union[list, torch.Tensor, None]) -> Optional[torch.Tensor]:
        """``embed(rows)`` at most ``max_rows_per_call`` rows at a time (bounded memory per model call)."""
        if rows is None or len(rows) == 0:
            return None
        n = self.max_rows_per_call
        return torch.cat([embed(rows[i:i + n]).float().cpu() for i in range(0, len(rows), n)])

    @torch.inference_mode()
    def evaluate(self, texts: Sequence[str], images: Sequence[np.ndarray], seed: Optional[int] = None) -> dict:
        if len(texts) != len(images):
            raise InvalidInputError(f"send one text per image; got {len(texts)} texts and {len(images)} images",
                                    field="texts")
        batch = {"input_ids": self.model.tokenize(list(texts), self.model.max_text_length, field="texts"),
                 "pixel_values": self.model.pixel_values(list(images))}
        seed = new_seed() if seed is None else seed
        out = self.batch_handler.compute_loss(self.model, batch, generator=make_generator(self.device, seed))
        return {**out.to_dict(), "seed": seed}
