"""Captions (text from images and an optional prompt) and caption evaluation for the ``caption`` modality.

Everything after the inputs is the text pipeline's: batching with left padding, sampling,
stop strings, streaming, finish reasons and usage. What differs per model type — placing
image tokens, preprocessing pixels — is its caption processor's (``caption_inputs.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from vla_foundry.caption_inputs import CAPTION_PROCESSORS, CaptionInputs, CaptionProcessor, Images
from vla_foundry.continuous import Generation
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.base import register_pipeline
from vla_foundry.pipelines.text import CompletionResult, OnText, TextPipeline, make_generator, new_seed, pad_rows
from vla_foundry.sampling import SamplingParams


def broadcast_rows(prompts: Optional[Sequence[Any]], images: Images, prompt_field: str = "prompt"):
    """Pair prompts with image lists: one of either side serves every row of the other; else counts match."""
    prompts = list(prompts) if prompts is not None else [None]
    images = list(images)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    elif len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(prompts) != len(images):
        raise InvalidInputError(f"{len(prompts)} prompts and {len(images)} image lists: send one prompt for all "
                                "image lists, one image list for all prompts, or as many of each", field=prompt_field)
    return prompts, images


def paired_rows(prompts: Optional[Sequence[Any]], prompt_token_ids: Optional[Sequence[Sequence[int]]], images):
    """``broadcast_rows`` for a caption request: token-id prompts when given (then no text prompts), else text
    prompts (a missing one is empty); returns (prompts, prompt_token_ids, images)."""
    if prompt_token_ids is not None:
        prompt_token_ids, images = broadcast_rows(prompt_token_ids, images, "prompt_token_ids")
        return None, prompt_token_ids, images
    prompts, images = broadcast_rows(prompts, images)
    return [p or "" for p in prompts], None, images


@dataclass
class CaptionEvaluation:
    """One client's caption evaluation: its image lists (decoded) and the texts or ids to score."""

    images: Images
    texts: Optional[Sequence[str]] = None
    input_ids: Optional[Sequence[Sequence[int]]] = None
    seed: Optional[int] = None


