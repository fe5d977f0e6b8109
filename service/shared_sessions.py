"""Robot sessions that every replica can serve: each session's state in Redis (``VLA_SESSION_STORE``).

Without a store, a session lives in the memory of the process that made it (``sessions.py``), and a
robot must keep talking to that process. With one, every step of a session goes:

1. *pull*: the session's stored state (``PolicySession.export``: its bounded history, plan and step
   counters, seed) and its version; when another replica stepped it since this one last did, the
   local session is brought up to it (``PolicySession.load``);
2. the step itself, on this replica's model;
3. *push*: the new state, written only if the stored version is still the one pulled (a
   compare-and-set in one Lua script), so two replicas can never interleave one robot's steps: the
   second to finish gets 409 ``session_conflict`` and nothing of its step is kept.

Keys, under a prefix (``vla:sessions:``): ``state:{id}``, a hash of the version, the key id that owns
the session, its deployment, the state (msgpack, arrays in the wire convention) and what ``GET
/sessions`` lists, expiring after ``VLA_SESSION_IDLE_TIMEOUT_S`` without a step; and ``seen:{id}``,
which outlives it (ten times as long, at least an hour) so that a robot whose session expired is told
so (409 ``session_gone``) instead of silently starting over. A state larger than
``VLA_SESSION_STATE_MAX_BYTES`` is refused (413) and not stored. ``versions`` is the counter every
version comes from; ``replicas`` and ``replicas:seen`` are the fleet's replica listing
(``service/replicas.py``), which shares this store.

Why a store and not affinity routing: a robot's state then survives the replica that served it
(a restart, a scale-down, a crash) and any replica can take the next step, so a load balancer
needs no session awareness; the price is two Redis round trips per step (well under a
millisecond on a LAN) and writing a few camera frames per step.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import msgpack
import numpy as np

from service.codecs import ARRAY_MARKER, decode_array, encode_array
from service.errors import ApiError

PREFIX = "vla:sessions:"

# KEYS: state, seen, the version counter. ARGV: expected version (0: none stored), owner, model, checkpoint, state
# blob, info (JSON), created, requests, now, state ttl ms, seen ttl ms, the save's token. The new version; -2 when
# the stored session is another owner's, -1 when the stored version is not the expected one. Versions come from
# one counter, so they never repeat, not even for a new session under the id of a deleted or expired one: a
# replica's stale copy can never pass for the stored state (unless the store loses the counter: run Redis with
# persistence and without eviction).
_SAVE = """
local stored = redis.call('HMGET', KEYS[1], 'version', 'owner')
if stored[1] and stored[2] ~= ARGV[2] then return -2 end
if (stored[1] or '0') ~= ARGV[1] then return -1 end
local version = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'version', version, 'owner', ARGV[2], 'model', ARGV[3], 'checkpoint', ARGV[4],
           'state', ARGV[5], 'info', ARGV[6], 'created', ARGV[7], 'requests', ARGV[8], 'last_used', ARGV[9],
           'token', ARGV[12])
