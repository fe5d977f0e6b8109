"""One robot's running episode against a policy: what it sent, what it was told to do.

``PolicySession`` lets a robot send only the current step (one frame per camera, the current
proprioception row): its ``ObservationHistory`` fills in the past frames, rows and executed
actions the policy's window needs. Two ways to drive it:

- ``chunk(...)``: a whole action chunk per call; the robot executes ``n_action_steps`` and asks
  again (without a step index, the next call is taken to be that many steps later);
- ``step(...)``: one action per control step; the policy replans every ``open_loop_steps``
  steps (or when the robot's step leaves the current plan) and hands out the plan in between.

Seeds: a session seeded ``s`` uses ``s + k`` for its k-th plan, so an episode replays exactly.

Results are typed: chunk mode returns the pipeline's ``ActionChunk`` (with the session's
step), step mode an ``ActionStep``; both carry ``valid_until`` from the observation's
``timestamp`` (a stale one is refused before anything is recorded).

A request sent again (its reply was lost) is known by its step number, timestamp and observation: a
request with the ``step``, ``timestamp`` and observation (frames, rows, instruction, past actions; a
digest of them) of the session's last answer gets that answer again, in either mode, and changes
nothing (the session keeps its last answer, ``served``); another timestamp or observation for that
step is refused. A request without a step number is always a new one.

Batching: ``begin_chunk`` / ``begin_step`` record the robot's input and return a
``PendingPlan`` (the ``PolicyRequest`` the plan needs, or no request when step mode hands out
an action of the current plan); the caller runs the requests of many sessions in one
``ActionPipeline.predict_each`` call and hands each output to its ``finish``. ``chunk`` and
``step`` do both for one session. A request refused at its begin, or whose prediction fails,
leaves its session as it was before (``PendingPlan.undo``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from vla_foundry.errors import InvalidInputError, StaleObservationError
from vla_foundry.robotics.history import ObservationHistory
from vla_foundry.robotics.observations import _check_keys, _numbers


@dataclass
class PendingPlan:
    """A session's call half done: ``request`` for the pipeline (None: nothing to predict), then
    ``finish(output)`` with that request's ``predict_each`` output (or None) gives the session's reply."""

    request: Any  # vla_foundry.pipelines.action.PolicyRequest, or None
    num_inference_steps: Optional[int]
    finish: Callable[[Any], Any]  # ActionChunk or None → the session's result
    undo: Callable[[], None] = lambda: None  # the session as it was before this plan began (its request failed)


@dataclass
class ActionStep:
    """Step mode's answer: the action to execute at ``step``."""

    step: int
    action: np.ndarray  # (A,): the action fields concatenated
    actions: dict[str, list]  # action field → [d]
    replanned: bool  # whether this step ran the policy (else the action comes from the plan made at plan_step)
    plan_step: int
    valid_until: float  # the step's timestamp (else now) + one control period
    timestamp: Optional[float] = None  # the observation's, echoed
    seed: Optional[int] = None  # set when the step replanned, with the plan's sampling steps and timing
    num_inference_steps: Optional[int] = None
    timing_ms: dict[str, float] = dataclasses.field(default_factory=dict)


def _step_state(result: ActionStep) -> dict[str, Any]:
    """An ``ActionStep`` as plain data (a session's ``export``)."""
    return {**dataclasses.asdict(result), "action": np.asarray(result.action, np.float32).tolist()}


def _step_from_state(state: dict[str, Any]) -> ActionStep:
    return ActionStep(**{**state, "action": np.asarray(state["action"], np.float32)})


def _chunk_state(chunk) -> dict[str, Any]:
    """An ``ActionChunk`` as plain data (a session's ``export``; its arrays stay arrays, which a store packs)."""
    return dataclasses.asdict(chunk)


def _chunk_from_state(state: dict[str, Any]):
    from vla_foundry.pipelines.action import ActionChunk

    arrays = {name: np.asarray(state[name], np.float32) for name in ("action_chunk", "normalized_actions")}
    actions = {field: np.asarray(values, np.float32) for field, values in state["actions"].items()}
    return ActionChunk(**{**state, **arrays, "actions": actions})


# The digest kept for an answer to a request that named no step: no request is its resend (it is never hashed, to
# spare the frames' bytes; a request naming that step later is another observation of an answered step).
NAMED_NO_STEP = "named no step"


