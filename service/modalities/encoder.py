"""The ``encoder`` modality: text and image embeddings, and the contrastive loss."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, PrivateAttr, model_validator, StrictInt

from service.modalities.base import (ImageListRequest, ModalityAdapter, ResponseBase, TypedArray, checked_batch,
                                     each)
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.interfaces import EncoderServing


class EncoderPredictRequest(ImageListRequest):
    texts: Optional[list[str]] = Field(None, description="Texts to embed.")
    images: Optional[list[Any]] = Field(None, description="Images to embed (base64 PNG/JPEG, data: URLs or typed "
                                                          "arrays).")

    @model_validator(mode="after")
    def _check(self):
        if not self.texts and not self.images:
            raise InvalidInputError("send `texts`, `images` or both", field="texts")
        if len(self.texts or []) > self.cap_batch:
            raise InvalidInputError(f"at most {self.cap_batch} texts per request; got {len(self.texts)}",
                                    field="texts")
        if len(self.images or []) > self.cap_images:
            raise InvalidInputError(f"{len(self.images)} images, over this server's limit of {self.cap_images} "
                                    "(VLA_MAX_IMAGES)", field="images")
        return self

    # (pipeline, its texts' token ids): made once, by the check in the thread pool, used by the model call
    _token_ids: Optional[tuple] = PrivateAttr(None)


class EncoderPredictResponse(ResponseBase):
    # Absent (not null) when the request lacks their inputs: similarity needs both texts and images.
    text_embeds: Optional[TypedArray] = Field(None, description="(texts, D) float32 array, unit length; "
                                                                "when texts were sent.")
    image_embeds: Optional[TypedArray] = Field(None, description="(images, D) float32 array, unit length; "
                                                                 "when images were sent.")
    similarity: Optional[TypedArray] = Field(None, description="(texts, images) float32 cosine similarities; "
                                                               "when both were sent.")


def check_embedding(pipeline: EncoderServing, request: EncoderPredictRequest):
    """On the model thread: the request's inputs, its texts' ids as the thread pool's check made them."""
    made = request._token_ids
    return pipeline.check(request.texts, request.decoded_images(),
                          token_ids=made[1] if made is not None and made[0] is pipeline else None)


def embed_each(pipeline: EncoderServing, checked: list) -> list:
    return [dict(out) for out in pipeline.embed_each(checked)]


# Several requests' embeddings in one call per tower; a request the encoder refuses (a text too long) fails alone.
# numpy arrays: the reply's serializer writes them as typed arrays (base64 in JSON, raw bytes in msgpack).
predict = checked_batch(check_embedding, embed_each)


def batch_key(request: EncoderPredictRequest) -> tuple:
    return ()  # any embedding requests may share a call


class EncoderEvaluateRequest(EncoderPredictRequest):
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)


class EncoderEvaluateResponse(ResponseBase):
    loss: float
    num_samples: int
    text_to_image_accuracy: float
    seed: int


def evaluate_one(pipeline: EncoderServing, request: EncoderEvaluateRequest) -> dict:
    return pipeline.evaluate(request.texts or [], request.decoded_images() or [], request.seed)


def check_texts(pipeline: EncoderServing, request: EncoderPredictRequest) -> None:
    """The texts' length, before the request queues (tokenizing a huge text holds up no model call); their ids are
    kept for its model call."""
    if request.texts:
        request._token_ids = (pipeline, pipeline.check(request.texts, None).ids)


ADAPTER = ModalityAdapter(EncoderPredictRequest, EncoderPredictResponse, predict,
                          EncoderEvaluateRequest, EncoderEvaluateResponse, each(evaluate_one), batch_key=batch_key,
                          prepare=lambda request: request.decoded_images(), check=check_texts)
