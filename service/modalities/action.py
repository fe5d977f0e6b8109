"""The ``action`` modality: robot observations in, denormalized action chunks out.

Images arrive per camera (one frame, or a list with one frame per image index, oldest
first) in any of the image forms (base64 PNG/JPEG, data: URLs, typed uint8 arrays) and are
decoded in the thread pool before the request queues; lowdim values are nested number
lists or typed arrays. Everything the policy checks (cameras, frame counts, field widths,
finite values) is checked by ``vla_foundry.robotics.observations`` with the field named.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, model_validator

from service.codecs import DecodeError, array_dtype, decode_array, is_array_dict
from service.images import decode_image_value
from service.modalities.base import ModalityAdapter, Number, RequestBase, ResponseBase, checked_batch
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.action import ActionChunk, PolicyEvaluation, PolicyRequest
from vla_foundry.pipelines.interfaces import ActionServing
from vla_foundry.robotics.session import observation_digest, run_plans
from vla_foundry.robotics.observations import parse_action_window, parse_observation


MAX_ASPECT_RATIO = 16
# Control steps are below 2^53: exact in every client's numbers (a JavaScript number), and far from what msgpack's
# 64-bit integers can carry after a session adds its steps (2^53 steps of 1 ms are 285,000 years).
MAX_STEP = 2**53
# Raw frames up to this many bytes in all are decoded on the event loop: a view and one copy (about 10 µs per
# 224x224 camera) cost less than the hop to the thread pool (about 0.1 ms); PNG/JPEG always go to the pool.
DECODE_ON_LOOP_BYTES = 4 * 1024 * 1024


def decode_numbers(value: Any, field: str) -> Any:
    """A typed array → numpy; nested lists pass through (the policy checks their shape and values)."""
    if isinstance(value, dict):
        if not is_array_dict(value):
            raise InvalidInputError(f"{field}: expected a nested list of numbers or a typed array "
                                    f"{{dtype, shape, data}}; got keys {sorted(map(str, value))}", field)
        try:
            return decode_array(value)
        except DecodeError as e:
            raise InvalidInputError(f"{field}: {e}", field) from e
    return value


def _decode_frame(value: Any, request: RequestBase, field: str) -> np.ndarray:
    """A camera frame: encoded PNG/JPEG, or a raw uint8 array (robots send camera buffers as they are; a
    float or wider array is more likely a mistake than an image)."""
    if is_array_dict(value):
        try:
            dtype = array_dtype(value.get("dtype"))
        except DecodeError as e:
            raise InvalidInputError(f"{field}: {e}", field) from e
        if dtype != np.uint8:
            raise InvalidInputError(f"{field}: camera frames are uint8 (H, W, 3) arrays; got dtype "
                                    f"{value.get('dtype')!r}", field)
        shape = value.get("shape")
        if isinstance(shape, list) and not (len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3))):
            raise InvalidInputError(f"{field}: camera frames are uint8 (H, W, 3) arrays (or (H, W) / (H, W, 1) "
                                    f"grey); got shape {shape}", field)
    frame = decode_image_value(value, max_pixels=request.cap_image_pixels, max_bytes=request.cap_image_bytes,
                               field=field)
    h, w = frame.shape[:2]
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):  # resizing such a strip to a camera frame would blow it up
        raise InvalidInputError(f"{field}: a {w}x{h} frame (width x height) is not a camera image (aspect ratio over "
                                f"{MAX_ASPECT_RATIO}:1); send the camera's frame", field)
    return frame


class Observation(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    images: dict[str, Any] = Field(..., description="Camera name → one image, or a list with one image per "
                                                    "image index, oldest first (GET /models: io.cameras, "
                                                    "io.image_indices).")
    lowdim: dict[str, Any] = Field(default_factory=dict, description="Proprioception field → [P+1][d] raw "
                                                                     "values, oldest first.")
    language_instruction: Optional[str] = Field(None, description="What to do; required when io.uses_language.")

    _frames: Optional[dict] = PrivateAttr(None)
    _digest: Optional[str] = PrivateAttr(None)

    def frame_count(self) -> int:
        return sum(len(v) if isinstance(v, list) else 1 for v in self.images.values())

    def raw_frames_only(self, max_bytes: int = DECODE_ON_LOOP_BYTES) -> bool:
        """Whether every frame is a raw typed array with bytes (msgpack), ``max_bytes`` at most in all: such
        frames decode in microseconds, on the event loop; anything else is decoded in the thread pool."""
        total = 0
        for value in self.images.values():
            for frame in value if isinstance(value, list) else [value]:
                data = frame.get("data") if isinstance(frame, dict) else None
                if not isinstance(data, bytes):
                    return False
                total += len(data)
        return total <= max_bytes

    def decoded_frames(self, request: RequestBase, prefix: str) -> dict[str, list[np.ndarray]]:
        """Camera → decoded (h, w, 3) uint8 frames, within the app's image limits."""
        if self._frames is None:
            total = self.frame_count()
            if total > request.cap_images:
                raise InvalidInputError(f"{prefix}.images: {total} frames, over this server's limit of "
                                        f"{request.cap_images} per observation (VLA_MAX_IMAGES)", f"{prefix}.images")
            frames = {}
            for camera, value in self.images.items():
                values = value if isinstance(value, list) else [value]
                frames[camera] = [_decode_frame(v, request, f"{prefix}.images.{camera}"
                                                + (f"[{i}]" if isinstance(value, list) else ""))
                                  for i, v in enumerate(values)]
            self._frames = frames
        return self._frames

    def digest(self, request: RequestBase, prefix: str, past_actions: Optional[dict] = None) -> str:
        """The session's ``observation_digest`` of what this observation (and ``past_actions``) sent: made before the
        request queues, off the model thread, where it may be a session's step sent again (it has a ``step``)."""
        if self._digest is None:
            past = None if past_actions is None else {k: decode_numbers(v, f"past_actions.{k}")
                                                      for k, v in past_actions.items()}
            self._digest = observation_digest(self.decoded_frames(request, prefix), self.decoded_lowdim(prefix),
                                              self.language_instruction or "", past)
        return self._digest

    @property
    def made_digest(self) -> Optional[str]:
        """The digest made before the request queued, if one was (a session makes its own otherwise)."""
        return self._digest

    def decoded_lowdim(self, prefix: str) -> dict[str, Any]:
        return {k: decode_numbers(v, f"{prefix}.lowdim.{k}") for k, v in self.lowdim.items()}

    def parse(self, pipeline: ActionServing, request: RequestBase, prefix: str, past_actions: Optional[dict] = None):
        lowdim = self.decoded_lowdim(prefix)
        past = None if past_actions is None else {k: decode_numbers(v, f"past_actions.{k}")
                                                  for k, v in past_actions.items()}
        return parse_observation(self.decoded_frames(request, prefix), lowdim, self.language_instruction, past,
                                 pipeline.robot_io, pipeline.uses_language, prefix=prefix)


