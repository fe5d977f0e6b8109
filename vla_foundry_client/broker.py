"""``ActionChunkBroker``: one action per control step out of the server's action chunks."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


class ActionChunkBroker:
    """Hands out one action per ``act`` call, asking ``client`` for a new chunk only when the
    current one's first ``n_action_steps`` actions have been executed.

    ``client`` is an ``HttpPolicyClient`` or ``WebsocketPolicyClient`` (anything with
    ``infer(observation, **fields) -> dict``). Use it with a session (HTTP ``session_id=``, or any
    websocket connection) and each observation needs only the current step. ``n_action_steps``
    defaults to the server's (each reply says it).

    Every request carries the robot's step index (``act`` calls since ``reset``, failed ones included: a control
    step passes either way): a session then places the observation at the right step even when
    ``n_action_steps`` differs from the server's, or a reply was lost.
    """

    def __init__(self, client: Any, *, n_action_steps: Optional[int] = None):
        if n_action_steps is not None and n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1; got {n_action_steps}")
        self.client = client
        self.n_action_steps = n_action_steps
        self.last_reply: Optional[dict[str, Any]] = None  # the reply the current chunk came from
        self.inferences = 0  # chunks asked for since construction
        self.reset_state()

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        """The (A,) action to execute now. ``observation`` is sent only when a new chunk is needed."""
        if self._next >= len(self._chunk):
            try:
                self._request_chunk(observation)
            except BaseException:
                # The control step passes without an action: the next request is the next step's. (Its step may have
                # been answered, a reply lost on the way: that step sent again with another observation is refused.)
                self.step += 1
                raise
        action = self._chunk[self._next]
        self._next += 1
        self.step += 1
        return action

    def reset(self) -> None:
        """A new episode: drop the current chunk, restart the step count, and have the server's session
        (if the client has one) forget its history."""
        self.reset_state()
        if getattr(self.client, "session_id", None) is not None:
            self.client.reset()

    def reset_state(self) -> None:
        """Drop the current chunk and restart the step count, leaving the server alone."""
        self.step = 0
        self._chunk = np.zeros((0, 0), np.float32)  # actions still to hand out come from rows _next …
        self._next = 0

    def _request_chunk(self, observation: dict[str, Any]) -> None:
        reply = self.client.infer(observation, step=self.step)
        self.inferences += 1
        if "first_action_index" in reply:  # HTTP: the chunk's first rows are the past
            chunk = np.asarray(reply["action_chunk"], np.float32)[reply["first_action_index"]:]
        else:  # websocket (openpi): row 0 is already the current step
            chunk = np.asarray(reply["actions"], np.float32)
        n = self.n_action_steps or reply["n_action_steps"]
        if len(chunk) == 0:
            raise RuntimeError("the server returned an empty action chunk")
        self._chunk, self._next, self.last_reply = chunk[:n], 0, reply
