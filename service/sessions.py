"""Per-robot sessions: one ``PolicySession`` per ``session_id``, bound to one deployment and to the API key
that made it.

Requests of one session are serialized (an ``asyncio.Lock`` held across the model call), so
a robot's history is never interleaved; other sessions and deployments are not blocked by
it. Idle sessions expire after ``VLA_SESSION_IDLE_TIMEOUT_S``; at ``VLA_MAX_SESSIONS`` the
least recently used idle session is evicted to make room (503 when every one is busy).

A session is its key's alone: another key neither lists, steps, resets nor deletes it (404, as
for an unknown id; 409 when it would take the id). A robot whose session expired or was evicted
is told so (409 ``session_gone``) instead of silently starting a new history: it resets the
session (``POST /sessions/{id}/reset``) to begin a new episode under the same id, which the reset makes at
once, on the deployment the gone session was on (and answers as any reset: its model and seed).

With a shared store (``VLA_SESSION_STORE``, ``shared_sessions.py``) every replica can serve every
session: each step pulls the session's state from the store and pushes the new one back with a
compare-and-set. The sessions held here are then only a cache of the store's: dropping one (idle, or
to make room) loses nothing, and expiry is the store's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import weakref
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Optional, Union

from service.errors import ApiError
from service.shared_sessions import CONFLICT, TAKEN, SharedSessionStates, StoredSession, pack_state, store_failure
from vla_foundry.robotics.session import PolicySession

logger = logging.getLogger("service")
SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def checkpoint_identity(deployment) -> str:
    """What a deployment serves (its checkpoint's path, file and step): a stored session made on another
    checkpoint (the deployment was reloaded on some replica since) is not continued on this one."""
    pipeline = getattr(deployment, "pipeline", None)
    return json.dumps(pipeline.checkpoint_info(), sort_keys=True, default=str) if pipeline is not None else ""


class SessionEntry:
    def __init__(self, session_id: str, deployment, policy: PolicySession, owner: Optional[str] = None,
                 shared: Optional[SharedSessionStates] = None, discard: Callable[[], None] = lambda: None,
                 kept: Optional[Callable[[], None]] = None):
        self.id = session_id
        self.deployment = deployment
        self.policy = policy
        self.owner = owner  # the id of the API key that made it (None: the server has no keys)
        self.lock = asyncio.Lock()
        self.created = self.last_used = time.time()
        self.requests = 0
        self.shared = shared
        self.discard = discard  # drops this replica's copy (with a shared store: a refused new one must not linger)
        # A session made by a request is new until that request succeeds: then ``kept`` makes room for it (evicts);
        # if it fails, the session is dropped, so a refused request neither makes a session nor evicts another.
        self.kept = kept
        self.pins = 0  # open websockets stepping this session: it neither expires nor is evicted meanwhile
        self.callers = 0  # requests in ``call`` (running or waiting for the lock)
        self.ended: Optional[ApiError] = None  # why it ended while held (deleted, its deployment reloaded): 409
        self.checkpoint = checkpoint_identity(deployment) if shared is not None else ""
        # With a shared store: the stored version this session was last pulled at or pushed as (0: none stored;
        # -1: what this replica holds may differ from the store, so the next pull reloads it).
        self.version = 0

    async def call(self, run: Awaitable[Any]) -> Any:
        """``run`` (this session's model call) under the session's lock, to completion: if the request is
        cancelled meanwhile, the lock is released only once the model thread is done with the session, so
        its next request (or a reset) never meets a half-recorded step. With a shared store, the session is
        pulled from it first and pushed back after (see the module's docstring)."""
        self.callers += 1
        try:
            return await self._call(run)
        finally:
            self.callers -= 1

    def _made(self) -> None:
        """A request of this session succeeded: a new session is made (and makes room for itself)."""
        if self.kept is not None:
            kept, self.kept = self.kept, None
            kept()

    def _failed(self) -> None:
        """A request of this session failed: a new session whose first request it was is dropped (no session was
        made), unless another request for it is waiting, which may still make it."""
        if self.kept is not None and self.callers == 1 and not self.pins:
            self.discard()

    async def _call(self, run: Awaitable[Any]) -> Any:
        async with self.lock:
            try:
                await self._pull()
            except BaseException as e:
                if asyncio.iscoroutine(run):
                    run.close()  # never started: nothing of this step ran
                if self.version == 0:
                    self.discard()
                failure = store_failure(e)
                if failure is not None:
                    raise failure from e
                raise
            task = asyncio.ensure_future(run)
            try:
                result = await asyncio.shield(task)
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):
                    await _outlive(task)
                    if not task.cancelled() and task.exception() is None:  # the step ran: the session stands
                        self._made()
                if self.shared is not None:
                    self.version = -1  # a failed or abandoned step may have recorded its input here
                self._failed()
                del task  # (it holds the error, whose traceback holds this frame: a cycle that kept the session)
                raise
            try:
                await self._push()
            except BaseException:
                self._failed()
                raise
            self._made()
            return result

    async def reset(self, seed: Optional[int] = None) -> None:
        """A new episode (seeded ``seed``). With a shared store it is stored at once, whatever was stored before
        (a session that expired there included), unless the stored one is another key's or deployment's."""
        async with self.lock:
            if self.shared is None:
                self.policy.reset(seed)
                return
            try:
                stored = await self.shared.load(self.id, with_state=False)
                if stored is not None:
                    self.check_owner(stored)
                    # overwritten whole (its state is not needed); its age and request count go on
                    self.version, self.created, self.requests = stored.version, stored.created, stored.requests
                else:
                    await self.shared.forget_marker(self.id)  # its robot knows now
                    self.version = 0
                self.policy.reset(seed)
            except BaseException as e:
                self.version = -1
                failure = store_failure(e)
                if failure is not None:
                    raise failure from e
                raise
            await self._push()

    async def _pull(self) -> None:
        if self.shared is None:
            return
        stored = await self.shared.load(self.id, known_version=self.version if self.version > 0 else None)
        if stored is None:
            void, self.version = self.version != 0, 0  # deleted on some replica, or expired: what is held is void
            if void:
                self.policy.reset()
            seen = await self.shared.seen(self.id)
            if seen is not None:  # until its robot resets it, the id stays its key's
                raise _expired_in_store(self.id, self.shared) if seen["owner"] == self.owner else _taken(self.id)
            if void and self.pins:  # deleted under an open websocket: its robot is told, as without a store
                self.discard()
                raise _deleted_error(self.id)
            if void:  # deleted: a new session under its id, as a replica that held no copy makes it
                self.created, self.requests = time.time(), 1
            return
        self.check_owner(stored)
        if stored.checkpoint != self.checkpoint:
            raise _gone_error(self.id, f"was made on another checkpoint than deployment {self.deployment.name!r} "
                                       "serves here now (it was reloaded)")
        if stored.version != self.version:  # another replica stepped it (or what is held here is void)
            self.policy.load(stored.state)
            self.version, self.created, self.requests = stored.version, stored.created, stored.requests + 1

    def check_owner(self, stored: StoredSession) -> None:
        """409 when the stored session of this id is another key's or another deployment's."""
        if stored.owner != self.owner:
            raise _taken(self.id)
        if stored.model != self.deployment.name:
            raise ApiError(409, f"session {self.id!r} belongs to deployment {stored.model!r}, not "
                                f"{self.deployment.name!r}; use another session_id or reset it there",
                           field="session_id")

    async def _push(self) -> None:
        if self.shared is None:
            return
        token = secrets.token_hex(8)
        try:
            blob = pack_state(self.policy.export())
            if len(blob) > self.shared.max_state_bytes:
                raise ApiError(413, f"session {self.id!r} would store {len(blob)} bytes of state (its recent frames), "
                                    f"more than VLA_SESSION_STATE_MAX_BYTES = {self.shared.max_state_bytes}; this step "
                                    "was not kept. Send smaller frames, or raise the limit", field="observation.images")
            try:
                version = await self.shared.save(self.id, self.version, self.owner, self.deployment.name,
                                                 self.checkpoint, blob, self.policy.info(), self.created,
                                                 self.requests, token)
            except Exception as e:
                if store_failure(e) is None:
                    raise
                # The reply was lost: the save may have landed. When it did, this step is kept (it must not be
                # applied twice when sent again); when that cannot be told, it is not known to be kept.
                landed = await self.shared.saved_by(self.id, token)
                if landed is None:
                    raise
                version = landed
        except BaseException as e:  # not stored (or not known to be): the next pull reloads what is
            self.version = -1
            failure = store_failure(e)
            if failure is not None:
                raise failure from e
            raise
        if version == TAKEN:
            self.version = -1
            raise _taken(self.id)
        if version == CONFLICT:
            self.version = -1
            raise ApiError(409, f"session {self.id!r} was stepped on another replica at the same time; that step "
                                "stands and this one was not kept. Send this step again", field="session_id",
                           type="session_conflict", retry_after=0)
        self.version = version

    def touch(self) -> None:
        self.last_used = time.time()
        self.requests += 1

    @property
    def idle(self) -> bool:
        """Whether nothing is using this session now (no request running or waiting for it, no websocket open on
        it)."""
        return not self.lock.locked() and not self.pins and not self.callers

    def info(self) -> dict[str, Any]:
        return {"session_id": self.id, "model": self.deployment.name, "created": self.created,
                "last_used": self.last_used, "idle_s": round(time.time() - self.last_used, 3),
                "requests": self.requests, "busy": self.lock.locked(), **self.policy.info()}


async def _outlive(task: asyncio.Future) -> None:
    """Wait until ``task`` (a session's model call) has ended, however often the request is cancelled meanwhile: the
    session's lock is held until the model thread is done with the session (the request still ends cancelled)."""
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:  # cancelled again (its client left, then the server shut down): wait on
            continue


async def _from_store(awaitable: Awaitable[Any]) -> Any:
    """A store call; a store that fails to answer is a 503 (``store_failure``), not an error of this server."""
    try:
        return await awaitable
    except Exception as e:
        failure = store_failure(e)
        if failure is not None:
            raise failure from e
        raise


def _taken(session_id: str) -> ApiError:
    return ApiError(409, f"session_id {session_id!r} is taken; use another (session ids are best made random)",
                    field="session_id")


def _gone_error(session_id: str, why: str) -> ApiError:
    return ApiError(409, f"session {session_id!r} {why}; its history is lost. Reset it (POST /sessions/"
                         f"{session_id}/reset) to start a new episode under this id, or use a new session_id",
                    field="session_id", type="session_gone")


def _deleted_error(session_id: str) -> ApiError:
    """For a websocket holding a session deleted meanwhile (``DELETE /sessions/{id}``)."""
    return ApiError(409, f"session {session_id!r} was deleted; its history is lost. Its id is free: connect again to "
                         "start a new session under it (or use a new session_id)", field="session_id",
                    type="session_gone")


def _expired_in_store(session_id: str, shared: SharedSessionStates) -> ApiError:
    return _gone_error(session_id, f"expired in the session store after more than {shared.ttl_ms / 1000:g} s idle "
                                   "(VLA_SESSION_IDLE_TIMEOUT_S)")


class GoneForGood:
    """``SessionStore.reset_gone``'s answer for a gone session whose deployment is no longer served."""


GONE_FOR_GOOD = GoneForGood()


def _served(deployments: Callable[[str], Any], name: str) -> Any:
    """The deployment of that name (``deployments``), or None when none is served (404)."""
    try:
        return deployments(name)
    except ApiError as e:
        if e.status == 404:
            return None
        raise


class SessionStore:
    def __init__(self, max_sessions: int, idle_timeout_s: float, shared: Optional[SharedSessionStates] = None):
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.shared = shared
        self._entries: "OrderedDict[str, SessionEntry]" = OrderedDict()  # least recently used first
        # Sessions that expired or were evicted: id → (why, owner, deployment name), newest last, so their robots
        # hear of it (and a reset makes the new episode on that deployment).
        self._gone: "OrderedDict[str, tuple[str, Optional[str], str]]" = OrderedDict()
        self.max_gone = max(1024, 4 * max_sessions)

    def __len__(self) -> int:
        return len(self._entries)

    def live(self) -> int:
        """The sessions held and not expired (those expired are dropped at the next request that looks, but no
        longer count). Read only, so any thread may ask (the metrics scrape)."""
        cutoff = time.time() - self.idle_timeout_s
        return sum(1 for e in list(self._entries.values()) if not e.idle or e.last_used >= cutoff)

    def _bury(self, session_id: str, why: str) -> None:
        entry = self._entries.pop(session_id)
        if self.shared is not None:  # only this replica's copy: the session lives on in the store
            return
        self._gone[session_id] = (why, entry.owner, entry.deployment.name)
        self._gone.move_to_end(session_id)
        while len(self._gone) > self.max_gone:
            self._gone.popitem(last=False)

    def expire(self) -> None:
        now = time.time()
        for sid in [s for s, e in self._entries.items() if e.idle and now - e.last_used > self.idle_timeout_s]:
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
        return _gone_error(session_id, why)

    def acquire(self, session_id: str, deployment, owner: Optional[str] = None, *, request: bool = True,
                **options: Any) -> SessionEntry:
        """The session ``session_id`` of ``deployment`` and ``owner``, created on first use (409 when it expired
        or was evicted: its robot must reset it knowingly); ``request``: this is one of its requests (counted)."""
        if not SESSION_ID.match(session_id):
            raise ApiError(422, f"session_id {session_id[:40]!r} must be 1-128 characters of letters, digits and "
                                "_ . : -", field="session_id")
        self.expire()
        entry = self._entries.get(session_id)
        if (entry is not None and self.shared is not None and entry.idle
                and (entry.owner != owner or entry.deployment is not deployment)):
            # With a shared store this replica's copy decides nothing: the store says whose it is (on the pull).
            self._entries.pop(session_id)
            entry = None
        if entry is not None:
            if entry.owner != owner:
                raise _taken(session_id)
            if entry.deployment is not deployment:
                raise ApiError(409, f"session {session_id!r} belongs to deployment {entry.deployment.name!r}, not "
                                    f"{deployment.name!r}; use another session_id or reset it there",
                               field="session_id")
        else:
            gone = self._gone.get(session_id)
            if gone is not None:  # while its robot has not been told (and reset it), the id stays its key's
                raise self._gone_error(session_id, gone[0]) if gone[1] == owner else _taken(session_id)
            if deployment.pipeline is None:
                raise ApiError(503, f"deployment {deployment.name!r} is not ready ({deployment.status}); retry "
                                    "shortly", retry_after=5)
            if deployment.modality != "action":
                raise ApiError(422, f"deployment {deployment.name!r} ({deployment.model_type}) does not take robot "
                                    "sessions; sessions are for policies", field="model")
            if len(self._entries) >= self.max_sessions and not any(e.idle for e in self._entries.values()):
                raise ApiError(503, f"all {self.max_sessions} sessions are busy (VLA_MAX_SESSIONS); retry "
                                    "shortly", retry_after=1, type="overloaded")

            # Only a session whose first request succeeds evicts another (a refused request leaves every robot's
            # alone); a session made without a request (a reset's) makes its room at once. Its callbacks hold it
            # weakly: a session that refers to itself would outlive its end until Python's next full collection,
            # with the frames its history holds.
            entry = SessionEntry(session_id, deployment, PolicySession(deployment.pipeline, **options), owner,
                                 self.shared)
            held = weakref.ref(entry)
            # (a new session whose first request failed is dropped: as if it had never been asked for)
            entry.discard = lambda: (e := held()) is not None and self._drop(session_id, e)
            entry.kept = (lambda: (e := held()) is not None and self._make_room(e)) if request else None
            self._entries[session_id] = entry
            if not request:
                self._make_room(entry)
        self._entries.move_to_end(session_id)
        if request:
            entry.touch()
        return entry

    async def lookup(self, session_id: str, owner: Optional[str], deployments: Callable[[str], Any]) -> SessionEntry:
        """``get``, and with a shared store also a session that another replica made (held here from now on;
        ``deployments``: name → this replica's deployment of that name)."""
        self.expire()
        if self.shared is None:
            return self.get(session_id, owner)
        return self.acquire(session_id, deployments((await self._stored(session_id, owner)).model), owner,
                            request=False)

    async def deployment_of(self, session_id: str, owner: Optional[str], deployments: Callable[[str], Any]) -> Any:
        """The deployment of ``owner``'s session ``session_id`` (as ``lookup``, without taking it here or counting
        a request: the step that asks takes it next)."""
        if self.shared is None:
            return self.get(session_id, owner).deployment
        # The store decides, not a copy held here: another replica may have deleted the session and made it again
        # on another deployment. A copy the store no longer has goes to its own deployment, where its step finds
        # out what became of it (``SessionEntry.pull``: deleted under its robot's websocket, or made anew).
        stored = await _from_store(self.shared.load(session_id, with_state=False))
        if stored is not None and stored.owner == owner:
            return deployments(stored.model)
        local = self._entries.get(session_id)
        if stored is None and local is not None and local.owner == owner:
            return local.deployment
        return deployments((await self._stored(session_id, owner)).model)

    async def _stored(self, session_id: str, owner: Optional[str]) -> StoredSession:
        """``owner``'s stored session (without its state); 409 ``session_gone`` when it expired, else 404."""
        stored = await _from_store(self.shared.load(session_id, with_state=False))
        if stored is None or stored.owner != owner:
            seen = await _from_store(self.shared.seen(session_id)) if stored is None else None
            if seen is not None and seen["owner"] == owner:
                raise _expired_in_store(session_id, self.shared)
            raise self._unknown(session_id)
        return stored

    async def reset_gone(self, session_id: str, owner: Optional[str], seed: Optional[int],
                         deployments: Callable[[str], Any]) -> Union[None, SessionEntry, "GoneForGood"]:
        """A reset of ``owner``'s session that expired or was evicted (with a shared store: that expired there): its
        new episode (seeded ``seed``), made now on the deployment the gone session was on (``deployments``: name →
        this replica's deployment), so the reset answers as any reset does (its model and seed) and the robot's next
        request continues it, on any replica. ``GONE_FOR_GOOD`` when that deployment is no longer served (it was
        unloaded): the id is free again and the robot's next request starts a session wherever it is sent. None when
        no such session is gone (a live one is reset where it is; an unknown id is 404)."""
        if self.shared is None:
            self.expire()  # one idle past the timeout is gone now, though no request has looked since
            gone = self._gone.get(session_id)
            if gone is None or gone[1] != owner:
                return None
            del self._gone[session_id]  # its robot knows now
            deployment = _served(deployments, gone[2])
            if deployment is None:
                return GONE_FOR_GOOD
            try:
                return self.acquire(session_id, deployment, owner, request=False, seed=seed)
            except BaseException:  # not made (its deployment is loading, say): still gone, to be reset again
                self._gone[session_id] = gone
                raise
        if await _from_store(self.shared.load(session_id, with_state=False)) is not None:
            return None
        seen = await _from_store(self.shared.seen(session_id))
        if seen is None or seen["owner"] != owner:
            return None
        self._entries.pop(session_id, None)  # this replica's copy of the expired one (a step that was told so)
        deployment = _served(deployments, seen["model"])
        if deployment is None:
            await _from_store(self.shared.forget_marker(session_id))
            return GONE_FOR_GOOD
        entry = self.acquire(session_id, deployment, owner, request=False, seed=seed)
        await entry.reset(seed)  # stores the new episode and drops the marker
        return entry

    async def delete(self, session_id: str, owner: Optional[str] = None) -> None:
        """``remove``; with a shared store, from the store too (for every replica), when it is ``owner``'s there."""
        if self.shared is None:
            self.remove(session_id, owner)
            return
        self.expire()
        await self._stored(session_id, owner)  # 404 for another key's or an unknown one; 409 when it expired
        held = self._entries.pop(session_id, None)
        if held is not None:  # (a websocket holding it tells its robot: ``check_held``)
            held.ended = _deleted_error(session_id)
        await _from_store(self.shared.forget(session_id))

    def keep_stored(self, session_id: str) -> Optional["asyncio.Task"]:
        """With a shared store: a task that keeps the stored session from expiring while a websocket holds it (its
        robot may pause longer than the idle timeout); cancel it when the connection ends. None without a store."""
        if self.shared is None:
            return None
        shared = self.shared

        async def keep() -> None:
            while True:
                await asyncio.sleep(shared.ttl_ms / 3000)
                try:
                    await shared.keep(session_id)
                except Exception as e:  # (the store is down: the next step says so, 503)
                    logger.warning("session %s: could not keep it in the store (%s)", session_id, e)

        return asyncio.ensure_future(keep())

    async def end_own(self, session_id: str) -> None:
        """A websocket's own session (not named by its robot) ends with the connection, in the store too."""
        self.discard(session_id)
        if self.shared is not None:
            try:
                await self.shared.forget(session_id)
            except Exception as e:  # at a connection's end: logged, and the session expires in the store anyway
                logger.warning("session %s: could not remove it from the store (%s)", session_id, e)

    async def listed(self, owner: Optional[str] = None) -> list[dict[str, Any]]:
        """``infos``; with a shared store, every replica's sessions of ``owner`` (as the store has them)."""
        if self.shared is None:
            return self.infos(owner)
        rows = await _from_store(self.shared.listed(owner))
        for row in rows:
            local = self._entries.get(row["session_id"])
            row["busy"] = bool(local is not None and local.lock.locked())
        return rows

    def end_deployment(self, deployment, why: str) -> None:
        """Every session of ``deployment`` ends (its robots hear ``why`` on their next request): the deployment
        was reloaded with another checkpoint or unloaded."""
        for sid in [s for s, e in self._entries.items() if e.deployment is deployment]:
            self._entries[sid].ended = _gone_error(sid, why)  # (a websocket holding it is told: ``check_held``)
            self._bury(sid, why)

    def _make_room(self, entry: SessionEntry) -> None:
        """At most ``max_sessions`` (``entry`` stays): the least recently used idle ones leave."""
        if self._entries.get(entry.id) is not entry:  # dropped meanwhile (deleted, its deployment ended)
            return
        while len(self._entries) > self.max_sessions:
            idle = next((sid for sid, e in self._entries.items() if e is not entry and e.idle), None)
            if idle is None:  # every other one is busy: they leave once idle, when a later session makes room
                return
            self._bury(idle, f"was evicted to make room for a new session (at most {self.max_sessions} are kept, "
                             "VLA_MAX_SESSIONS; the least recently used idle one leaves)")

    def check_held(self, entry: SessionEntry) -> None:
        """409 ``session_gone`` when ``entry`` is no longer this store's session of its id (ended with its
        deployment's reload or unload, or deleted): a websocket holding it tells its robot. (With a shared store, a
        deletion on another replica is heard at the step's pull.)"""
        if entry.ended is not None:
            raise entry.ended
        if self.shared is None and self._entries.get(entry.id) is not entry:
            gone = self._gone.get(entry.id)
            if gone is not None and gone[1] == entry.owner:
                raise _gone_error(entry.id, gone[0])
            raise _deleted_error(entry.id)  # (the id is free, and nothing remembers it to reset)

    def _drop(self, session_id: str, entry: SessionEntry) -> None:
        if self._entries.get(session_id) is entry:
            del self._entries[session_id]

    def discard(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    def remove(self, session_id: str, owner: Optional[str] = None) -> None:
        self.get(session_id, owner)
        del self._entries[session_id]

    def infos(self, owner: Optional[str] = None) -> list[dict[str, Any]]:
        """The live sessions of ``owner`` (every session when the server has no keys)."""
        self.expire()
        return [e.info() for e in self._entries.values() if e.owner == owner]
