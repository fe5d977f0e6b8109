"""The serving contract: what the service needs per modality, and the item every transport queues.

A request crosses into ``vla_foundry`` in three steps, the same for every transport (``/predict``,
robot sessions, the websocket, ``/v1``):

1. **decode** (event loop or thread pool): the validated request with its images decoded, wrapped
   in a ``ModelCall``;
2. **run** (the deployment's model thread, through ``Deployment.call``): ``run(pipeline, items)``,
   one pipeline call for the items of every queued call that shares ``run`` and ``batch_key``,
   returning one typed result per item (an exception instance is that item's own failure), each
   what the item gets alone;
3. **encode** (back on the event loop): the result as the transport's reply.

No ML logic lives here, and the service reads a pipeline only through the members its modality's
interface declares (``vla_foundry.pipelines.interfaces``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictFloat

from service.images import decode_image_list
from vla_foundry.errors import InvalidInputError


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

    def check_inference_steps(self, steps: Optional[int]) -> None:
        """422 for a step count over this app's cap (``VLA_MAX_INFERENCE_STEPS``)."""
        if steps is not None and steps > self.cap_inference_steps:
            raise InvalidInputError(f"num_inference_steps must be <= {self.cap_inference_steps} "
                                    f"(VLA_MAX_INFERENCE_STEPS); got {steps}", field="num_inference_steps")


# A float field of a request: a number (an integer is one), never a boolean or a string (pydantic's lax float would
# read true as 1.0 and "3" or b"3" as 3.0).
Number = StrictFloat


# Request fields whose maximum is a cap of the app (Limits): checked by hand, published in /openapi.json.
CAPPED_FIELDS = {"max_new_tokens": "cap_max_new_tokens", "num_images": "cap_images",
                 "num_inference_steps": "cap_inference_steps"}


class RequestBase(BaseModel, Limits):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        """The schema with this app's caps as the capped fields' maxima (the routes' request classes carry them)."""
        schema = handler(core_schema)
        properties = handler.resolve_ref_schema(schema).get("properties", {})
        for name, cap in CAPPED_FIELDS.items():
            if name in properties:
                prop = properties[name]
                for branch in prop.get("anyOf", [prop]):  # Optional[int]: its integer branch
                    if branch.get("type") == "integer":
                        branch["maximum"] = getattr(cls, cap)
        return schema

    model: Optional[str] = Field(None, description="Deployment name; required when several of this type are served.")
    timeout_s: Optional[Number] = Field(None, gt=0, le=3600, description=(
        "Seconds this request may take from its arrival, as the X-Request-Timeout header (the earlier holds): "
        "one that is still queued then is dropped unrun (504)."))
    # When the server took the request (Unix seconds, its clock): a robot's actions for an observation without a
    # timestamp are anchored here, not when the model got to them (it may have waited in the queue meanwhile).
    _received_at: float = PrivateAttr(default_factory=time.time)

    @property
    def received_at(self) -> float:
        return self._received_at


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
    preprocess: Optional[float] = Field(None, description="Decoding and preparing the inputs (images, prompts), "
                                                          "where the pipeline reports it apart from infer.")
    batch_size: Optional[int] = Field(None, description=(
        "Requests that shared this model call (dynamic batching); for a generation, the sequences that were "
        "decoding together when it finished (continuous batching), its own included."))


class ResponseBase(BaseModel):
    model: str
    timing_ms: Timing


class TypedArray(BaseModel):
    """A numpy array in a reply, in the wire convention of ``service/codecs.py``: in JSON ``data`` is base64; in
    msgpack it is the raw bytes, and the map also holds ``"__ndarray__": true``."""

    dtype: str = Field(..., description="numpy's name of the dtype: '<f4' is little-endian float32.")
    shape: list[int] = Field(..., description="The array's dimensions.")
    data: str = Field(..., description="The array's bytes in C order: base64 in JSON, raw bytes in msgpack.",
                      json_schema_extra={"contentEncoding": "base64"})


@dataclass(frozen=True)
class ModelCall:
    """One decoded request for a deployment's model thread: what ``Deployment.call`` queues.

    ``run`` is a module-level function ``run(pipeline, items) -> results`` (results in order, an exception
    instance being that item's failure); calls share one model call only when their ``run`` is the same function
    and their ``batch_key`` is equal (e.g. a policy's step count). ``batch_key`` None: the call runs alone.
    """

    run: Callable[[Any, list], list]
    item: Any
    batch_key: Optional[Hashable] = None
    # Generations: ``start(pipeline, item)`` makes the item's ``Generation``, which a deployment that batches
    # continuously decodes together with the others running (``run`` serves where it does not).
    start: Optional[Callable[[Any, Any], Any]] = None
    rows: int = 1  # the sequences a generation decodes (prompts × choices): admission estimates their wait for slots