def observation_digest(images: dict, lowdim: dict, instruction: str, past_actions: Optional[dict] = None) -> str:
    """A digest of what a request sent (frames, rows, instruction, past actions): a request sent again must send
    the same. Frames are read as their bytes, rows as the float32 numbers the policy reads, in order (a [d] row and
    a [1][d] one, a JSON list and a typed array of the same numbers are the same), in name order; a value that is
    no array at all counts by its repr (such a request is refused later). About 1 ms per MB of frames."""
    h = hashlib.blake2b(digest_size=16)
    h.update(instruction.encode("utf-8", "surrogatepass"))
    for part, numbers in ((images, False), (lowdim, True), (past_actions, True)):
        h.update(b"\x00|")
        for name in sorted(part or {}):
            h.update(name.encode("utf-8", "surrogatepass") + b"\x00")
            value = part[name]
            for item in (value if isinstance(value, list) and not numbers else [value]):
                _digest_value(h, item, numbers)
    return h.hexdigest()


def _digest_value(h, value: Any, numbers: bool) -> None:
    try:
        array = np.ascontiguousarray(np.asarray(value, np.float32).reshape(-1) if numbers else value)
        if array.dtype.hasobject:
            raise TypeError("not an array of numbers")
    except (TypeError, ValueError, ArithmeticError):  # (10**400 overflows float32)
        h.update(b"repr:" + repr(value).encode("utf-8", "surrogatepass"))
        return
    h.update(str((array.dtype.str, array.shape)).encode())
    h.update(array.reshape(-1).view(np.uint8))


def _depth(value) -> int:
    """Nesting depth of a list value (0 for a scalar)."""
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        value, depth = value[0], depth + 1
    return depth


def run_plans(pipeline, pendings: list[PendingPlan]) -> list:
    """The pending plans of several sessions (one step count), their predictions in one ``predict_each``
    call; one reply per plan, or the exception that plan alone raised (a failing batched call is run
    again request by request, so one bad request fails only its own plan), whose session is then rolled
    back to before the plan began: a refused request changes nothing for the next one. Never raises."""
    wanted = [p for p in pendings if p.request is not None]
    steps = wanted[0].num_inference_steps if wanted else None
    try:
        outs = pipeline.predict_each([p.request for p in wanted], num_inference_steps=steps) if wanted else []
    except Exception:
        outs = []
        for p in wanted:
            try:
                (out,) = pipeline.predict_each([p.request], num_inference_steps=steps)
            except Exception as e:  # this request's own failure
                out = e
            outs.append(out)
    by_plan = dict(zip(map(id, wanted), outs))
    replies = []
    for p in pendings:
        out = by_plan.get(id(p))
        if not isinstance(out, Exception):
            try:
                out = p.finish(out)
            except Exception as e:  # this plan's own failure; a caller never runs a begun plan twice
                out = e
        if isinstance(out, Exception):
            p.undo()
        replies.append(out)
    return replies