redis.call('PEXPIRE', KEYS[1], ARGV[10])
redis.call('SET', KEYS[2], cjson.encode({owner = ARGV[2], model = ARGV[3]}), 'PX', ARGV[11])
return version
"""
CONFLICT, TAKEN = -1, -2  # what save returns instead of a version


@dataclass
class StoredSession:
    version: int
    owner: Optional[str]  # the id of the API key that made it (None: the server has no keys)
    model: str  # its deployment's name
    checkpoint: str  # what that deployment served when it was stored (``checkpoint_identity``)
    state: Optional[dict[str, Any]]  # PolicySession.export(); None when the caller had this version already
    info: dict[str, Any]  # what GET /sessions lists of it
    created: float
    last_used: float
    requests: int


def store_failure(error: BaseException) -> Optional[ApiError]:
    """The 503 for a store that failed to answer (a connection lost, a timeout), or None for any other error."""
    from redis import exceptions

    unavailable = (exceptions.ConnectionError, exceptions.TimeoutError, exceptions.BusyLoadingError,
                   exceptions.ReadOnlyError, exceptions.OutOfMemoryError, ConnectionError, TimeoutError)
    if isinstance(error, unavailable):
        return ApiError(503, f"the session store (VLA_SESSION_STORE) failed to answer ({type(error).__name__}); "
                             "send the request again (a step of POST /sessions/{id}/step may have been kept: sent "
                             "again with its step number and timestamp it gets the same answer, not a second one)",
                        retry_after=1)
    return None


def pack_state(state: dict[str, Any]) -> bytes:
    return msgpack.packb(state, use_bin_type=True, default=_encode)


def unpack_state(blob: bytes) -> dict[str, Any]:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False, object_hook=_decode)


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_array(value, binary=True)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a session state value of type {type(value).__name__} cannot be stored")


def _decode(obj: dict) -> Any:
    return decode_array(obj) if obj.get(ARRAY_MARKER) else obj


def redacted_url(url: str) -> str:
    """``url`` with its password (in the user info or a ``password=`` query) replaced by ``***``
    (``redis://:secret@host`` → ``redis://:***@host``), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}")
    # redis-py also takes the password from the query (?password=…)
    query = re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", parts.query)
    return urlunsplit(parts._replace(query=query))


class SharedSessionStates:
    def __init__(self, url: str, idle_timeout_s: float, max_state_bytes: int, prefix: str = PREFIX):
        import redis.asyncio

        self.url = redacted_url(url)  # (shown in errors and logs: never its password)
        # A Redis that accepts connections but never answers must not hang a step or the start (older clients
        # wait for ever by default); the URL's own socket_timeout options win.
        self.redis = redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.ttl_ms = max(1, int(idle_timeout_s * 1000))
        self.seen_ttl_ms = max(3_600_000, 10 * self.ttl_ms)
        self.max_state_bytes = max_state_bytes
        self.prefix = prefix
        self._save = self.redis.register_script(_SAVE)

    def _keys(self, session_id: str) -> tuple[str, str]:
        return f"{self.prefix}state:{session_id}", f"{self.prefix}seen:{session_id}"

    async def check(self) -> None:
        """Raises when the store cannot be reached (at startup: a wrong URL fails fast, naming it)."""
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    async def load(self, session_id: str, known_version: Optional[int] = None,
                   with_state: bool = True) -> Optional[StoredSession]:
        """The stored session, or None; its ``state`` is None without ``with_state``, or when its version is
        ``known_version`` (the caller has that state already: a replica's steps in a row fetch no frames)."""
        key = self._keys(session_id)[0]
        names = ("version", "owner", "model", "checkpoint", "info", "created", "last_used", "requests")
        # A caller with no copy reads the details and the state at once (one round trip, one version); one with a
        # copy reads the details first, and the state only when its copy is not that version. (The state stays
        # out of Lua: a script copying a state of 0.1-2 MiB in and out held Redis, one command at a time, 60-100
        # times as long as a plain read.)
        fetch = with_state and known_version is None
        values = await self.redis.hmget(key, *names, *(("state",) if fetch else ()))
        if values[0] is not None and with_state and not fetch and int(values[0]) != known_version:
            values = await self.redis.hmget(key, *names, "state")  # (details and state of one version)
        if values[0] is None:  # none stored (or expired between the two reads)
            return None
        fields = dict(zip(names, values))
        state = unpack_state(values[len(names)]) if len(values) > len(names) else None
        return StoredSession(int(fields["version"]), fields["owner"].decode() or None, fields["model"].decode(),
                             (fields["checkpoint"] or b"").decode(), state, json.loads(fields["info"]),
                             float(fields["created"]), float(fields["last_used"]), int(fields["requests"]))

    async def saved_by(self, session_id: str, token: str) -> Optional[int]:
        """The stored version when the save that carried ``token`` is the one stored, else None (a save whose
        reply was lost may have landed or not)."""
        stored, version = await self.redis.hmget(self._keys(session_id)[0], "token", "version")
        return int(version) if stored is not None and stored.decode() == token else None

    async def seen(self, session_id: str) -> Optional[dict[str, Any]]:
        """Whom an expired session belonged to ({"owner", "model"}), while its marker lasts; None if never seen."""
        marker = await self.redis.get(self._keys(session_id)[1])
        if marker is None:
            return None
        seen = json.loads(marker)
        return {"owner": seen["owner"] or None, "model": seen["model"]}

    async def save(self, session_id: str, version: int, owner: Optional[str], model: str, checkpoint: str,
                   blob: bytes, info: dict[str, Any], created: float, requests: int, token: str = "") -> int:
        """The state ``blob`` (``pack_state``) as the session's next version, if ``version`` is still the stored one
        (0: none is stored) and the stored one is ``owner``'s: the new version, else ``CONFLICT`` or ``TAKEN``.
        ``token`` marks the save (``saved_by``)."""
        state_key, seen_key = self._keys(session_id)
        return int(await self._save(keys=[state_key, seen_key, f"{self.prefix}versions"],
                                    args=[str(version), owner or "", model, checkpoint, blob, json.dumps(info),
                                          repr(created), str(requests), repr(time.time()), self.ttl_ms,
                                          self.seen_ttl_ms, token]))

    async def keep(self, session_id: str) -> None:
        """The stored session expires ``VLA_SESSION_IDLE_TIMEOUT_S`` from now, not sooner (a robot connected to a
        replica by websocket keeps it while it sends nothing); nothing when none is stored. Its marker is kept as
        long as a save keeps it, so that it outlives the session however long a connection stays open."""
        state_key, seen_key = self._keys(session_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.pexpire(state_key, self.ttl_ms)
        pipe.pexpire(seen_key, self.seen_ttl_ms)
        await pipe.execute()

    async def forget(self, session_id: str) -> None:
        """The session and its marker are gone: its id starts a new session next."""
        await self.redis.delete(*self._keys(session_id))

    async def forget_marker(self, session_id: str) -> None:
        """Its robot knows the session expired (it reset it): no longer reported gone."""
        await self.redis.delete(self._keys(session_id)[1])

    async def listed(self, owner: Optional[str]) -> list[dict[str, Any]]:
        """What ``GET /sessions`` lists of every stored session of ``owner``, whichever replica made it."""
        keys = [key async for key in self.redis.scan_iter(match=f"{self.prefix}state:*", count=500)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, "owner", "model", "info", "created", "last_used", "requests")
            replies = await pipe.execute()
        rows = []
        for key, fields in zip(keys, replies):
            if fields[0] is None or (fields[0].decode() or None) != owner:
                continue  # expired between the scan and the read, or another key's
            session_id = key.decode()[len(f"{self.prefix}state:"):]
            last_used = float(fields[4])
            rows.append({"session_id": session_id, "model": fields[1].decode(), "created": float(fields[3]),
                         "last_used": last_used, "idle_s": round(time.time() - last_used, 3),
                         "requests": int(fields[5]), **json.loads(fields[2])})
        return sorted(rows, key=lambda row: row["last_used"])
