"""Prompts and images → a caption model's inputs. One processor per caption model type (same key).

``vlm`` (ours) resizes and normalizes images itself and puts exactly ``tokens_per_image``
placeholders per image before the prompt; ``vlm_hf`` hands text and images to the model's
own HF processor (chat template, image tokens, resizing). Both return the same thing: one
unpadded id row per caption, placeholders in place, and batch-first image tensors.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vla_foundry.errors import InvalidInputError
from vla_foundry.keyed_registry import KeyedRegistry
from vla_foundry.tokenizer import load_tokenizer, render_with_template

logger = logging.getLogger(__name__)

CAPTION_PROCESSORS: KeyedRegistry[type] = KeyedRegistry("caption processor")
Images = Sequence[Sequence[np.ndarray]]  # per caption, its images as (H, W, 3) uint8

# SigLIP's normalization ((x - 0.5) / 0.5), used by VLA Foundry's ViT when no processor config says otherwise.
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass
class CaptionInputs:
    ids: list[list[int]]  # per caption, unpadded, image placeholders in place
    image_inputs: dict[str, torch.Tensor]  # batch-first tensors the model's forward takes
    # The processor laid out some inputs per token (Qwen2-VL's mm_token_type_ids, PaliGemma's token_type_ids), in
    # its own padding: rows of different lengths cannot share a batch (each row is encoded and run alone).
    per_token: bool = False
    # Each row's own inputs, where the rows were encoded one at a time (inputs laid out per token, rows of
    # different lengths); ``image_inputs`` is then empty.
    rows: Optional[list[dict[str, torch.Tensor]]] = None


class CaptionProcessor(ABC):
    """The interface every caption type's processor implements (``vlm``, ``vlm_hf`` below)."""

    tokenizer: Any = None
    tokenizer_source: Optional[str] = None
    accepts_token_ids = True  # prompts may come as token ids (else text only)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @abstractmethod
    def image_inputs(self, images: Images) -> dict[str, torch.Tensor]:
        """The pixel inputs alone, for sequences whose placeholders are already in place."""

    def lays_out_per_token(self, images: Sequence[np.ndarray]) -> bool:
        """Whether it lays out inputs per token (``CaptionInputs.per_token``), which ids made elsewhere lack."""
        return False

    @abstractmethod
    def encode(self, prompts: Optional[Sequence[str]], prompt_token_ids: Optional[Sequence[Sequence[int]]],
               images: Images, *, rendered: bool = False, answers: bool = False) -> CaptionInputs:
        """``rendered``: the prompts already went through the chat template. ``answers``: the texts are
        captions to score, not prompts to continue: each row is what a caption request would send (images,
        and a chat model's generation prompt) followed by the text and eos."""

    def text_ids(self, prompts: Optional[Sequence[str]], prompt_token_ids: Optional[Sequence[Sequence[int]]],
                 images: Images, *, answers: bool = False) -> Optional[list[list[int]]]:
        """The rows' token ids as ``encode`` makes them, from the images' count alone (no pixel is read), or
        None when this processor needs the pixels to count its image tokens."""
        return None

    @abstractmethod
    def render_chat(self, messages: list[dict]) -> str:
        """A conversation (content parts ``{"type": "image"}`` / ``{"type": "text"}``) as prompt text."""

    def io(self) -> dict[str, Any]:
        return {}


