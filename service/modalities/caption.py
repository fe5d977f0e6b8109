"""The ``caption`` modality: captions from images (+ an optional prompt) and caption loss.

Images are checked for count and structure when the request is validated, and decoded
(with their pixel limits) on the deployment's thread, so large images never block the
event loop.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field, PrivateAttr, model_validator, StrictInt

from service.images import decode_image_list, decode_image_value
from service.modalities.base import ModalityAdapter, RequestBase, ResponseBase, checked_batch, each
from service.modalities.text import (CompletionOut, SamplingFields, TextEvaluateResponse, TokenRows, Usage, _rows,
                                     check_prompt_rows, completion_payload, prompt_count)
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.caption import CaptionEvaluation
from vla_foundry.pipelines.interfaces import CaptionServing

IMAGE_FORMS = ("a base64 PNG/JPEG string, a data: URL, or a typed array {dtype, shape, data} of (H, W, 3) uint8 "
               "(or floats in [0, 1])")


class ImageFields(RequestBase):
    image: Optional[Any] = Field(None, description=f"One image: {IMAGE_FORMS}.")
    images: Optional[list[Any]] = Field(None, description="Several images for one caption (a flat list; a model "
                                                          "with several cameras takes one per camera), or one list "
                                                          "per prompt (a list of lists).")

    @model_validator(mode="after")
    def _check_images(self):
        if (self.image is None) == (self.images is None):
            raise InvalidInputError("give exactly one of `image` or `images`", field="images")
        if self.images is not None:
            if not self.images:
                raise InvalidInputError("`images` is empty; send at least one image", field="images")
            nested = [isinstance(v, list) for v in self.images]
            if any(nested) and not all(nested):
                raise InvalidInputError("`images` must be a flat list of images or a list of lists (one per prompt), "
                                        "not a mix", field="images")
            empty = next((i for i, v in enumerate(self.images) if v == []), None)
            if empty is not None:  # every caption is of at least one image (a model without one has nothing to read)
                raise InvalidInputError(f"`images[{empty}]` is empty; each caption needs at least one image",
                                        field=f"images[{empty}]")
            if all(nested) and len(self.images) > self.cap_batch:
                raise InvalidInputError(f"at most {self.cap_batch} image lists per request; got {len(self.images)}",
                                        field="images")
            total = sum(len(v) if isinstance(v, list) else 1 for v in self.images)
            if total > self.cap_images:
                raise InvalidInputError(f"{total} images, over this server's limit of {self.cap_images} per request "
                                        "(VLA_MAX_IMAGES); send fewer", field="images")
        return self

    def image_counts(self) -> list[int]:
        """Images per caption row, from the request alone (nothing decoded)."""
        if self.image is not None:
            return [1]
        if all(isinstance(v, list) for v in self.images):
            return [len(row) for row in self.images]
        return [len(self.images)]

    _decoded: Optional[list] = PrivateAttr(None)

    def decoded_images(self) -> list[list]:
        """The images as (H, W, 3) uint8 arrays, grouped per caption; errors name e.g. ``images[1][0]``.
        Decoded once (``prepare`` does it off the event loop, before the request queues)."""
        if self._decoded is None:
            limits = dict(max_pixels=self.cap_image_pixels, max_bytes=self.cap_image_bytes)
            if self.image is not None:
                self._decoded = [[decode_image_value(self.image, field="image", **limits)]]
            elif all(isinstance(v, list) for v in self.images):
                self._decoded = [decode_image_list(row, max_images=self.cap_images, field=f"images[{i}]", **limits)
                                 for i, row in enumerate(self.images)]
            else:
                self._decoded = [decode_image_list(self.images, max_images=self.cap_images, field="images",
                                                   **limits)]
        return self._decoded


class CaptionPredictRequest(SamplingFields, ImageFields):
    prompt: Optional[Union[str, list[str]]] = Field(None, description="Optional prompt (or one per image list).")
    prompt_token_ids: Optional[TokenRows] = Field(None, description="The prompt as token ids (without image "
                                                                   "placeholders; not for vlm_hf).")

    @model_validator(mode="after")
    def _check(self):
        if self.prompt is not None and self.prompt_token_ids is not None:
            raise InvalidInputError("give at most one of `prompt` or `prompt_token_ids`", field="prompt")
        check_prompt_rows(self)
        return self


class CaptionPredictResponse(ResponseBase):
    captions: list[CompletionOut]
    usage: Usage
    seed: int


def predict_one(pipeline: CaptionServing, request: CaptionPredictRequest):
    return pipeline.caption(request.decoded_images(), _rows(request.prompt), request.prompt_token_ids,
                            use_cache=request.use_cache, **request.generation_settings())


def start_one(pipeline: CaptionServing, request: CaptionPredictRequest):
    """The request's generation for the deployment's continuous batcher (without the cache: its result)."""
    if not request.use_cache:
        return predict_one(pipeline, request)
    return pipeline.start_caption(request.decoded_images(), _rows(request.prompt), request.prompt_token_ids,
                                  **request.generation_settings())


def generation_rows(request: CaptionPredictRequest) -> int:
    """The captions a request asks for: one per prompt or per image list (one of them broadcast to the other)."""
    return max(prompt_count(request), len(request.image_counts()))


def check_text(pipeline: CaptionServing, request: CaptionPredictRequest) -> None:
    pipeline.check(request.image_counts(), _rows(request.prompt), request.prompt_token_ids,
                   sampling=request.sampling())


def encode_captions(request, result) -> dict:
    return completion_payload(result, key="captions")


class CaptionEvaluateRequest(ImageFields):
    texts: Optional[list[str]] = Field(None, description="Captions to score, one per image list (or one list "
                                                         "for all).")
    input_ids: Optional[TokenRows] = Field(None, description="Sequences to score with the image placeholders in "
                                                             "place (see io.image_token_id, io.tokens_per_image).")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _check(self):
        if (self.input_ids is None) == (self.texts is None):
            raise InvalidInputError("give exactly one of `texts` or `input_ids`", field="texts")
        count = len(self.input_ids or self.texts or [])
        given = "input_ids" if self.input_ids is not None else "texts"  # (the field the client sent)
        if count == 0:
            raise InvalidInputError("the batch is empty; send at least one sequence", field=given)
        if count > self.cap_batch:
            raise InvalidInputError(f"at most {self.cap_batch} sequences per request; got {count}", field=given)
        return self


def check_evaluate(pipeline: CaptionServing, request: CaptionEvaluateRequest) -> CaptionEvaluation:
    return CaptionEvaluation(request.decoded_images(), request.texts, request.input_ids, request.seed)


def evaluate_each(pipeline: CaptionServing, evaluations: list[CaptionEvaluation]) -> list:
    return pipeline.evaluate_each(evaluations)


# No evaluate batch key: each caption evaluation is its own call (see CaptionPipeline.evaluate_each).
ADAPTER = ModalityAdapter(CaptionPredictRequest, CaptionPredictResponse, each(predict_one),
                          CaptionEvaluateRequest, TextEvaluateResponse, checked_batch(check_evaluate, evaluate_each),
                          encode_predict=encode_captions, check=check_text,
                          prepare=lambda request: request.decoded_images(), start_predict=start_one,
                          generation_rows=generation_rows)
