"""Policy backbones that run a whole vision-language model (format spec §8.4): ``vlm_foundry_backbone`` (our
``vlm``) and ``vlm_backbone`` (a Hugging Face image-text model).

Both read the VLM at one extra token. Training appended one row to the VLM's vocabulary (the "action token",
id = the old vocabulary size V; the embedding table and the output head both have V+1 rows in the checkpoint),
and every prompt gets that token, with mask 1, after whatever the processor made of it. The conditioning is
the action token's hidden state in each of the last k = ``num_vlm_layers_to_use`` layers, concatenated oldest
first: one token (B, 1, k·H).

Shapes: B batch, N images per sample, L prompt tokens (image placeholders included), H the language model's
width.

Batching. VLA Foundry's policy server runs one observation at a time, so a prompt there has no padding. In a
batch the processor pads the shorter prompts, and appended after the padding the action token would sit at
another position (and our own causal model would attend to the pads: spec §4.3 ignores its mask without a
cache). So each row's action token goes right after the row's own tokens, the padding after it
(``place_action_token``): a causal model then reads it exactly as it reads the prompt alone, and a batch of
robots with different instructions is one call. A model whose prompt attends both ways (PaliGemma's prefix)
runs as groups of equally long prompts with the padding taken out instead (``by_prompt_length``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vla_foundry.errors import InvalidInputError
from vla_foundry.models.backbones import register_backbone
from vla_foundry.models.vlm import VLM
from vla_foundry.models.vlm_hf import VLMHF
from vla_foundry.robotics.processor import HFProcessorLoading, InputProcessor, hf_vlm_processor

INSTRUCTION_FIELD = "observation.language_instruction"


def append_action_token(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], token_id: int
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, L) → (B, L+1): the action token after the last column, mask 1 there."""
    column = input_ids.new_full((input_ids.shape[0], 1), token_id)
    ids = torch.cat([input_ids, column], dim=1)
    if attention_mask is None:
        return ids, None
    return ids, torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)


# Per-token processor outputs that must cover the action token too: newer transformers' multimodal processors
# (Qwen-VL, Gemma 3, …) mark each token as text (0) or image; the action token is text, as it was to the
# transformers that trained these policies, which had no such input.
TOKEN_TYPE_INPUTS = ("mm_token_type_ids",)