class ActionPredictRequest(RequestBase):
    observation: Observation
    past_actions: Optional[dict[str, Any]] = Field(None, description="Action field → [P][d] raw actions the robot "
                                                                     "executed, oldest first; they condition the "
                                                                     "chunk and come back unchanged in its first P "
                                                                     "rows.")
    num_inference_steps: Optional[StrictInt] = Field(None, ge=1, description=(
        "Denoising steps; default: the deployment's (GET /models io.default_inference_steps)."))
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63, description="Same seed, same actions.")
    noise: Optional[Any] = Field(None, description="Initial noise [P+1+F][A] (rows with past actions ignore it); "
                                                   "overrides the seed.")
    session_id: Optional[str] = Field(None, max_length=128, description="Keep this robot's history on the server: "
                                                                       "then the current step alone is enough (one "
                                                                       "frame per camera, the current [d] row).")
    timestamp: Optional[Number] = Field(None, description="The observation's time (Unix seconds, server clock): "
                                                         "anchors the chunk; too old ⇒ 409.")
    step: Optional[StrictInt] = Field(None, ge=0, lt=MAX_STEP, description=(
        "The robot's control step index; echoed. In a session, default: the last step + n_action_steps."))

    @model_validator(mode="after")
    def _check(self):
        self.check_inference_steps(self.num_inference_steps)
        return self


class ActionTiming(BaseModel):
    queue: float
    preprocess: float
    infer: float
    total: float
    batch_size: int = Field(1, description="Requests that shared this model call (dynamic batching).")


class ActionPredictResponse(ResponseBase):
    timing_ms: ActionTiming
    actions: dict[str, list] = Field(..., description="Action field → [P+1+F][d] denormalized actions.")
    action_chunk: list = Field(..., description="[P+1+F][A]: the fields concatenated in io.actions order.")
    first_action_index: int = Field(..., description="P: row of the action to execute now (rows before it are "
                                                     "the past).")
    n_action_steps: int = Field(..., description="Actions to execute from first_action_index before asking again.")
    action_fields: list[str]
    num_inference_steps: int
    checkpoint_step: Optional[int]
    seed: int
    session_id: Optional[str] = None
    timestamp: Optional[float] = None
    step: Optional[int] = None
    valid_until: float = Field(..., description="Until when the chunk may be executed: its timestamp (or the "
                                                "server's receive time) + n_action_steps control periods.")