def _joined(rows: list[dict[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
    """One-row processor outputs of equal length joined row after row (dimension 0: rows, images or patches, as a
    batch lays them out), or None where their names or shapes past the first dimension differ."""
    if any(row.keys() != rows[0].keys() for row in rows):
        return None
    if any(v.dim() == 0 or v.shape[1:] != rows[0][k].shape[1:] for row in rows for k, v in row.items()):
        return None
    return {k: torch.cat([row[k] for row in rows]) for k in rows[0]}


def _image_stats(experiment_dir: Path, processor_name: Optional[str]) -> tuple[tuple, tuple, str]:
    """Normalization from the training processor's config when it is here, else SigLIP's defaults."""
    candidates = [experiment_dir / "processor" / "preprocessor_config.json",
                  experiment_dir / "preprocessor_config.json"]
    for path in candidates:
        if path.is_file():
            config = json.loads(path.read_text())
            return tuple(config["image_mean"]), tuple(config["image_std"]), str(path)
    if processor_name and processor_name not in ("debug", "none"):
        try:
            from transformers import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(processor_name)
            return tuple(image_processor.image_mean), tuple(image_processor.image_std), processor_name
        except Exception as e:  # not cached here: the defaults below are SigLIP's, which VLA Foundry uses
            logger.warning("image processor %r is not available offline (%s); normalizing with mean/std 0.5",
                           processor_name, type(e).__name__)
    return DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, "default (SigLIP: mean 0.5, std 0.5)"


def _rows_of_images(images: Images) -> int:
    counts = {len(row) for row in images}
    if len(counts) > 1:
        raise InvalidInputError(f"every caption in one request needs the same number of images for this model; got "
                                f"{sorted(counts)}", field="images")
    return counts.pop()


@CAPTION_PROCESSORS.register("vlm")
class VLMCaptionProcessor(CaptionProcessor):
    """Row = [bos] + ``tokens_per_image`` placeholders per image + prompt ids. Images are resized to the
    ViT's size (bicubic) and normalized; several images per caption are the model's cameras."""

    def __init__(self, model, tokenizer: Any = None, tokenizer_source: Optional[str] = None,
                 image_mean=DEFAULT_IMAGE_MEAN, image_std=DEFAULT_IMAGE_STD, normalization_source: str = "default"):
        self.model, self.tokenizer, self.tokenizer_source = model, tokenizer, tokenizer_source
        self.mean = torch.tensor(image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(image_std, dtype=torch.float32)[:, None, None]
        self.normalization_source = normalization_source

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, training_config: dict,
                        tokenizer: Optional[str] = None) -> "VLMCaptionProcessor":
        tok, source = load_tokenizer(experiment_dir, tokenizer, training_config)
        mean, std, stats_source = _image_stats(experiment_dir, model.params.processor)
        return cls(model, tok, source, mean, std, stats_source)

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 → (3, S, S) float32, resized and normalized."""
        from PIL import Image

        size = self.model.image_size
        if image.shape[:2] != (size, size):
            image = np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0  # (3, S, S)
        return (x - self.mean) / self.std

    def encode(self, prompts, prompt_token_ids, images, *, rendered=False, answers=False) -> CaptionInputs:
        return CaptionInputs(self.text_ids(prompts, prompt_token_ids, images, answers=answers),
                             self.image_inputs(images))

    def text_ids(self, prompts, prompt_token_ids, images, *, answers=False):
        n_images = _rows_of_images(images)
        if n_images == 0:
            raise InvalidInputError("a caption needs at least one image", field="images")
        if prompt_token_ids is None:
            if self.tokenizer is None and any(prompts):
                raise InvalidInputError("this deployment has no tokenizer, so prompts must be token ids "
                                        "(`prompt_token_ids`)", field="prompt")
            prompt_token_ids = [self.tokenizer.encode(p, add_special_tokens=False) if p else [] for p in prompts]
        image_token = self.model.image_token_id
        for i, row in enumerate(prompt_token_ids):
            if image_token in row:
                raise InvalidInputError(f"prompt_token_ids[{i}] contains the image placeholder id {image_token}; "
                                        "placeholders are added for the images, send the text part only",
                                        field="prompt_token_ids")
        bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        placeholders = [image_token] * (self.model.tokens_per_image * n_images)
        return [([bos] if bos is not None else []) + placeholders + list(row)
                + ([eos] if answers and eos is not None else []) for row in prompt_token_ids]

    def image_inputs(self, images):
        n_images = _rows_of_images(images)
        pixels = torch.stack([torch.stack([self.pixels(im) for im in row]) for row in images])  # (B, N, 3, S, S)
        if n_images == 1:
            pixels = pixels[:, 0]  # (B, 3, S, S): the single-camera layout the model trained with
        return {"pixel_values": pixels}

    def render_chat(self, messages):
        # Images are placed before the text by encode(); the template sees the text parts only.
        text_only = [{**m, "content": "".join(p.get("text", "") for p in m["content"])
                      if isinstance(m["content"], list) else m["content"]} for m in messages]
        return render_with_template(self.tokenizer, text_only)

    def io(self):
        return {"image_size": self.model.image_size, "tokens_per_image": self.model.tokens_per_image,
                "image_token_id": self.model.image_token_id,
                "image_mean": self.mean.flatten().tolist(), "image_std": self.std.flatten().tolist(),
                "normalization": self.normalization_source}


@CAPTION_PROCESSORS.register("vlm_hf")
class HFCaptionProcessor(CaptionProcessor):
    """The model's own HF processor: prompts go through its chat template (when it has one) with one image
    part per image, and the processor expands the image tokens and prepares the pixels."""

    accepts_token_ids = False

    def __init__(self, model, processor: Any, source: str):
        self.model, self.processor, self.tokenizer_source = model, processor, source
        self.tokenizer = processor.tokenizer
        self._per_token: Optional[bool] = None  # known from its first encoding
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            # The processor pads a batch's rows, and refuses to without a pad token; the padding is stripped
            # (``encode``), so which token pads makes no difference.
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, training_config: dict,
                        tokenizer: Optional[str] = None) -> "HFCaptionProcessor":
        from vla_foundry.robotics.processor import HFProcessorLoading, load_hf_processor

        source = tokenizer or model.processor_source
        loading = HFProcessorLoading.from_data_config(training_config.get("data") or {})
        return cls(model, load_hf_processor(source, loading), source)

    def _render(self, prompt: str, n_images: int) -> str:
        content = [{"type": "image"}] * n_images + ([{"type": "text", "text": prompt}] if prompt else [])
        if self.has_chat_template:
            return self.render_chat([{"role": "user", "content": content}])
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return image_token * n_images + prompt

    def encode(self, prompts, prompt_token_ids, images, *, rendered=False, answers=False) -> CaptionInputs:
        from PIL import Image

        if prompt_token_ids is not None:
            raise InvalidInputError("vlm_hf deployments take text prompts (their processor places the image "
                                    "tokens); send `prompt` instead of `prompt_token_ids`", field="prompt_token_ids")
        image_token = getattr(self.processor, "image_token", None)
        video_token = getattr(self.processor, "video_token", None)  # (Qwen2-VL's: this server takes no video)
        field = "texts" if answers else "prompt"
        for i, (text, row) in enumerate(zip(prompts, images)):
            # (a rendered chat holds the ones its template placed, one per image: any more came in its text)
            if image_token and text.count(image_token) > (len(row) if rendered else 0):
                raise InvalidInputError(f"{field}[{i}] holds this model's image token {image_token!r}: its "
                                        "processor places one per image itself; leave it out of the text",
                                        field=field)
            if video_token and video_token in text:  # (else the processor's refusal would blame the images)
                raise InvalidInputError(f"{field}[{i}] holds this model's video token {video_token!r}: this server "
                                        "takes images, not videos; leave it out of the text", field=field)
        if self._per_token and len(prompts) > 1:
            # Known to lay out inputs per token: rows of different lengths run apart, so each row is encoded once by
            # itself (not in a batch first and then again alone). Rows that come out of one length need no padding:
            # their inputs joined row after row are the batch's (where they join; else the batch is encoded whole).
            alone = [self.encode([p], None, [row], rendered=rendered, answers=answers)
                     for p, row in zip(prompts, images)]
            if len({len(a.ids[0]) for a in alone}) > 1:
                return CaptionInputs([a.ids[0] for a in alone], {}, True, rows=[a.image_inputs for a in alone])
            joined = _joined([a.image_inputs for a in alone])
            if joined is not None:
                return CaptionInputs([a.ids[0] for a in alone], joined, True)
        # A prefix LM's caption goes in as the processor's ``suffix`` (PaliGemma's: it appends eos, and marks the
        # caption's tokens 1 in token_type_ids: they are decoded causally after the two-way prefix).
        suffix = answers and getattr(self.model, "prefix_lm", False)
        if suffix:  # what a caption request with no prompt sends, then the caption
            texts = [self._render("", len(row)) for row in images]
        elif answers:  # the caption is the assistant's turn after an image-only request
            eos = self.tokenizer.eos_token or ""
            texts = [self._render("", len(row)) + p + eos for p, row in zip(prompts, images)]
        else:
            texts = [p if rendered else self._render(p, len(row)) for p, row in zip(prompts, images)]
        pil = [[Image.fromarray(im) for im in row] for row in images]
        try:
            # Chat-rendered text already holds the template's special tokens (bos included): add none twice.
            out = self.processor(text=texts, images=pil if any(pil) else None, return_tensors="pt", padding=True,
                                 add_special_tokens=not (rendered or self.has_chat_template),
                                 **({"suffix": list(prompts)} if suffix else {}))
        except ValueError as e:  # e.g. image tokens in the text that do not match the images
            raise InvalidInputError(f"the model's processor refused the input: {e}", field="images") from e
        mask = out.pop("attention_mask")
        input_ids = out.pop("input_ids")
        ids = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        per_token = any(isinstance(v, torch.Tensor) and v.shape == input_ids.shape for v in out.values())
        self._per_token = per_token
        # PaliGemma's labels (a training target: the loss makes its own) and token_type_ids (a prompt's are all 0,
        # its two-way prefix; a caption's, kept, mark what it scores)
        image_inputs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)
                        and k != "labels" and (k != "token_type_ids" or suffix)}
        return CaptionInputs(ids, image_inputs, per_token)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None))

    def lays_out_per_token(self, images):
        if self._per_token is None:  # (a processor lays out every input alike: one encoding tells)
            self.encode([""], None, [list(images)])
        return bool(self._per_token)

    def image_inputs(self, images):
        from PIL import Image

        out = self.processor.image_processor([[Image.fromarray(im) for im in row] for row in images],
                                             return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def render_chat(self, messages):
        # An HF processor's template reads each message's content as a list of parts (SmolVLM's and LLaVA's render
        # a plain string as nothing): text comes to it as a text part.
        as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
                    for m in messages]
        return render_with_template(self.processor, as_parts)

    def io(self):
        image_processor = getattr(self.processor, "image_processor", None)
        size = getattr(image_processor, "size", None)  # a dict or an HF SizeDict, e.g. {"longest_edge": 512}
        if size is not None and not isinstance(size, int):
            size = {k: v for k, v in (size.items() if isinstance(size, dict) else vars(size).items())
                    if isinstance(v, int)}
        return {"processor": self.tokenizer_source, "image_token_id": self.model.image_token_id,
                "image_size": size}
