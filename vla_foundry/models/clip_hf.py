"""``clip_hf``: a ``transformers.CLIPModel`` wrapper (format spec §7), keys ``model.<CLIPModel keys>``.

Used as the text encoder of ``stable_diffusion`` (§11.3: the text tower's
``last_hidden_state``, on ids padded to a fixed length, no attention mask) and as a
contrastive encoder (``forward``: normalized, projected text and image embeddings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vla_foundry.errors import CheckpointError, InvalidInputError
from vla_foundry.models.registry import register_model
from vla_foundry.params.clip import ClipHFParams


def missing_clip_error(hf_pretrained: str, error: OSError) -> CheckpointError:
    """``hf_pretrained`` found neither as a folder nor in the Hugging Face cache: name both and the fix."""
    path = Path(hf_pretrained)
    if path.is_dir():
        where = f"the folder {path.resolve()} has no usable CLIP config.json"
    else:
        # A relative path was tried in the experiment directory first (checkpoint.resolve_local_paths).
        folders = str(path) if path.is_absolute() else f"<experiment directory>/{path} nor {path.resolve()}"
        where = f"there is no folder {folders}, and no such model in the Hugging Face cache/Hub"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(
        f"clip hf_pretrained {hf_pretrained!r} cannot be loaded: {where} ({reason}). Publish the CLIP folder "
        f"(config.json and tokenizer files) as {hf_pretrained!r} inside the experiment directory, or set "
        "hf_pretrained to an absolute folder or to a Hub id that is in the local cache.")


def l2normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@register_model("clip_hf")
class ClipHF(nn.Module):
    modality = "encoder"

    def __init__(self, params: ClipHFParams, load_pretrained: bool = True):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        if not params.hf_pretrained:
            raise ValueError("clip_hf needs `hf_pretrained`: a local CLIP directory (config.json, tokenizer)")
        self.params = params
        try:
            if load_pretrained:
                self.model = CLIPModel.from_pretrained(params.hf_pretrained, dtype=torch.float32)
            else:  # random init: the checkpoint holds every weight (spec §7)
                self.model = CLIPModel(CLIPConfig.from_pretrained(params.hf_pretrained))
        except OSError as e:  # HF's own text blames the network even when a local folder is what is missing
            raise missing_clip_error(params.hf_pretrained, e) from e
        # Loaded now, while the server builds models one at a time (transformers' lazy imports race).
        self._tokenizer: Any = self._load_tokenizer()

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.params.hf_pretrained)
        except (OSError, ValueError) as e:
            raise ValueError(f"clip_hf: no tokenizer in {self.params.hf_pretrained!r} ({e})") from e

    @property
    def tokenizer(self):
        """The CLIP tokenizer of ``hf_pretrained``."""
        return self._tokenizer

    @property
    def max_text_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def text_hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def tokenize(self, texts: list[str], max_length: int, field: str = "prompt", with_mask: bool = False):
        """Ids padded to ``max_length`` (B, max_length); ``with_mask``: (ids, attention mask), the mask 1 over each
        text's own tokens (the pad id may be a token of the text, e.g. CLIP's end of text). Longer texts are
        refused, not silently truncated."""
        max_length = min(max_length, self.max_text_length)
        ids = [self.tokenizer(t)["input_ids"] for t in texts]
        for i, row in enumerate(ids):
            if len(row) > max_length:
                name = field if len(texts) == 1 else f"{field}[{i}]"
                raise InvalidInputError(f"{name} is {len(row)} tokens long (with start/end tokens); this model's text "
                                        f"encoder takes at most {max_length}; shorten it", field=field)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        padded = torch.tensor([row + [pad] * (max_length - len(row)) for row in ids], dtype=torch.long)
        if not with_mask:
            return padded
        return padded, torch.tensor([[1] * len(row) + [0] * (max_length - len(row)) for row in ids], dtype=torch.long)

    @property
    def image_processor(self):
        """The CLIP image processor of ``hf_pretrained`` (resize, crop, normalize; loaded on first use)."""
        if getattr(self, "_image_processor", None) is None:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(self.params.hf_pretrained)
        return self._image_processor

    @property
    def embedding_dim(self) -> int:
        return self.model.config.projection_dim

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings (B, Pd) through §7's forward (pooled at each text's first eos, so the
        padding after it changes nothing)."""
        return self.embed_token_ids(self.tokenize(list(texts), self.max_text_length, field="texts"))

    def embed_token_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unit-length text embeddings (B, Pd) of ``tokenize``'s ids."""
        return l2normalize(self.text_embeddings(input_ids))

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self(input_ids=input_ids.to(self.model.device))["text_embeds"]

    def pixel_values(self, images: list) -> torch.Tensor:
        """(H, W, 3) uint8 arrays → (B, 3, h, w) as the CLIP image processor prepares them. Channels last, said
        so: the processor would otherwise guess, and read an image 1, 3 or 4 pixels tall as channels first."""
        return self.image_processor(images=list(images), return_tensors="pt",
                                    input_data_format="channels_last")["pixel_values"]

    def embed_images(self, images: list) -> torch.Tensor:
        """Unit-length image embeddings (B, Pd)."""
        weight = next(self.parameters())
        pixels = self.pixel_values(images).to(weight.device, weight.dtype)
        return self(pixel_values=pixels)["image_embeds"][:, 0]

    def text_hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                           ) -> torch.Tensor:
        """The text tower's ``last_hidden_state`` (B, S, Ht): sampling gives no attention mask (spec §11.3), the
        training loss gives the tokenizer's (as VLA Foundry's training forward does)."""
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.model.device)
        return self.model.text_model(input_ids=input_ids.to(self.model.device),
                                     attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, attention_mask_images=None):
        """Spec §7: text_embeds = text_projection(l2normalize(pooled)); image_embeds = l2normalize(projection)."""
        out = {}
        if input_ids is not None:
            if input_ids.shape[1] > self.max_text_length:
                raise ValueError(f"text length {input_ids.shape[1]} > max_position_embeddings {self.max_text_length}")
            pooled = self.model.text_model(input_ids=input_ids).pooler_output  # no attention mask (B14)
            out["text_embeds"] = self.model.text_projection(l2normalize(pooled))
        if pixel_values is not None:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be 4-D (B·N, 3, h, w); got {tuple(pixel_values.shape)}")
            B = input_ids.shape[0] if input_ids is not None else pixel_values.shape[0]
            pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
            image = l2normalize(self.model.visual_projection(pooled).view(B, -1, self.model.config.projection_dim))
            if attention_mask_images is not None:
                image = image * attention_mask_images[..., None].to(image.dtype)
            out["image_embeds"] = image
        return out
