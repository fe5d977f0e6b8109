"""What the service needs per modality: request/response schemas and two thin calls.

``predict(pipeline, request)`` and ``evaluate(pipeline, request)`` run on the
deployment's executor thread: they turn a validated request into one pipeline call and
its result into a JSON-able dict. No ML logic lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field


class Limits:
    """Per-app caps, set on the per-type request subclasses the routes create."""

    cap_max_new_tokens: ClassVar[int] = 1024
    cap_batch: ClassVar[int] = 64
    cap_images: ClassVar[int] = 16
    cap_image_pixels: ClassVar[int] = 4096 * 4096
    cap_image_bytes: ClassVar[int] = 16 * 1024 * 1024
    cap_inference_steps: ClassVar[int] = 1000

    @classmethod
    def limits_from(cls, settings) -> dict[str, int]:
        """The caps of one app, for the per-type request subclasses the routes create."""
        return {"cap_max_new_tokens": settings.max_new_tokens, "cap_batch": settings.max_batch,
                "cap_images": settings.max_images, "cap_image_pixels": settings.max_image_pixels,
                "cap_image_bytes": settings.max_body_bytes, "cap_inference_steps": settings.max_inference_steps}


class RequestBase(BaseModel, Limits):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Optional[str] = Field(None, description="Deployment name; required when several of this type are served.")


class Timing(BaseModel):
    queue: float
    infer: float
    total: float


class ResponseBase(BaseModel):
    model: str
    timing_ms: Timing


@dataclass(frozen=True)
class ModalityAdapter:
    predict_request: type[RequestBase]
    predict_response: type[BaseModel]
    predict: Callable[[Any, Any], dict]
    evaluate_request: type[RequestBase]
    evaluate_response: type[BaseModel]
    evaluate: Callable[[Any, Any], dict]
    # Optional: a non-JSON reply for the payload when the client's Accept asks for one (e.g. image/png).
    reply: Optional[Callable[[dict, str], Any]] = None

