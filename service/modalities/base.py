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

