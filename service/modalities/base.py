"""What the service needs per modality: request/response schemas and two thin calls.

``predict(pipeline, request)`` and ``evaluate(pipeline, request)`` run on the
deployment's executor thread: they turn a validated request into one pipeline call and
its result into a JSON-able dict. No ML logic lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from service.images import decode_image_list


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


class ImageListRequest(RequestBase):
    """A request with a flat ``images`` list; ``decoded_images()`` decodes it once, with this app's limits
    (the adapter's ``prepare`` calls it off the event loop, before the request queues)."""

    _decoded: Optional[list] = PrivateAttr(None)

    def decoded_images(self) -> Optional[list]:
        if self.images and self._decoded is None:
            self._decoded = decode_image_list(self.images, max_images=self.cap_images,
                                              max_pixels=self.cap_image_pixels, max_bytes=self.cap_image_bytes)
        return self._decoded


class Timing(BaseModel):
    queue: float
    infer: float
    total: float
    batch_size: Optional[int] = Field(None, description="Requests that shared this model call (dynamic batching).")


class ResponseBase(BaseModel):
    model: str
    timing_ms: Timing


def one_request(predict_batch: Callable[[Any, list], list]) -> Callable[[Any, Any], dict]:
    """A modality's ``predict`` for one request, from its ``predict_batch``: the reply, or its refusal raised."""

    def predict(pipeline, request) -> dict:
        (reply,) = predict_batch(pipeline, [request])
        if isinstance(reply, Exception):
            raise reply
        return reply

    return predict


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
    # Optional: work on a validated request before it queues (decoding images), run in a thread pool so a
    # bad image is refused at once and the model's thread only runs the model.
    prepare: Optional[Callable[[Any], Any]] = None
    # Optional: whether ``prepare`` is cheap enough for this request to run on the event loop (microseconds:
    # cheaper than the hop to the thread pool), e.g. raw frames that decode to a view and one copy.
    prepare_on_loop: Optional[Callable[[Any], bool]] = None
    # Optional: ``predict`` for requests with a ``session_id``: (pipeline, [(request, session), ...]) → one reply
    # (or exception) each, in one model call (robot sessions; the route serializes the requests of one session).
    session_predict_batch: Optional[Callable[[Any, list], list]] = None
    # Optional: ``predict`` for several requests in one model call, (pipeline, requests) → one reply each,
    # each equal to what the request gets alone; requests share a call only when their ``batch_key`` is equal.
    predict_batch: Optional[Callable[[Any, list], list[dict]]] = None
    batch_key: Optional[Callable[[Any], Any]] = None

