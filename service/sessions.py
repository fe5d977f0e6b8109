"""Per-robot sessions: one ``PolicySession`` per ``session_id``, bound to one deployment.

Requests of one session are serialized (an ``asyncio.Lock`` held across the model call), so
a robot's history is never interleaved; other sessions and deployments are not blocked by
it. Idle sessions expire after ``VLA_SESSION_IDLE_TIMEOUT_S``; at ``VLA_MAX_SESSIONS`` the
least recently used idle session is evicted to make room (503 when every one is busy).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from typing import Any, Awaitable

from service.errors import ApiError
from vla_foundry.robotics.session import PolicySession

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class SessionEntry:
    def __init__(self, session_id: str, deployment, policy: PolicySession):
        self.id = session_id
        self.deployment = deployment
        self.policy = policy
        self.lock = asyncio.Lock()
        self.created = self.last_used = time.time()
        self.requests = 0

    async def call(self, run: Awaitable[Any]) -> Any:
        """``run`` (this session's model call) under the session's lock, to completion: if the request is
        cancelled meanwhile, the lock is released only once the model thread is done with the session, so
        its next request (or a reset) never meets a half-recorded step."""
        async with self.lock:
            task = asyncio.ensure_future(run)
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                await asyncio.wait([task])
                raise

    def touch(self) -> None:
        self.last_used = time.time()
        self.requests += 1

    def info(self) -> dict[str, Any]:
        return {"session_id": self.id, "model": self.deployment.name, "created": self.created,
                "last_used": self.last_used, "idle_s": round(time.time() - self.last_used, 3),
                "requests": self.requests, "busy": self.lock.locked(), **self.policy.info()}


class SessionStore:
    def __init__(self, max_sessions: int, idle_timeout_s: float):
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._entries: "OrderedDict[str, SessionEntry]" = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def expire(self) -> None:
        now = time.time()
        for sid in [s for s, e in self._entries.items()
                    if not e.lock.locked() and now - e.last_used > self.idle_timeout_s]:
            del self._entries[sid]

    def get(self, session_id: str) -> SessionEntry:
        self.expire()
        if session_id not in self._entries:
            raise ApiError(404, f"no session {session_id!r} (never created, reset by eviction or idle for more than "
                                f"{self.idle_timeout_s:g} s); a predict or step request with this id starts it",
                           field="session_id")
        return self._entries[session_id]

    def acquire(self, session_id: str, deployment, **options: Any) -> SessionEntry:
        """The session ``session_id`` of ``deployment``, created on first use."""
        if not SESSION_ID.match(session_id):
            raise ApiError(422, f"session_id {session_id[:40]!r} must be 1-128 characters of letters, digits and "
                                "_ . : -", field="session_id")
        self.expire()
        entry = self._entries.get(session_id)
        if entry is not None:
            if entry.deployment is not deployment:
                raise ApiError(409, f"session {session_id!r} belongs to deployment {entry.deployment.name!r}, not "
                                    f"{deployment.name!r}; use another session_id or reset it there",
                               field="session_id")
        else:
            if len(self._entries) >= self.max_sessions:
                idle = next((sid for sid, e in self._entries.items() if not e.lock.locked()), None)
                if idle is None:
                    raise ApiError(503, f"all {self.max_sessions} sessions are busy (VLA_MAX_SESSIONS); retry "
                                        "shortly", retry_after=1, type="overloaded")
                del self._entries[idle]  # the least recently used idle session
            if deployment.pipeline is None:
                raise ApiError(503, f"deployment {deployment.name!r} is not ready ({deployment.status}); retry "
                                    "shortly", retry_after=5)
            if deployment.modality != "action":
                raise ApiError(422, f"deployment {deployment.name!r} ({deployment.model_type}) does not take robot "
                                    "sessions; sessions are for policies", field="model")
            entry = SessionEntry(session_id, deployment, PolicySession(deployment.pipeline, **options))
            self._entries[session_id] = entry
        self._entries.move_to_end(session_id)
        entry.touch()
        return entry

    def discard(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    def remove(self, session_id: str) -> None:
        self.get(session_id)
        del self._entries[session_id]

    def infos(self) -> list[dict[str, Any]]:
        self.expire()
        return [e.info() for e in self._entries.values()]
