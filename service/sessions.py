"""Per-robot sessions: one ``PolicySession`` per ``session_id``, bound to one deployment and to the API key
that made it.

Requests of one session are serialized (an ``asyncio.Lock`` held across the model call), so
a robot's history is never interleaved; other sessions and deployments are not blocked by
it. Idle sessions expire after ``VLA_SESSION_IDLE_TIMEOUT_S``; at ``VLA_MAX_SESSIONS`` the
least recently used idle session is evicted to make room (503 when every one is busy).

A session is its key's alone: another key neither lists, steps, resets nor deletes it (404, as
for an unknown id; 409 when it would take the id). A robot whose session expired or was evicted
is told so (409 ``session_gone``) instead of silently starting a new history: it resets the
session (``POST /sessions/{id}/reset``) to begin a new episode under the same id.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from typing import Any, Awaitable, Optional

from service.errors import ApiError
from vla_foundry.robotics.session import PolicySession

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class SessionEntry:
    def __init__(self, session_id: str, deployment, policy: PolicySession, owner: Optional[str] = None):
        self.id = session_id
        self.deployment = deployment
        self.policy = policy
        self.owner = owner  # the id of the API key that made it (None: the server has no keys)
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
        # Sessions that expired or were evicted: id → (why, owner), newest last, so their robots hear of it.
        self._gone: "OrderedDict[str, tuple[str, Optional[str]]]" = OrderedDict()
        self.max_gone = max(1024, 4 * max_sessions)
        self._seeds: dict[str, int] = {}  # a gone session reset with a seed: the seed of its new episode

    def __len__(self) -> int:
        return len(self._entries)

    def _bury(self, session_id: str, why: str) -> None:
        entry = self._entries.pop(session_id)
        self._gone[session_id] = (why, entry.owner)
        self._gone.move_to_end(session_id)
        while len(self._gone) > self.max_gone:
            self._gone.popitem(last=False)

    def expire(self) -> None:
        now = time.time()
        for sid in [s for s, e in self._entries.items()
                    if not e.lock.locked() and now - e.last_used > self.idle_timeout_s]:
            self._bury(sid, f"expired after more than {self.idle_timeout_s:g} s idle (VLA_SESSION_IDLE_TIMEOUT_S)")

    def _unknown(self, session_id: str) -> ApiError:
        return ApiError(404, f"no session {session_id!r} (never created, deleted, or gone long ago); a predict or "
                             "step request with this id starts it", field="session_id")

    def get(self, session_id: str, owner: Optional[str] = None) -> SessionEntry:
        """The live session ``session_id`` of ``owner`` (404 for another key's, as for an unknown one)."""
        self.expire()
        entry = self._entries.get(session_id)
        if entry is None or entry.owner != owner:
            gone = self._gone.get(session_id)
            if gone is not None and gone[1] == owner:
                raise self._gone_error(session_id, gone[0])
            raise self._unknown(session_id)
        return entry

    @staticmethod
    def _gone_error(session_id: str, why: str) -> ApiError:
        return ApiError(409, f"session {session_id!r} {why}; its history is lost. Reset it (POST /sessions/"
                             f"{session_id}/reset) to start a new episode under this id, or use a new session_id",
                        field="session_id", type="session_gone")

    def acquire(self, session_id: str, deployment, owner: Optional[str] = None, **options: Any) -> SessionEntry:
        """The session ``session_id`` of ``deployment`` and ``owner``, created on first use (409 when it expired
        or was evicted: its robot must reset it knowingly)."""
        if not SESSION_ID.match(session_id):
            raise ApiError(422, f"session_id {session_id[:40]!r} must be 1-128 characters of letters, digits and "
                                "_ . : -", field="session_id")
        self.expire()
        entry = self._entries.get(session_id)
        if entry is not None:
            if entry.owner != owner:
                raise ApiError(409, f"session_id {session_id!r} is taken; use another (session ids are best made "
                                    "random)", field="session_id")
            if entry.deployment is not deployment:
                raise ApiError(409, f"session {session_id!r} belongs to deployment {entry.deployment.name!r}, not "
                                    f"{deployment.name!r}; use another session_id or reset it there",
                               field="session_id")
        else:
            gone = self._gone.get(session_id)
            if gone is not None and gone[1] == owner:
                raise self._gone_error(session_id, gone[0])
            if deployment.pipeline is None:
                raise ApiError(503, f"deployment {deployment.name!r} is not ready ({deployment.status}); retry "
                                    "shortly", retry_after=5)
            if deployment.modality != "action":
                raise ApiError(422, f"deployment {deployment.name!r} ({deployment.model_type}) does not take robot "
                                    "sessions; sessions are for policies", field="model")
            # Only a session that will be made evicts another (a refused request leaves every robot's alone).
            if len(self._entries) >= self.max_sessions:
                idle = next((sid for sid, e in self._entries.items() if not e.lock.locked()), None)
                if idle is None:
                    raise ApiError(503, f"all {self.max_sessions} sessions are busy (VLA_MAX_SESSIONS); retry "
                                        "shortly", retry_after=1, type="overloaded")
                self._bury(idle, f"was evicted to make room for a new session (at most {self.max_sessions} are "
                                 "kept, VLA_MAX_SESSIONS; the least recently used idle one leaves)")
            seed = self._seeds.pop(session_id, None)
            if seed is not None:
                options.setdefault("seed", seed)
            entry = SessionEntry(session_id, deployment, PolicySession(deployment.pipeline, **options), owner)
            self._gone.pop(session_id, None)  # another key's old session of this id: a new one now
            self._entries[session_id] = entry
        self._entries.move_to_end(session_id)
        entry.touch()
        return entry

    def forget_gone(self, session_id: str, owner: Optional[str] = None, seed: Optional[int] = None) -> bool:
        """A reset of a session that expired or was evicted: its robot knows; its next request starts it anew
        (seeded ``seed``). Whether there was such a session."""
        gone = self._gone.get(session_id)
        if gone is None or gone[1] != owner:
            return False
        del self._gone[session_id]
        if seed is not None:
            self._seeds[session_id] = seed
            while len(self._seeds) > self.max_gone:
                self._seeds.pop(next(iter(self._seeds)))
        return True

    def end_deployment(self, deployment, why: str) -> None:
        """Every session of ``deployment`` ends (its robots hear ``why`` on their next request): the deployment
        was reloaded with another checkpoint or unloaded."""
        for sid in [s for s, e in self._entries.items() if e.deployment is deployment]:
            self._bury(sid, why)

    def discard(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    def remove(self, session_id: str, owner: Optional[str] = None) -> None:
        self.get(session_id, owner)
        del self._entries[session_id]

    def infos(self, owner: Optional[str] = None) -> list[dict[str, Any]]:
        """The live sessions of ``owner`` (every session when the server has no keys)."""
        self.expire()
        return [e.info() for e in self._entries.values() if e.owner == owner]
