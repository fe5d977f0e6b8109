"""A robot's recent past, so it can send only the current step.

``ObservationHistory`` records what one robot sent at each control step (frames per
camera, proprioception rows) and the actions it was told to execute, and assembles the
window a policy needs at step s: the frame of image index k is the one of step s + k, the
proprioception rows are steps s−P … s, the past actions steps s−P … s−1. A step the robot
never sent (it executed a chunk in between, or the episode just began) takes the nearest
earlier one, else the oldest ("copy" padding, as VLA Foundry pads its windows). Past
actions are given only when all P are known.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from vla_foundry.robotics.observations import RawObservation
from vla_foundry.robotics.robot_io import RobotIO


class ObservationHistory:
    def __init__(self, robot_io: RobotIO, keep_steps: Optional[int] = None):
        self.io = robot_io
        # steps back from a window's step that its frames, rows and past actions reach
        self.span = span = max(-min(robot_io.image_indices + [0]), robot_io.past_steps) + 1
        self.keep_steps = keep_steps or span + 64  # how far back anything can be asked for, with room for chunks
        self.frames: dict[str, dict[int, np.ndarray]] = {c: {} for c in robot_io.camera_names}  # camera → step → frame
        self.lowdim: dict[str, dict[int, np.ndarray]] = {f: {} for f in robot_io.proprioception_fields}  # → (d,)
        self.actions: dict[int, np.ndarray] = {}  # step → (A,) action the robot was told to execute
        self.last_step: Optional[int] = None

    def reset(self) -> None:
        for table in (*self.frames.values(), *self.lowdim.values(), self.actions):
            table.clear()
        self.last_step = None

    def record(self, step: int, frames: Optional[dict[str, np.ndarray]] = None,
               lowdim: Optional[dict[str, np.ndarray]] = None) -> None:
        """A frame per camera and/or a proprioception row (d,) per field seen at ``step``."""
        for camera, frame in (frames or {}).items():
            self.frames[camera][step] = frame
        for field, row in (lowdim or {}).items():
            self.lowdim[field][step] = np.asarray(row, np.float32).reshape(-1)
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        self._forget()

    def snapshot(self) -> tuple:
        """What ``rollback`` needs to undo every later ``record``, ``record_plan`` and ``reset`` (the tables' entries
        are never changed in place, so copies of the tables are enough)."""
        return ({c: dict(t) for c, t in self.frames.items()}, {f: dict(t) for f, t in self.lowdim.items()},
                dict(self.actions), self.last_step)

    def rollback(self, snapshot: tuple) -> None:
        """This history as it was when ``snapshot`` was taken."""
        frames, lowdim, actions, self.last_step = snapshot
        for tables, saved in ((self.frames, frames), (self.lowdim, lowdim)):
            for name, table in tables.items():
                table.clear()
                table.update(saved[name])
        self.actions.clear()
        self.actions.update(actions)

    def has(self, step: int) -> bool:
        """Whether ``step`` has every camera's frame and every proprioception row."""
        return all(step in t for t in (*self.frames.values(), *self.lowdim.values()))

    def record_plan(self, first_step: int, actions: np.ndarray) -> None:
        """Actions (n, A) the robot will execute at steps first_step, first_step+1, …"""
        for i, action in enumerate(np.asarray(actions, np.float32)):
            self.actions[first_step + i] = action

    def _forget(self) -> None:
        horizon = self.last_step - self.keep_steps
        for table in (*self.frames.values(), *self.lowdim.values(), self.actions):
            for step in [s for s in table if s < horizon]:
                del table[step]

    def export(self) -> dict[str, Any]:
        """What any later step can still read, as plain data (step-keyed tables of arrays): a step is never before
        ``last_step``, so a window reaches back to ``last_step − span`` at most, and a step the robot did not send
        there takes the newest one before it. Per table, the entries from ``last_step − span`` on, and the newest
        before them. A history ``restore``d from it assembles every later window exactly as this one would."""
        if self.last_step is None:
            return {"last_step": None, "frames": {}, "lowdim": {}, "actions": {}}
        bound = self.last_step - self.span

        def kept(table: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
            rows = {s: a for s, a in table.items() if s >= bound}
            older = [s for s in table if s < bound]
            if older:
                rows[max(older)] = table[max(older)]
            return rows

        return {"last_step": self.last_step, "frames": {c: kept(t) for c, t in self.frames.items()},
                "lowdim": {f: kept(t) for f, t in self.lowdim.items()}, "actions": kept(self.actions)}

    def restore(self, state: dict[str, Any]) -> None:
        """This history becomes the one ``state`` (an ``export``) was taken from, as far as later steps can tell."""
        self.reset()
        self.last_step = state["last_step"]
        for tables, saved in ((self.frames, state["frames"]), (self.lowdim, state["lowdim"])):
            for name, table in tables.items():
                table.update({int(s): np.array(a) for s, a in saved.get(name, {}).items()})
        self.actions.update({int(s): np.array(a, np.float32) for s, a in state["actions"].items()})

    @staticmethod
    def _at_or_before(table: dict[int, np.ndarray], step: int) -> np.ndarray:
        earlier = [s for s in table if s <= step]
        return table[max(earlier)] if earlier else table[min(table)]

    def assemble(self, step: int, instruction: str) -> RawObservation:
        """The policy's input at ``step`` (which must have been recorded)."""
        io = self.io
        images = {f"{camera}_t{index}": self._at_or_before(self.frames[camera], step + index)
                  for index in io.image_indices for camera in io.camera_names}
        lowdim = {f: np.stack([self._at_or_before(self.lowdim[f], s) for s in range(step - io.past_steps, step + 1)])
                  for f in io.proprioception_fields}
        past = None
        wanted = range(step - io.past_steps, step)
        if io.past_steps and all(s in self.actions for s in wanted):
            stacked = np.stack([self.actions[s] for s in wanted])  # (P, A)
            past, start = {}, 0
            for f in io.action_fields:
                d = io.field_dims[f]
                past[f] = stacked[:, start:start + d]
                start += d
        return RawObservation(images, lowdim, instruction, past)