class PolicySession:
    def __init__(self, pipeline, *, open_loop_steps: Optional[int] = None, seed: Optional[int] = None):
        self.pipeline = pipeline
        self.io = pipeline.robot_io
        self.open_loop_steps = open_loop_steps or pipeline.open_loop_steps
        self.history = ObservationHistory(self.io)
        self.reset(seed)

    def reset(self, seed: Optional[int] = None) -> None:
        self.history.reset()
        from vla_foundry.pipelines.text import new_seed  # (here: the pipelines import this module)

        self.seed = new_seed() if seed is None else seed  # (plan k uses seed + k: below 2^53 + k)
        self.plans = 0
        self.plan_step: Optional[int] = None  # the step the current plan starts at
        self.plan_length = 0  # actions in the current plan (current + future)
        self.steps_served = 0  # step mode: actions handed out from the current plan
        self.served: Optional[ActionStep] = None  # step mode: the last step's answer (a step sent again gets it)
        self.served_chunk = None  # chunk mode: the last request's ActionChunk (sent again with its step, it gets it)
        self.served_digest: Optional[str] = None  # what the last answered request sent (``observation_digest``)

    # ------------------------------------------------------------------ state (a session that moves)

    def export(self) -> dict[str, Any]:
        """The episode so far as plain data (numbers, and step-keyed arrays of its history's ``export``): what a
        session store keeps so that another process with the same policy can ``restore`` it and serve the next
        step exactly as this one would (seeds included: plan k uses seed + k)."""
        return {"seed": self.seed, "plans": self.plans, "plan_step": self.plan_step, "plan_length": self.plan_length,
                "steps_served": self.steps_served, "open_loop_steps": self.open_loop_steps,
                "served": None if self.served is None else _step_state(self.served),
                "served_chunk": None if self.served_chunk is None else _chunk_state(self.served_chunk),
                "served_digest": self.served_digest, "history": self.history.export()}

    @classmethod
    def restore(cls, pipeline, state: dict[str, Any]) -> "PolicySession":
        """The session whose ``export`` ``state`` is, on ``pipeline`` (the same policy)."""
        session = cls(pipeline, seed=state["seed"])
        session.load(state)
        return session

    def load(self, state: dict[str, Any]) -> None:
        """This session becomes the one whose ``export`` ``state`` is (in place: holders of it see the change)."""
        self.open_loop_steps, self.seed, self.plans = state["open_loop_steps"], state["seed"], state["plans"]
        self.plan_step, self.plan_length, self.steps_served = (state["plan_step"], state["plan_length"],
                                                                state["steps_served"])
        served = state.get("served")  # absent in a state stored before steps were remembered
        self.served = None if served is None else _step_from_state(served)
        served_chunk = state.get("served_chunk")  # absent in a state stored before chunks were remembered
        self.served_chunk = None if served_chunk is None else _chunk_from_state(served_chunk)
        self.served_digest = state.get("served_digest")  # absent before observations were compared
        self.history.restore(state["history"])

    def _undo_point(self) -> Callable[[], None]:
        """A function that puts this session back as it is now (a begun plan whose request failed)."""
        counters = (self.seed, self.plans, self.plan_step, self.plan_length, self.steps_served, self.served,
                    self.served_chunk, self.served_digest)
        history = self.history.snapshot()

        def undo() -> None:
            (self.seed, self.plans, self.plan_step, self.plan_length, self.steps_served, self.served,
             self.served_chunk, self.served_digest) = counters
            self.history.rollback(history)

        return undo

    # ------------------------------------------------------------------ input

    def _record(self, step: int, images: dict, lowdim: dict, prefix: str) -> None:
        """Frames (one per camera, or one per image index, oldest first) and proprioception ((d,), (1, d) or
        (P+1, d)) of ``step``, checked against the policy's contract."""
        io = self.io
        _check_keys(images or {}, io.camera_names, f"{prefix}.images", "camera")
        _check_keys(lowdim or {}, io.proprioception_fields, f"{prefix}.lowdim", "proprioception field")
        for camera, frames in images.items():
            frames = frames if isinstance(frames, list) else [frames]
            if len(frames) == 1:
                self.history.record(step, frames={camera: frames[0]})
            elif len(frames) == len(io.image_indices):
                for index, frame in zip(io.image_indices, frames):
                    self.history.record(step + index, frames={camera: frame})
            else:
                raise InvalidInputError(
                    f"{prefix}.images.{camera}: {len(frames)} frames; send the current one, or one per image "
                    f"index {io.image_indices} (oldest first)", field=f"{prefix}.images.{camera}")
        for name, value in lowdim.items():
            d, where = io.field_dims[name], f"{prefix}.lowdim.{name}"
            depth = np.ndim(value) if isinstance(value, np.ndarray) else _depth(value)
            n = 1 if depth <= 1 else len(value)
            if n not in (1, io.past_steps + 1):
                raise InvalidInputError(f"{where}: {n} rows; send the current [d] row, or the last "
                                        f"{io.past_steps + 1} rows [P+1][d], oldest first", field=where)
            rows = _numbers(value, (d,) if depth <= 1 else (n, d), where).reshape(n, d)
            # Checked now, whether this request replans or not: a row the model would overflow on, recorded by a
            # step that only hands out its plan, would fail every later plan whose window holds it.
            self.pipeline.check_magnitudes(name, rows, where)
            for i, row in enumerate(rows):
                self.history.record(step - (n - 1) + i, lowdim={name: row})

    def _sent_again(self, served: Any, step: Optional[int], timestamp: Optional[float], digest: Optional[str]
                    ) -> Any:
        """``served`` (the session's last answer) when this request is it sent again: the same step number,
        timestamp and observation (its reply was lost: a timeout, a replica that died after its save). Else None: a
        new request. Another observation of a step already answered is refused: its answer stands."""
        if step is None or served is None or step != served.step:
            return None
        if timestamp != served.timestamp:
            raise StaleObservationError(
                f"step {step} was answered already (for the observation of timestamp {served.timestamp}); sent "
                "again it gets that answer only with that timestamp: send the next step", field="step")
        if self.served_digest == NAMED_NO_STEP:  # its answer came to a request that named no step: none is its resend
            raise StaleObservationError(
                f"step {step} was answered already, for a request that named no step (its observation was not kept); "
                "a request sent again names the step only if it did the first time: send the next step", field="step")
        if self.served_digest is not None and digest is not None and digest != self.served_digest:
            raise StaleObservationError(
                f"step {step} was answered already, for another observation (frames, rows, instruction or past "
                "actions differ); sent again it gets that answer only with the same observation: send the next "
                "step", field="step")
        return served

    def _next_step(self, step: Optional[int], default_advance: int) -> int:
        last = self.history.last_step
        if step is None:
            return 0 if last is None else last + default_advance
        if last is not None and step < last:
            raise InvalidInputError(f"step {step} is before this session's last step {last}; reset the session "
                                    "to start a new episode", field="step")
        return step

    def _plan_request(self, step: int, instruction: str, seed: Optional[int], noise: Any,
                      timestamp: Optional[float], received_at: Optional[float] = None):
        from vla_foundry.pipelines.action import PolicyRequest

        observation = self.history.assemble(step, instruction)
        if self.pipeline.uses_language and not instruction.strip():
            raise InvalidInputError("observation.language_instruction is required: this policy is conditioned on "
                                    "language", field="observation.language_instruction")
        request = PolicyRequest(observation, self.seed + self.plans if seed is None else seed, noise, timestamp, step,
                                received_at)
        self.pipeline.check_request(request)  # refused here, it never joins (and fails) a batch
        return request

    def _adopt_plan(self, step: int, out) -> None:
        self.plans += 1
        self.served = self.served_chunk = None  # a new plan: no earlier answer stands for a request sent again
        planned = out.action_chunk[out.first_action_index:]  # (F+1, A): steps step … step+F
        self.history.record_plan(step, planned)
        self.plan_step, self.plan_length, self.steps_served = step, planned.shape[0], 0

    # ------------------------------------------------------------------ the two modes

    def begin_chunk(self, images: dict, lowdim: dict, instruction: str = "", *, step: Optional[int] = None,
                    past_actions: Optional[dict] = None, num_inference_steps: Optional[int] = None,
                    seed: Optional[int] = None, noise: Any = None, timestamp: Optional[float] = None,
                    digest: Optional[str] = None, received_at: Optional[float] = None) -> PendingPlan:
        """Chunk mode's first half: records the current step; ``finish`` returns the pipeline's ``ActionChunk``
        for this request, with ``step``.

        ``past_actions`` (field → (P, d)), when the robot sends them, replace what the session
        believes it executed. The last request sent again (its ``step`` and ``timestamp``) gets its chunk again
        and changes nothing (``_sent_again``); ``digest``: its ``observation_digest`` where the caller made it already
        (off a model thread), else it is made here when the request has a ``step`` (one without is never sent
        again).
        """
        self.pipeline.anchor(timestamp)  # a stale observation is refused before it is recorded
        if step is None:
            digest = NAMED_NO_STEP
        elif digest is None:
            digest = observation_digest(images, lowdim, instruction, past_actions)
        served = self._sent_again(self.served_chunk, step, timestamp, digest)
        if served is not None:  # planned once only: a retry never shifts the session's history, seeds or plans
            replayed = dataclasses.replace(served, timing_ms={"preprocess": 0.0})  # (it ran no model: no model times)
            return PendingPlan(None, num_inference_steps, lambda _: replayed)
        undo = self._undo_point()
        try:
            step = self._next_step(step, self.pipeline.n_action_steps)
            self._record(step, images, lowdim, "observation")
            if past_actions is not None:
                io = self.io
                _check_keys(past_actions, io.action_fields, "past_actions", "action field")
                rows = np.concatenate([_numbers(past_actions[f], (io.past_steps, io.field_dims[f]),
                                                f"past_actions.{f}") for f in io.action_fields], axis=-1)  # (P, A)
                self.history.record_plan(step - io.past_steps, rows)
            request = self._plan_request(step, instruction, seed, noise, timestamp, received_at)
        except BaseException:  # refused: nothing of it stays recorded
            undo()
            raise

        def finish(out):
            self._adopt_plan(step, out)
            self.served_chunk, self.served_digest = out, digest
            return out

        return PendingPlan(request, num_inference_steps, finish, undo)

    def begin_step(self, images: dict, lowdim: dict, instruction: str = "", *, step: Optional[int] = None,
                   num_inference_steps: Optional[int] = None, timestamp: Optional[float] = None,
                   digest: Optional[str] = None, received_at: Optional[float] = None) -> PendingPlan:
        """Step mode's first half: records the current step; a request only when a new plan is due (every
        ``open_loop_steps``, or when the robot's step leaves the current plan). ``finish`` returns an
        ``ActionStep``. ``received_at``: when the server received the step (its action's ``valid_until`` counts from
        there when it has no ``timestamp``)."""
        from vla_foundry.pipelines.action import observed_at

        # (a stale observation is refused before it is recorded)
        anchor = observed_at(timestamp, received_at, self.pipeline.anchor(timestamp))
        if step is None:
            digest = NAMED_NO_STEP
        elif digest is None:
            digest = observation_digest(images, lowdim, instruction)
        served = self._sent_again(self.served, step, timestamp, digest)
        if served is not None:  # it gets the answer it got: a retry never shifts the session's plans
            replayed = dataclasses.replace(served, timing_ms={"preprocess": 0.0})  # (it ran no model: no model times)
            return PendingPlan(None, num_inference_steps, lambda _: replayed)
        undo = self._undo_point()
        try:
            step = self._next_step(step, 1)
            self._record(step, images, lowdim, "observation")
            in_plan = self.plan_step is not None and 0 <= step - self.plan_step < self.plan_length
            # every open_loop_steps control steps, counted in steps (a robot may skip some), not in answers
            replan = (not in_plan or step - self.plan_step >= self.open_loop_steps
                      or self.steps_served >= self.open_loop_steps)
            request = self._plan_request(step, instruction, None, None, timestamp, received_at) if replan else None
        except BaseException:  # refused: nothing of it stays recorded
            undo()
            raise

        def finish(out) -> ActionStep:
            if out is not None:
                self._adopt_plan(step, out)
            action = self.history.actions[step]
            self.steps_served += 1
            result = ActionStep(step, action, self._split(action), replan, self.plan_step,
                                self.pipeline.valid_until(anchor, 1), timestamp)
            if out is not None:
                result.seed, result.num_inference_steps = out.seed, out.num_inference_steps
                result.timing_ms = dict(out.timing_ms)
            # only the last answer stands for a request sent again
            self.served, self.served_chunk, self.served_digest = result, None, digest
            return result

        return PendingPlan(request, num_inference_steps, finish, undo)

    def run(self, pending: PendingPlan) -> Any:
        """A pending plan of this session alone: its prediction (if any), then ``finish``."""
        (reply,) = run_plans(self.pipeline, [pending])
        if isinstance(reply, Exception):
            raise reply
        return reply

    def chunk(self, images: dict, lowdim: dict, instruction: str = "", **kwargs):
        """A whole chunk for the current step (``begin_chunk``'s arguments): an ``ActionChunk``."""
        return self.run(self.begin_chunk(images, lowdim, instruction, **kwargs))

    def step(self, images: dict, lowdim: dict, instruction: str = "", **kwargs) -> ActionStep:
        """The action for the current step (``begin_step``'s arguments)."""
        return self.run(self.begin_step(images, lowdim, instruction, **kwargs))

    def _split(self, action: np.ndarray) -> dict[str, list]:
        out, start = {}, 0
        for f in self.io.action_fields:
            d = self.io.field_dims[f]
            out[f] = action[start:start + d].tolist()
            start += d
        return out

    def info(self) -> dict[str, Any]:
        return {"last_step": self.history.last_step, "plans": self.plans, "plan_step": self.plan_step,
                "open_loop_steps": self.open_loop_steps}
