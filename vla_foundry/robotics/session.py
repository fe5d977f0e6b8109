"""One robot's running episode against a policy: what it sent, what it was told to do.

``PolicySession`` lets a robot send only the current step (one frame per camera, the current
proprioception row): its ``ObservationHistory`` fills in the past frames, rows and executed
actions the policy's window needs. Two ways to drive it:

- ``chunk(...)``: a whole action chunk per call; the robot executes ``n_action_steps`` and asks
  again (without a step index, the next call is taken to be that many steps later);
- ``step(...)``: one action per control step; the policy replans every ``open_loop_steps``
  steps (or when the robot's step leaves the current plan) and hands out the plan in between.

Seeds: a session seeded ``s`` uses ``s + k`` for its k-th plan, so an episode replays exactly.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

import numpy as np

from vla_foundry.errors import InvalidInputError
from vla_foundry.robotics.history import ObservationHistory
from vla_foundry.robotics.observations import _check_keys, _numbers


def _depth(value) -> int:
    """Nesting depth of a list value (0 for a scalar)."""
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        value, depth = value[0], depth + 1
    return depth


class PolicySession:
    def __init__(self, pipeline, *, open_loop_steps: Optional[int] = None, seed: Optional[int] = None):
        self.pipeline = pipeline
        self.io = pipeline.robot_io
        self.open_loop_steps = open_loop_steps or pipeline.open_loop_steps
        self.history = ObservationHistory(self.io)
        self.reset(seed)

    def reset(self, seed: Optional[int] = None) -> None:
        self.history.reset()
        self.seed = secrets.randbits(62) if seed is None else seed
        self.plans = 0
        self.plan_step: Optional[int] = None  # the step the current plan starts at
        self.plan_length = 0  # actions in the current plan (current + future)
        self.steps_served = 0  # step mode: actions handed out from the current plan

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
            for i, row in enumerate(rows):
                self.history.record(step - (n - 1) + i, lowdim={name: row})

    def _next_step(self, step: Optional[int], default_advance: int) -> int:
        last = self.history.last_step
        if step is None:
            return 0 if last is None else last + default_advance
        if last is not None and step < last:
            raise InvalidInputError(f"step {step} is before this session's last step {last}; reset the session "
                                    "to start a new episode", field="step")
        return step

    def _plan(self, step: int, instruction: str, predict_kwargs: dict) -> dict[str, Any]:
        observation = self.history.assemble(step, instruction)
        if self.pipeline.uses_language and not instruction.strip():
            raise InvalidInputError("observation.language_instruction is required: this policy is conditioned on "
                                    "language", field="observation.language_instruction")
        seed = predict_kwargs.pop("seed", None)
        out = self.pipeline.predict([observation], seed=self.seed + self.plans if seed is None else seed,
                                    **predict_kwargs)
        self.plans += 1
        first = out["first_action_index"]
        planned = out["action_chunk"][0, first:]  # (F+1, A): steps step … step+F
        self.history.record_plan(step, planned)
        self.plan_step, self.plan_length, self.steps_served = step, planned.shape[0], 0
        return out

    # ------------------------------------------------------------------ the two modes

    def chunk(self, images: dict, lowdim: dict, instruction: str = "", *, step: Optional[int] = None,
              past_actions: Optional[dict] = None, **predict_kwargs) -> dict[str, Any]:
        """A whole chunk for the current step; the pipeline's ``predict`` output plus ``step``.

        ``past_actions`` (field → (P, d)), when the robot sends them, replace what the session
        believes it executed.
        """
        step = self._next_step(step, self.pipeline.n_action_steps)
        self._record(step, images, lowdim, "observation")
        if past_actions is not None:
            io = self.io
            _check_keys(past_actions, io.action_fields, "past_actions", "action field")
            rows = np.concatenate([_numbers(past_actions[f], (io.past_steps, io.field_dims[f]), f"past_actions.{f}")
                                   for f in io.action_fields], axis=-1)  # (P, A)
            self.history.record_plan(step - io.past_steps, rows)
        out = self._plan(step, instruction, predict_kwargs)
        return {**out, "step": step}

    def step(self, images: dict, lowdim: dict, instruction: str = "", *, step: Optional[int] = None,
             **predict_kwargs) -> dict[str, Any]:
        """The action for the current step: from the current plan, or a new plan every ``open_loop_steps``."""
        step = self._next_step(step, 1)
        self._record(step, images, lowdim, "observation")
        in_plan = self.plan_step is not None and 0 <= step - self.plan_step < self.plan_length
        replan = not in_plan or self.steps_served >= self.open_loop_steps
        out = self._plan(step, instruction, predict_kwargs) if replan else None
        action = self.history.actions[step]
        self.steps_served += 1
        result = {"step": step, "replanned": replan, "plan_step": self.plan_step, "action": action,
                  "actions": self._split(action)}
        if out is not None:
            result.update(seed=out["seed"], num_inference_steps=out["num_inference_steps"],
                          timing_ms=out["timing_ms"])
        return result

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