def each(run_one: Callable[[Any, Any], Any]) -> Callable[[Any, list], list]:
    """A ``run`` for calls that never share a model call (``batch_key`` None): ``run_one(pipeline, item)``
    per item. Build it once, at module level: calls share a batch only with the same ``run`` object."""

    def run(pipeline, items: list) -> list:
        return [run_one(pipeline, item) for item in items]

    run.__name__ = run.__qualname__ = getattr(run_one, "__name__", "run")
    return run


def checked_batch(check: Callable[[Any, Any], Any],
                  run_many: Callable[[Any, list], list]) -> Callable[[Any, list], list]:
    """A ``run`` for calls that share one model call: ``check(pipeline, item)`` per item turns it into what
    ``run_many`` takes (an ``InvalidInputError`` it raises is that item's own failure), then one
    ``run_many(pipeline, checked)`` for the rest; results in the items' order. Build it once, at module level."""

    def run(pipeline, items: list) -> list:
        checked: list = []
        for item in items:
            try:
                checked.append(check(pipeline, item))
            except InvalidInputError as e:
                checked.append(e)
        ready = [c for c in checked if not isinstance(c, Exception)]
        results = iter(run_many(pipeline, ready) if ready else [])
        return [c if isinstance(c, Exception) else next(results) for c in checked]

    run.__name__ = run.__qualname__ = getattr(run_many, "__name__", "run")
    return run


def as_reply(request, result: Any) -> dict:
    """The default ``encode``: a result that already is the reply's fields (a dict)."""
    return dict(result)


@dataclass(frozen=True)
class ModalityAdapter:
    predict_request: type[RequestBase]
    predict_response: type[BaseModel]
    # run(pipeline, requests) → one result per request (see ModelCall), on the deployment's thread.
    predict: Callable[[Any, list], list]
    evaluate_request: type[RequestBase]
    evaluate_response: type[BaseModel]
    evaluate: Callable[[Any, list], list]
    # encode(request, result) → the reply's fields (JSON-able, or numpy arrays the reply codec writes).
    encode_predict: Callable[[Any, Any], dict] = as_reply
    encode_evaluate: Callable[[Any, Any], dict] = as_reply
    # Whether encoding costs enough (e.g. PNG) to run in the thread pool rather than on the event loop.
    encode_in_pool: bool = False
    # Predict requests with equal keys may share one model call; None (no function): each runs alone.
    batch_key: Optional[Callable[[Any], Hashable]] = None
    # Optional: a non-JSON reply for the payload when the client's Accept asks for one (e.g. image/png).
    reply: Optional[Callable[[dict, str], Any]] = None
    # What ``reply`` adds to the predict route's 200 response in /openapi.json: ``content`` per media type it
    # answers with, and its ``headers``.
    reply_openapi: Optional[dict[str, Any]] = None
    # Optional: ``check(pipeline, request)``, what the pipeline can refuse without the request's images (a
    # prompt too long), run before ``prepare`` so such a request costs no image decode.
    check: Optional[Callable[[Any, Any], None]] = None
    # Optional: decoding a validated request before it queues (images), run in a thread pool so a bad image
    # is refused at once and the model's thread only runs the model.
    prepare: Optional[Callable[[Any], Any]] = None
    # Optional: whether ``prepare`` is cheap enough for this request to run on the event loop (microseconds:
    # cheaper than the hop to the thread pool), e.g. raw frames that decode to a view and one copy.
    prepare_on_loop: Optional[Callable[[Any], bool]] = None
    # Optional: the Unix time after which a predict request's answer is of no use (a robot's chunk past its
    # valid_until): a request still queued then is dropped unrun, as past a deadline.
    expires: Optional[Callable[[Any, Any], Optional[float]]] = None
    # Evaluate requests with equal keys may share one model call; None (no function): each runs alone.
    evaluate_batch_key: Optional[Callable[[Any], Hashable]] = None
    # Optional: ``run`` for predict requests with a ``session_id``: items are (request, session) pairs (robot
    # sessions; the transport serializes the requests of one session).
    session_predict: Optional[Callable[[Any, list], list]] = None
    # Optional: ``start(pipeline, request)``, a generation a continuously batching deployment decodes with the
    # others running (ModelCall.start); ``predict`` serves where the deployment does not batch continuously.
    start_predict: Optional[Callable[[Any, Any], Any]] = None
    # With ``start_predict``: the sequences a predict request's generation decodes (ModelCall.rows).
    generation_rows: Optional[Callable[[Any], int]] = None

    def predict_call(self, request) -> ModelCall:
        return ModelCall(self.predict, request, self.batch_key(request) if self.batch_key else None,
                         start=self.start_predict,
                         rows=self.generation_rows(request) if self.generation_rows else 1)

    def evaluate_call(self, request) -> ModelCall:
        return ModelCall(self.evaluate, request,
                         self.evaluate_batch_key(request) if self.evaluate_batch_key else None)