@register_pipeline("caption")
class CaptionPipeline(TextPipeline):
    def __init__(self, model, processor: CaptionProcessor, z_loss_coefficient: float = 0.0,
                 cuda_graphs: bool = True, traced_steps: bool = True):
        super().__init__(model, processor.tokenizer, processor.tokenizer_source,
                         z_loss_coefficient=z_loss_coefficient, cuda_graphs=cuda_graphs, traced_steps=traced_steps)
        self.processor = processor

    @classmethod
    def from_experiment(cls, model, experiment_dir: Path, *, tokenizer: Optional[str] = None,
                        training_config: Optional[dict] = None, cuda_graphs: bool = True,
                        traced_sampling: bool = True, **_: Any) -> "CaptionPipeline":
        training_config = training_config or {}
        processor = CAPTION_PROCESSORS.get(model.params.type).from_experiment(model, experiment_dir,
                                                                               training_config, tokenizer)
        z_loss = float((training_config.get("hparams") or {}).get("z_loss_coefficient") or 0.0)
        return cls(model, processor, z_loss_coefficient=z_loss, cuda_graphs=cuda_graphs,
                   traced_steps=traced_sampling)

    def io(self) -> dict[str, Any]:
        io = super().io()
        io["accepts"] = ["images", "prompt"] + (["prompt_token_ids"] if self.processor.accepts_token_ids else [])
        io["chat"] = self.processor.has_chat_template
        return {**io, **self.processor.io()}

    def warmup(self, max_batch_size: int = 1) -> None:
        gray = np.full((32, 32, 3), 128, dtype=np.uint8)
        self.caption([[gray]], [""], sampling=SamplingParams(max_new_tokens=2, temperature=0.0), seed=0)

    @torch.inference_mode()
    def caption(self, images: Images, prompts: Optional[Sequence[str]] = None,
                prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, *,
                sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = (), seed: Optional[int] = None,
                use_cache: bool = True, on_text: Optional[OnText] = None, rendered: bool = False) -> CompletionResult:
        """One caption per (prompt, image list) row; see ``broadcast_rows``. ``images`` are (H, W, 3) uint8."""
        inputs, _ = self._encoded(images, prompts, prompt_token_ids, rendered)
        return self._caption(inputs, self._row_inputs(inputs, images, prompts, prompt_token_ids, rendered),
                             sampling=sampling, stop=stop, seed=seed, use_cache=use_cache, on_text=on_text)

    def _caption(self, inputs: CaptionInputs, inputs_of_row: Callable[[int], dict[str, torch.Tensor]], *,
                 sampling: SamplingParams, stop: Sequence[str], seed: Optional[int], use_cache: bool,
                 on_text: Optional[OnText]) -> CompletionResult:
        if inputs.per_token and not use_cache:
            raise InvalidInputError("this model's processor lays out its inputs per token (as Qwen2-VL's and "
                                    "PaliGemma's do), and it generates with its cache only; omit use_cache",
                                    field="use_cache")
        return self.generate_completions(inputs.ids, inputs.image_inputs, sampling=sampling, stop=stop, seed=seed,
                                         use_cache=use_cache, on_text=on_text,
                                         inputs_of_row=inputs_of_row if inputs.per_token else None)

    def start_caption(self, images: Images, prompts: Optional[Sequence[str]] = None,
                      prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, *,
                      sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
                      seed: Optional[int] = None, on_text: Optional[OnText] = None,
                      rendered: bool = False) -> Generation:
        """``caption``'s generation (with the cache), checked and ready for a ``ContinuousBatcher``."""
        inputs, rows = self._encoded(images, prompts, prompt_token_ids, rendered)
        seed = new_seed() if seed is None else seed
        generation = self.start_generation(inputs.ids, inputs.image_inputs, sampling=sampling, stop=stop, seed=seed,
                                           on_text=on_text, rows_alike=len({len(row) for row in rows}) == 1)
        if inputs.per_token and len({len(r) for r in inputs.ids}) > 1:  # (its inputs do not slice by row)
            generation.shares_steps = False
            inputs_of_row = self._row_inputs(inputs, images, prompts, prompt_token_ids, rendered)
            generation.alone = lambda: self._caption(inputs, inputs_of_row, sampling=sampling, stop=stop, seed=seed,
                                                     use_cache=True, on_text=on_text)
        return generation

    def _row_inputs(self, inputs: CaptionInputs, images: Images, prompts: Optional[Sequence[str]],
                    prompt_token_ids: Optional[Sequence[Sequence[int]]], rendered: bool):
        """Row i's image inputs, encoded by themselves (for inputs laid out per token, which do not slice by row):
        the ones ``inputs`` holds where its rows were encoded one at a time, else encoded when asked for."""
        if inputs.rows is not None:
            return inputs.rows.__getitem__
        prompts, prompt_token_ids, images = paired_rows(prompts, prompt_token_ids, images)

        def of_row(i: int) -> dict[str, torch.Tensor]:
            return self.processor.encode(None if prompts is None else [prompts[i]],
                                         None if prompt_token_ids is None else [prompt_token_ids[i]], [images[i]],
                                         rendered=rendered).image_inputs

        return of_row

    def _encoded(self, images: Images, prompts: Optional[Sequence[str]],
                 prompt_token_ids: Optional[Sequence[Sequence[int]]], rendered: bool):
        """The rows paired (``paired_rows``), tokenized with their images, their ids checked; and each row's images."""
        prompts, prompt_token_ids, images = paired_rows(prompts, prompt_token_ids, images)
        inputs = self.processor.encode(prompts, prompt_token_ids, images, rendered=rendered)
        self._check_ids(inputs.ids, "prompt" if prompt_token_ids is None else "prompt_token_ids")
        return inputs, images

    def check(self, image_counts: Sequence[int], prompts: Optional[Sequence[str]] = None,
              prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, *,
              sampling: SamplingParams = SamplingParams()) -> None:
        """What ``caption`` would refuse that needs no pixel, from the images' count per row alone: rows that do
        not pair, token ids out of the vocabulary, a prompt too long for ``max_new_tokens`` (where the processor
        counts image tokens without pixels; an HF processor needs them). A server calls it before it decodes
        the images, so a request refused for its text costs no image decode."""
        prompts, prompt_token_ids, placeholders = paired_rows(prompts, prompt_token_ids,
                                                              [[None] * n for n in image_counts])
        ids = self.processor.text_ids(prompts, prompt_token_ids, placeholders)
        if ids is not None:
            self._check_ids(ids, "prompt" if prompt_token_ids is None else "prompt_token_ids")
            try:
                self.fitted(ids, sampling)
            except InvalidInputError as e:
                # The images' placeholder tokens count towards the context: when they alone fill it, the fix is
                # fewer images, not a shorter prompt.
                image_tokens = max(sum(t == self.model.image_token_id for t in row) for row in ids)
                if e.field == "prompt" and image_tokens >= self.model.max_seq_len:
                    raise InvalidInputError(
                        f"the images take {image_tokens} tokens of this model's context (max_seq_len "
                        f"{self.model.max_seq_len}) before any text: no room for a caption; send fewer images",
                        field="images") from None
                raise

    def render_chat(self, messages: list[dict]) -> str:
        return self.processor.render_chat(messages)

    def prompt_ids(self, prompts: Optional[Sequence[str]] = None,
                   prompt_token_ids: Optional[Sequence[Sequence[int]]] = None, *, sampling: SamplingParams,
                   rendered: bool = False) -> list[list[int]]:
        """``TextPipeline.prompt_ids`` for prompts without images (a /v1 completion, or a chat with no image): an
        image placeholder in them would be embedded with no image behind it, so it is refused, as a caption's
        prompt refuses one it did not place; so is a video placeholder (this server takes no video)."""
        ids = super().prompt_ids(prompts, prompt_token_ids, sampling=sampling, rendered=rendered)
        placeholder, video = self.model.image_token_id, getattr(self.model, "video_token_id", None)
        field = "prompt" if prompt_token_ids is None else "prompt_token_ids"
        for i, row in enumerate(ids):
            if placeholder in row:
                raise InvalidInputError(f"{field}[{i}] holds the image placeholder (id {placeholder}), and the "
                                        "request has no image: send the image (a chat's image_url part), or leave "
                                        "the placeholder out", field=field)
            if video is not None and video in row:
                raise InvalidInputError(f"{field}[{i}] holds this model's video placeholder (id {video}): this server "
                                        "takes images, not videos; leave it out", field=field)
        return ids

    def _check_ids(self, ids: list[list[int]], field: str) -> None:
        """Every id a token of the vocabulary, or the image placeholder (which may lie outside it, an added
        processor token: the model embeds placeholders as row 0 before their images replace them, spec §6)."""
        vocab, placeholder = self.model.vocab_size, getattr(self.model, "image_token_id", None)
        for i, row in enumerate(ids):
            bad = [t for t in row if not 0 <= t < vocab and t != placeholder]
            if bad:
                raise InvalidInputError(f"{field}[{i}] has token ids outside [0, {vocab}): {bad[:5]}", field=field)

    def evaluate_each(self, evaluations: Sequence["CaptionEvaluation"]) -> list[Union[dict[str, Any], Exception]]:
        """Several clients' caption evaluations, each scored as ``evaluate`` scores it (an ``InvalidInputError``
        is that evaluation's own failure). One forward pass each: rows of different requests may differ in
        their image count, and an HF processor lays out each request's pixels its own way."""
        results: list = []
        for e in evaluations:
            try:
                results.append(self.evaluate(e.images, texts=e.texts, input_ids=e.input_ids, seed=e.seed))
            except InvalidInputError as error:
                results.append(error)
        return results

    @torch.inference_mode()
    def evaluate(self, images: Images, texts: Optional[Sequence[str]] = None,
                 input_ids: Optional[Sequence[Sequence[int]]] = None, seed: Optional[int] = None) -> dict[str, Any]:
        """The batch handler's loss for captions: ``texts`` (each scored as the answer to an image-only caption
        request: images, a chat model's generation prompt, the text, eos) or ``input_ids`` that already hold
        the image placeholders, with one image list per row (or one for all)."""
        if (texts is None) == (input_ids is None):
            raise InvalidInputError("give exactly one of `texts` or `input_ids`", field="texts")
        if input_ids is not None and getattr(self.model, "prefix_lm", False):
            raise InvalidInputError("this model attends both ways over its prompt and the image (a prefix LM, as "
                                    "PaliGemma): a caption is scored as the suffix its processor marks, which token "
                                    "ids alone do not; send `texts`", field="input_ids")
        if texts is not None:
            texts, images = broadcast_rows(texts, images, "texts")
            inputs = self.processor.encode(list(texts), None, images, answers=True)
            ids, image_inputs = inputs.ids, inputs.image_inputs
            if inputs.per_token and len({len(r) for r in ids}) > 1:
                # Its processor lays out inputs per token in its own padding (Qwen2-VL's mm_token_type_ids), which
                # the rows' padding here would not match: each row alone, the losses pooled over their tokens
                if inputs.rows is None:  # (its first encoding told it so: now it encodes each row alone)
                    inputs = self.processor.encode(list(texts), None, images, answers=True)
                seed = new_seed() if seed is None else seed
                return _pooled([self._scored([row_ids], row_inputs, "texts", seed)
                                for row_ids, row_inputs in zip(inputs.ids, inputs.rows)], seed)
        else:
            input_ids, images = broadcast_rows(input_ids, images, "input_ids")
            if images and self.processor.lays_out_per_token(images[0]):
                raise InvalidInputError("this model's processor lays out its inputs per token (Qwen2-VL's "
                                        "mm_token_type_ids), which token ids alone do not give: send `texts`, which "
                                        "it encodes itself", field="input_ids")
            ids = [list(map(int, r)) for r in input_ids]
            per_image = getattr(self.model, "tokens_per_image", None)  # (our vlm: a fixed count per image)
            for i, (row, row_images) in enumerate(zip(ids, images)):
                placed = sum(t == self.model.image_token_id for t in row)
                if per_image is not None and placed != per_image * len(row_images):
                    raise InvalidInputError(f"input_ids[{i}] holds {placed} image placeholders; its "
                                            f"{len(row_images)} image(s) take {per_image} each "
                                            f"({per_image * len(row_images)}), in the row they belong to",
                                            field="input_ids")
            # Placeholders come from the client here; the processor only prepares the pixels.
            image_inputs = self.processor.image_inputs(images)
        return self._scored(ids, image_inputs, "texts" if texts is not None else "input_ids",
                            new_seed() if seed is None else seed)

    def _scored(self, ids: list[list[int]], image_inputs: dict[str, torch.Tensor], field: str,
                seed: int) -> dict[str, Any]:
        """The batch handler's loss over rows of token ids (image placeholders in place) and their image inputs;
        ``field`` names where the ids came from (``texts``: the processor placed the placeholders)."""
        self._check_ids(ids, field)
        if any(len(r) < 2 for r in ids):
            raise InvalidInputError("every sequence needs at least 2 tokens to score a next-token loss", field=field)
        if max(len(r) for r in ids) > self.model.max_seq_len:
            raise InvalidInputError(f"sequences are limited to max_seq_len = {self.model.max_seq_len} tokens; got "
                                    f"{max(len(r) for r in ids)}", field=field)
        batch_ids, mask = pad_rows(ids, self.pad_token_id)
        try:
            out = self.batch_handler.compute_loss(self.model, {"input_ids": batch_ids, "attention_mask": mask,
                                                               **image_inputs},
                                                  generator=make_generator(self.device, seed))
        except ValueError as e:  # placeholders that do not match the images
            if isinstance(e, InvalidInputError):
                raise
            if field == "texts":  # (the processor placed them)
                raise InvalidInputError(str(e), field=field) from e
            raise InvalidInputError(f"the image placeholders in {field} (id {self.model.image_token_id}) do not "
                                    f"match the images (each image takes the count its processor gives it): {e}",
                                    field=field) from e
        return {**out.to_dict(), "seed": seed}


def _pooled(rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Rows evaluated one at a time, as one evaluation of them all: the loss is a mean over every row's tokens."""
    tokens = sum(r["num_tokens"] for r in rows)
    loss = sum(r["loss"] * r["num_tokens"] for r in rows) / tokens
    return {"loss": loss, "num_samples": sum(r["num_samples"] for r in rows), "num_tokens": tokens,
            "perplexity": math.exp(loss) if loss < 700 else None, "seed": seed}
