"""The ``image`` modality: images from prompts (PNG) and the denoising loss.

``Accept: image/png`` (preferred to JSON and msgpack) on a one-image request returns the PNG itself (the
seed in the ``X-Seed`` header); otherwise images come back as base64 PNGs (in JSON or msgpack).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr, model_validator, StrictInt
from starlette.responses import Response

from service.codecs import REPLY_TYPES, preferred_media_type
from service.modalities.base import ImageListRequest, ModalityAdapter, Number, RequestBase, ResponseBase, each
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.image import ImageRequest
from vla_foundry.pipelines.interfaces import ImageServing

PNG = "image/png"


class ImagePredictRequest(RequestBase):
    _plan: Optional[tuple] = PrivateAttr(None)  # (pipeline, its ImagePlan): made once, in the thread pool
    prompt: Optional[str] = Field(None, description="What to draw (text-conditioned models); omit for an "
                                                    "unconditional sample.")
    negative_prompt: Optional[str] = Field(None, description="What to steer away from (through guidance).")
    num_images: StrictInt = Field(1, ge=1, description="Images to generate (at most VLA_MAX_IMAGES).")
    num_inference_steps: Optional[StrictInt] = Field(None, ge=1, description="Sampler steps; default: 20 for the fast "
                                                                       "schedulers, all for `training`.")
    guidance_scale: Optional[Number] = Field(None, ge=0, le=100, description="Classifier-free guidance (0 … 100; "
                                                                            "1 = none); default: the model's.")
    scheduler: Optional[str] = Field(None, description="dpmsolver++ (default), ddim, euler, unipc, or training "
                                                       "(the model's own, all steps); flow-matching models: "
                                                       "dpmsolver++ (default), flow_euler, unipc, heun, training. "
                                                       "GET /models: io.schedulers.")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63,
                                      description="Image i uses seed + i (modulo 2^63): same seed, same bytes.")

    @model_validator(mode="after")
    def _check(self):
        if self.num_images > self.cap_images:
            raise InvalidInputError(f"num_images must be <= {self.cap_images} (VLA_MAX_IMAGES); got "
                                    f"{self.num_images}", field="num_images")
        self.check_inference_steps(self.num_inference_steps)
        return self


class ImageOut(BaseModel):
    format: str = "png"
    data: str = Field(..., description="base64 PNG")
    seed: int


class ImagePredictResponse(ResponseBase):
    images: list[ImageOut]
    seed: int
    scheduler: str
    num_inference_steps: int
    guidance_scale: Optional[float]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    gray_or_rgb = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(gray_or_rgb).save(buffer, format="PNG")  # PNG encoding is deterministic: same pixels, same bytes
    return buffer.getvalue()


def plan(pipeline: ImageServing, request: ImagePredictRequest):
    """The request checked and resolved by the pipeline (its prompts tokenized: a prompt too long is refused); made
    once per pipeline (the check before the request queues, then its model call on the same pipeline, unless a
    reload came between)."""
    if request._plan is None or request._plan[0] is not pipeline:
        request._plan = (pipeline, pipeline.plan(
            ImageRequest(request.prompt, request.negative_prompt, request.num_images, request.num_inference_steps,
                         request.guidance_scale, request.scheduler, request.seed),
            max_inference_steps=request.cap_inference_steps))
    return request._plan[1]


def predict(pipeline: ImageServing, requests: list[ImagePredictRequest]) -> list:
    """Several requests' images (``ImageResult``s) in as few model calls as their samplers allow; a request whose
    values the model refuses fails alone."""
    plans = []
    for request in requests:
        try:
            plans.append(plan(pipeline, request))
        except InvalidInputError as e:
            plans.append(e)
    results = iter(pipeline.generate_each([p for p in plans if not isinstance(p, Exception)]))
    return [plan if isinstance(plan, Exception) else next(results) for plan in plans]


def batch_key(request: ImagePredictRequest) -> tuple:
    """Requests that may share a call (the pipeline still groups by the resolved sampler)."""
    return (request.scheduler, request.num_inference_steps, request.guidance_scale, request.prompt is None,
            request.negative_prompt is None)


def encode_images(request, result) -> dict:
    """An ``ImageResult`` as the reply's fields: PNG-encoded (off the model thread: the adapter's encode_in_pool)."""
    return {"images": [{"format": "png", "data": base64.b64encode(png_bytes(im)).decode(), "seed": s}
                       for im, s in zip(result.images, result.seeds)],
            "seed": result.seeds[0], "scheduler": result.scheduler,
            "num_inference_steps": result.num_inference_steps, "guidance_scale": result.guidance_scale}


# The replies of /predict, in the server's order of preference: JSON for */*, PNG only when the client prefers it.
PREDICT_REPLY_TYPES = (*REPLY_TYPES, PNG)
# png_reply's reply in /openapi.json.
PNG_REPLY_OPENAPI = {
    "description": "JSON, or msgpack to a client that prefers it (`Accept: application/msgpack`), or for one image "
                   "the PNG itself to a client that prefers `image/png` (its seed in `X-Seed`).",
    "content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
    "headers": {"X-Seed": {"description": "image/png replies: the image's seed.", "schema": {"type": "integer"}},
                "X-Model": {"description": "image/png replies: the deployment that drew it.",
                            "schema": {"type": "string"}},
                "X-Timing-Ms": {"description": "image/png replies: the request's time in the server, ms.",
                                "schema": {"type": "number"}}},
}


def png_reply(payload: dict, accept: str) -> Optional[Response]:
    """The raw PNG when the client's ``Accept`` prefers ``image/png`` to JSON and msgpack (q-values count:
    ``image/png;q=0`` refuses it) and the request asked for one image."""
    if preferred_media_type(accept or "", PREDICT_REPLY_TYPES) != PNG or len(payload["images"]) != 1:
        return None
    image = payload["images"][0]
    return Response(base64.b64decode(image["data"]), media_type=PNG,
                    headers={"Vary": "Accept", "X-Seed": str(image["seed"]), "X-Model": payload["model"],
                             "X-Timing-Ms": str(payload["timing_ms"]["total"])})


class ImageEvaluateRequest(ImageListRequest):
    images: list[Any] = Field(..., description="Images to score (base64 PNG/JPEG, data: URLs or typed arrays).")
    texts: Optional[list[str]] = Field(None, description="One caption per image (text-conditioned models).")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63, description="Fixes the timesteps and noise.")

    @model_validator(mode="after")
    def _check(self):
        if not self.images:
            raise InvalidInputError("send at least one image", field="images")
        if len(self.images) > self.cap_images:
            raise InvalidInputError(f"{len(self.images)} images, over this server's limit of {self.cap_images} "
                                    "(VLA_MAX_IMAGES)", field="images")
        return self


class ImageEvaluateResponse(ResponseBase):
    loss: float
    num_samples: int
    seed: int


def evaluate_one(pipeline: ImageServing, request: ImageEvaluateRequest) -> dict:
    return pipeline.evaluate(request.decoded_images(), request.texts, request.seed)


def prepare(request) -> None:
    if isinstance(request, ImageEvaluateRequest):
        request.decoded_images()


ADAPTER = ModalityAdapter(ImagePredictRequest, ImagePredictResponse, predict,
                          ImageEvaluateRequest, ImageEvaluateResponse, each(evaluate_one),
                          encode_predict=encode_images, encode_in_pool=True, batch_key=batch_key, reply=png_reply,
                          reply_openapi=PNG_REPLY_OPENAPI, prepare=prepare,
                          check=plan)  # (in the thread pool, before it queues: a huge prompt's tokenizing too)