def _noise(value: Any) -> Optional[np.ndarray]:
    if value is None:
        return None
    value = decode_numbers(value, "noise")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise InvalidInputError("noise must be a [P+1+F][A] array of numbers", field="noise") from None
    if array.dtype.kind not in "fiu":
        raise InvalidInputError(f"noise must hold real numbers; got {array.dtype}", field="noise")
    if array.ndim != 2:
        raise InvalidInputError(f"noise must be a [P+1+F][A] array; got shape {list(array.shape)}", field="noise")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInputError("noise contains NaN or infinity; send finite values", field="noise")
    with np.errstate(over="ignore"):  # beyond float32's range becomes infinity, refused just below
        narrowed = array.astype(np.float32)
    if not np.isfinite(narrowed).all():  # finite as sent (float64), too large for the policy's float32
        biggest = float(np.abs(array.astype(np.float64)).max())
        raise InvalidInputError(f"noise holds {biggest:g}, beyond float32's range (±{np.finfo(np.float32).max:g}) "
                                "in which the policy samples; send standard normal noise", field="noise")
    return narrowed


def encode_chunk(request: ActionPredictRequest, chunk: ActionChunk) -> dict:
    """An ``ActionChunk`` as the HTTP reply's fields."""
    return {"actions": {k: v.tolist() for k, v in chunk.actions.items()}, "action_chunk": chunk.action_chunk.tolist(),
            "first_action_index": chunk.first_action_index, "n_action_steps": chunk.n_action_steps,
            "action_fields": chunk.action_fields, "num_inference_steps": chunk.num_inference_steps,
            "checkpoint_step": chunk.checkpoint_step, "seed": chunk.seed, "session_id": request.session_id,
            "timestamp": chunk.timestamp, "step": chunk.step, "valid_until": chunk.valid_until,
            "timing_ms": chunk.timing_ms}


def check_predict(pipeline: ActionServing, request: ActionPredictRequest) -> tuple[PolicyRequest, Optional[int]]:
    sample = request.observation.parse(pipeline, request, "observation", request.past_actions)
    policy_request = PolicyRequest(sample, request.seed, _noise(request.noise), request.timestamp, request.step,
                                   request.received_at)
    pipeline.check_request(policy_request)
    return policy_request, request.num_inference_steps


def predict_each(pipeline: ActionServing, checked: list[tuple[PolicyRequest, Optional[int]]]) -> list:
    steps = checked[0][1]  # the same for all: it is the batch key
    return pipeline.predict_each([policy_request for policy_request, _ in checked], num_inference_steps=steps)


# Several robots' chunks in one model call (they share ``batch_key``); each equals the one the request gets alone:
# its own seed or noise, its own past actions. A request refused before the model runs (stale, bad observation)
# fails alone.
predict = checked_batch(check_predict, predict_each)


def batch_key(request: ActionPredictRequest) -> tuple:
    return ("steps", request.num_inference_steps)  # one sampling loop per call


def begin_sessions(items: list, begin: Callable[[Any, Any], Any]) -> list:
    """``begin(request, session)`` for each (request, session) pair: its ``PendingPlan``, or the exception
    that request alone raised (recorded nothing further; its neighbours go on)."""
    begun = []
    for request, session in items:
        try:
            begun.append(begin(request, session))
        except Exception as e:  # this request's own refusal
            begun.append(e)
    return begun


def finish_sessions(pipeline: ActionServing, begun: list) -> list:
    """The begun plans' results (``run_plans``: their predictions in one batched call), each in place of its
    plan; a request refused at ``begin`` keeps its exception. Never raises (a begun session must not be begun
    again)."""
    plans = [b for b in begun if not isinstance(b, Exception)]
    results = iter(run_plans(pipeline, plans))
    return [b if isinstance(b, Exception) else next(results) for b in begun]


def session_predict(pipeline: ActionServing, items: list[tuple[ActionPredictRequest, Any]]) -> list:
    """Chunk mode of several robots' sessions (each robot may send only its current step; its session fills in
    the rest) in one model call; one ``ActionChunk`` per (request, session), or that request's exception."""

    def begin(request: ActionPredictRequest, session):
        observation = request.observation
        past = None if request.past_actions is None else {k: decode_numbers(v, f"past_actions.{k}")
                                                          for k, v in request.past_actions.items()}
        return session.begin_chunk(observation.decoded_frames(request, "observation"),
                                   observation.decoded_lowdim("observation"), observation.language_instruction or "",
                                   step=request.step, past_actions=past,
                                   num_inference_steps=request.num_inference_steps, seed=request.seed,
                                   noise=_noise(request.noise), timestamp=request.timestamp,
                                   digest=observation.made_digest, received_at=request.received_at)

    return finish_sessions(pipeline, begin_sessions(items, begin))