def append_to_token_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` with a text column (0) after each per-token type row (see ``TOKEN_TYPE_INPUTS``)."""
    return {name: torch.cat([t, t.new_zeros((t.shape[0], 1))], dim=1) if name in TOKEN_TYPE_INPUTS else t
            for name, t in inputs.items()}


def place_action_token(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], token_id: int,
                       inputs: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Each row's own tokens first, in order (wherever the processor padded), then the action token, then the
    padding: (B, L+1) ids and mask, the action token's column per row (B,), and ``inputs`` with their per-token
    type rows laid out alike. A causal model reads each row's action token at the row's own length, after its own
    tokens only, as it reads it alone."""
    B, L = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (B, L): own tokens first
    positions = keep.sum(dim=1)  # (B,): where each row's action token goes
    rows = torch.arange(B, device=input_ids.device)

    def laid_out(t: torch.Tensor, value: int) -> torch.Tensor:
        out = torch.cat([t.gather(1, order), t.new_full((B, 1), value)], dim=1)  # (B, L+1)
        out[rows, positions] = value
        return out

    ids = laid_out(input_ids, token_id)  # (the column after a shorter row's padding holds one too: never read)
    mask = (torch.arange(L + 1, device=input_ids.device)[None] <= positions[:, None]).long()
    inputs = {name: laid_out(t, 0) if name in TOKEN_TYPE_INPUTS else t for name, t in inputs.items()}
    return ids, mask, positions, inputs


def read_action_token(hidden_states: tuple[torch.Tensor, ...], k: int, positions: torch.Tensor) -> torch.Tensor:
    """Each row's action-token column (``positions``, (B,)) of the last ``k`` hidden states (B, T, H), oldest
    first → (B, 1, k·H)."""
    rows = torch.arange(positions.shape[0], device=positions.device)
    return torch.cat([h[rows, positions] for h in hidden_states[-k:]], dim=-1)[:, None]


def _rows(t: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, batch: int,
          patches: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A group's share of one processor output: per token (B, L, …) without the padding, per sample (B, …), per
    image (B·n, …: every sample has as many images, the policy's image names), or per patch (Qwen-VL's flattened
    pixels: ``patches`` holds each sample's patch count, from its ``image_grid_thw``)."""
    n, length = len(rows), int(keep[rows[0]].sum())
    if t.dim() >= 2 and t.shape[:2] == keep.shape:
        return t[rows][keep[rows]].view(n, length, *t.shape[2:])
    if patches is not None and t.shape[0] == int(patches.sum()) != batch:
        starts = torch.cumsum(patches, 0) - patches
        return torch.cat([t[int(starts[r]):int(starts[r] + patches[r])] for r in rows.tolist()])
    if t.shape[0] == batch:
        return t[rows]
    if t.shape[0] % batch == 0:
        per = t.shape[0] // batch
        return t[(rows[:, None] * per + torch.arange(per, device=rows.device)).flatten()]
    raise ValueError(f"a processor output of shape {tuple(t.shape)} does not split over a batch of {batch}")


def by_prompt_length(encode: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``encode(input_ids, attention_mask, **inputs)`` run per group of samples with equally many prompt tokens,
    the padding taken out, as each sample runs alone; the groups' tokens (B, C, Dc) back in batch order."""
    if attention_mask is None or bool(attention_mask.all()):
        return encode(input_ids, attention_mask, **inputs)
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    batch = input_ids.shape[0]
    grid = inputs.get("image_grid_thw")  # (B·n, 3): each image's patch grid, where pixels come flattened
    patches = None if grid is None else grid.prod(-1).view(batch, -1).sum(-1)  # per sample
    out: Optional[torch.Tensor] = None
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().flatten()
        ids = _rows(input_ids, rows, keep, batch)
        tokens = encode(ids, torch.ones_like(ids), **{name: _rows(t, rows, keep, batch, patches)
                                                      for name, t in inputs.items()})
        if out is None:
            out = tokens.new_empty((input_ids.shape[0], *tokens.shape[1:]))
        out[rows] = tokens
    return out


def _check_layers(k: int, available: int, kind: str) -> None:
    if not 1 <= k <= available:
        raise ValueError(f"{kind}: num_vlm_layers_to_use must be 1…{available} (the VLM's hidden states); got {k}; "
                         "check `vision_language_backbone.num_vlm_layers_to_use` in config_model.yaml")


class _VLMBackbone(nn.Module, ABC):
    """What both backbones share: the action token, the read-out, the processor, batching."""

    uses_language = True
    # Not inside a sampling graph (policy_graphs.py): the VLMs branch on their inputs' values (our vlm counts its
    # image placeholders, Qwen-VL reads its positions out of the mask), which a trace would freeze. The backbone
    # runs eagerly, and the denoising steps replay from the graph that starts at its tokens.
    traceable = False
    max_text_length = None  # the processor lays out the prompt with its images; the model's context is checked
    action_token_id: int
    hidden_size: int
    context: int  # the longest sequence the language model takes, the action token included
    causal: bool  # the language model attends to earlier tokens only

    @property
    def output_dim(self) -> int:
        return self.params.num_vlm_layers_to_use * self.hidden_size

    def input_processor(self, processor: Optional[str], image_size: Optional[int] = None,
                        processor_kwargs: Optional[dict] = None,
                        loading: HFProcessorLoading = HFProcessorLoading()) -> InputProcessor:
        if processor in (None, "", "none", "simple_vlm"):
            raise ValueError(
                f"{self.params.type}: the data config's processor is {processor!r}; this backbone needs the HF "
                "processor it was trained with (images and prompt laid out together, spec §8.4), as a directory in "
                "the experiment (config_processor.yaml `processor:`). VLA Foundry's 'simple_vlm' is not served: it "
                "loads its tokenizer from the hub, and its training and inference scale pixels differently")
        return hf_vlm_processor(processor, processor_kwargs, loading)

    def forward(self, input_ids, pixel_values, attention_mask=None, attention_mask_images=None, **image_inputs
                ) -> torch.Tensor:
        """Tokens (B, 1, k·H). ``image_inputs``: the processor's other outputs (``pixel_attention_mask``,
        ``image_grid_thw``, …), passed on as the reference passes them."""
        if input_ids.shape[1] + 1 > self.context:
            raise InvalidInputError(f"{INSTRUCTION_FIELD}: the prompt with its images is {input_ids.shape[1]} tokens; "
                                    f"this policy's VLM takes at most {self.context - 1} (and its action token); "
                                    "shorten the instruction", field=INSTRUCTION_FIELD)
        inputs = {"pixel_values": pixel_values, **image_inputs}
        if self.causal and "token_type_ids" not in inputs:
            # One call for the whole batch: each row's action token right after its own tokens (see
            # ``place_action_token``). PaliGemma's token types make its prompt attend both ways: it is grouped.
            ids, mask, positions, inputs = place_action_token(input_ids, attention_mask, self.action_token_id, inputs)
            return self._run(ids, mask, positions, **inputs)
        return by_prompt_length(self._encode_alike, input_ids, attention_mask, inputs)

    def _encode_alike(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        """Rows of one length (no padding): the action token after the last column, as VLA Foundry appends it."""
        ids, mask = append_action_token(input_ids, attention_mask, self.action_token_id)
        positions = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        return self._run(ids, mask, positions, **append_to_token_inputs(inputs))

    @abstractmethod
    def _run(self, ids, mask, positions, pixel_values, **image_inputs) -> torch.Tensor:
        """The VLM on laid-out ids (action tokens in place) → the tokens (B, 1, k·H) read at ``positions``; each
        backbone below runs its own model."""


@register_backbone("vlm_foundry_backbone")
class VLMFoundryBackbone(_VLMBackbone):
    """Our ``vlm`` (§6) with the action row appended; keys ``vision_language_backbone._model.<vlm keys>``.

    Its config is the source VLM's (``params.vlm``, from ``vlm_config_model.yaml``); its weights come from the
    policy's checkpoint. Pixel values that are not the ViT's size are resized bilinearly to it (the processor
    may make larger tiles), and per-sample stacks (B, N, 3, h, w) flattened to (B·N, 3, h, w).
    """

    def __init__(self, params, load_pretrained: bool = True):
        super().__init__()
        vlm = params.vlm
        if vlm is None:
            raise ValueError("vlm_foundry_backbone needs the source VLM's model config (vlm_config_model.yaml beside "
                             "the policy's config)")
        if vlm.type != "vlm" or vlm.transformer.type != "transformer":
            raise ValueError(f"vlm_foundry_backbone: the source VLM is {vlm.type!r} with a "
                             f"{vlm.transformer.type!r} language model; served: 'vlm' with VLA Foundry's own "
                             "'transformer'")
        self.params = params
        self.action_token_id = vlm.transformer.vocab_size  # V: the row training appended
        widened = dataclasses.replace(vlm.transformer, vocab_size=vlm.transformer.vocab_size + 1)
        # Never the source VLM's own weights: the policy's checkpoint holds them all, the action row included.
        self._model = VLM(dataclasses.replace(vlm, transformer=widened), load_pretrained=False)
        self.hidden_size = self._model.transformer.hidden_size
        self.context = self._model.max_seq_len
        self.causal = bool(vlm.transformer.is_causal)
        _check_layers(params.num_vlm_layers_to_use, vlm.transformer.n_layers, "vlm_foundry_backbone")

    def _run(self, ids, mask, positions, pixel_values, **image_inputs) -> torch.Tensor:
        size = self._model.image_size
        pixels = pixel_values.flatten(0, pixel_values.dim() - 4)  # (B·N, 3, h, w)
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear",
                                   align_corners=False).to(pixel_values.dtype)
        # Our VLM reads no other processor output (a tile mask, say): its images fill the placeholders in order.
        out = self._model(ids, pixels, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return read_action_token(out.hidden_states, self.params.num_vlm_layers_to_use, positions)  # (B, 1, k·H)


# HF families whose forward takes each sample's images as (B, N, 3, h, w) (the reference reshapes them so).
STACKED_IMAGE_FAMILIES = ("smolvlm", "idefics2", "idefics3")


@register_backbone("vlm_backbone")
class VLMHFBackbone(_VLMBackbone):
    """An HF image-text-to-text model with the action row appended; keys
    ``vision_language_backbone._model.model.<HF keys>``. Hidden states are HF's: the embeddings' output, then one
    per layer (HF's last one comes after the final norm)."""

    def __init__(self, params, load_pretrained: bool = True):
        super().__init__()
        self.params = params
        self._model = VLMHF(params, load_pretrained=load_pretrained)
        hf = self._model.model
        rows = hf.get_input_embeddings().num_embeddings
        hf.resize_token_embeddings(rows + 1, mean_resizing=False)  # the output head grows with it
        with torch.no_grad():  # as VLA Foundry initialises the row (a checkpoint overwrites it)
            table = hf.get_input_embeddings().weight
            table[-1] = table[:-1].mean(dim=0)
        self.action_token_id = rows
        self.family = hf.config.model_type.lower()
        text = hf.config.get_text_config()
        self.hidden_size = text.hidden_size
        self.context = self._model.max_seq_len
        # One call for every prompt length: HF applies the attention mask, so the padding after each row's action
        # token is never read, causal model or not (a two-way prefix is told by token_type_ids, see forward).
        self.causal = True
        _check_layers(params.num_vlm_layers_to_use, text.num_hidden_layers + 1, "vlm_backbone")

    def _run(self, ids, mask, positions, pixel_values, **image_inputs) -> torch.Tensor:
        if self.family in STACKED_IMAGE_FAMILIES and pixel_values.dim() == 4:
            pixel_values = pixel_values.view(ids.shape[0], -1, *pixel_values.shape[1:])
        if "qwen" in self.family:  # (VLA Foundry's own check)
            grid = image_inputs.get("image_grid_thw")
            if grid is None or int(grid.prod(-1).sum()) != pixel_values.shape[0]:
                raise ValueError(f"vlm_backbone: a {self.family} model needs its processor's image_grid_thw, one "
                                 "patch grid per image covering the pixel values")
        out = self._model.model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask,
                                output_hidden_states=True, use_cache=False, return_dict=True, **image_inputs)
        return read_action_token(out.hidden_states, self.params.num_vlm_layers_to_use, positions)  # (B, 1, k·H)