class PolicySample(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    observation: Observation
    actions: dict[str, Any] = Field(..., description="Action field → [P+1+F][d] raw actions around the "
                                                     "observation (P executed, then the current and F future).")


class ActionEvaluateRequest(RequestBase):
    samples: list[PolicySample] = Field(..., min_length=1)
    condition_on_past: StrictBool = Field(True, description="Feed the P past rows clean, as at inference (they are "
                                                      "not scored); false scores every row.")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63, description="Fixes the noise and timesteps.")

    @model_validator(mode="after")
    def _check(self):
        if len(self.samples) > self.cap_batch:
            raise InvalidInputError(f"at most {self.cap_batch} samples per request (VLA_MAX_BATCH); got "
                                    f"{len(self.samples)}", field="samples")
        return self


class ActionEvaluateResponse(ResponseBase):
    loss: float
    num_samples: int
    num_action_rows: int
    timesteps: list[int]
    seed: int


def check_evaluate(pipeline: ActionServing, request: ActionEvaluateRequest) -> PolicyEvaluation:
    samples, windows = [], []
    for i, s in enumerate(request.samples):
        samples.append(s.observation.parse(pipeline, request, f"samples[{i}].observation"))
        raw = {k: decode_numbers(v, f"samples[{i}].actions.{k}") for k, v in s.actions.items()}
        windows.append(parse_action_window(raw, pipeline.robot_io, f"samples[{i}].actions"))
    return PolicyEvaluation(samples, windows, request.seed, request.condition_on_past)


def evaluate_each(pipeline: ActionServing, evaluations: list[PolicyEvaluation]) -> list:
    return pipeline.evaluate_each(evaluations)


# Several clients' evaluations in one forward pass; each gets the loss it would get alone (its seed's noise and
# timesteps, reduced over its own rows).
evaluate = checked_batch(check_evaluate, evaluate_each)

# Only small evaluations share a call, so a shared call of max_batch_size of them is never much larger than what
# one request may be alone (VLA_MAX_BATCH samples); a larger one runs alone.
SHARED_EVALUATION_SAMPLES = 8


def evaluate_batch_key(request: ActionEvaluateRequest) -> Optional[str]:
    return "evaluate" if len(request.samples) <= SHARED_EVALUATION_SAMPLES else None


def _may_be_sent_again(request) -> bool:
    """A session's request with a ``step``: its observation's digest is made before it queues (``digest``)."""
    return getattr(request, "session_id", None) is not None and request.step is not None


def _prepare_predict(request: ActionPredictRequest) -> None:
    request.observation.decoded_frames(request, "observation")
    if _may_be_sent_again(request):
        request.observation.digest(request, "observation", request.past_actions)


def _prepare_evaluate(request: ActionEvaluateRequest) -> None:
    total = sum(s.observation.frame_count() for s in request.samples)
    if total > request.cap_images:  # the cap is per request, whatever the number of samples
        raise InvalidInputError(f"samples: {total} frames in all, over this server's limit of {request.cap_images} "
                                "per request (VLA_MAX_IMAGES); send fewer samples", "samples")
    for i, s in enumerate(request.samples):
        s.observation.decoded_frames(request, f"samples[{i}].observation")


def _prepare(request) -> None:
    (_prepare_predict if isinstance(request, ActionPredictRequest) else _prepare_evaluate)(request)


def _prepare_on_loop(request) -> bool:
    return (isinstance(request, ActionPredictRequest) and request.observation.raw_frames_only()
            and not _may_be_sent_again(request))  # (a digest of its frames is work for the thread pool)


async def decode_observation_frames(request: RequestBase) -> None:
    """Decode the frames of a request's ``observation`` before it queues (the session and websocket routes):
    raw frames on the event loop, encoded ones in the thread pool."""
    observation: Observation = request.observation
    if request.step is not None:  # it may be a step sent again: the digest of what it sent, made in the pool too
        await run_in_threadpool(observation.digest, request, "observation", getattr(request, "past_actions", None))
    elif observation.raw_frames_only():
        observation.decoded_frames(request, "observation")
    else:
        await run_in_threadpool(observation.decoded_frames, request, "observation")


def expires(pipeline: ActionServing, request: ActionPredictRequest) -> Optional[float]:
    """A chunk that could only start after its own valid_until is never computed."""
    return pipeline.chunk_expiry(request.timestamp)


ADAPTER = ModalityAdapter(ActionPredictRequest, ActionPredictResponse, predict,
                          ActionEvaluateRequest, ActionEvaluateResponse, evaluate, encode_predict=encode_chunk,
                          batch_key=batch_key, prepare=_prepare, prepare_on_loop=_prepare_on_loop,
                          session_predict=session_predict, expires=expires,
                          evaluate_batch_key=evaluate_batch_key)
