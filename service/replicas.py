"""Replicas: which process this is, which GPUs it was given, and the fleet's other replicas.

A replica is one server process serving every deployment of the configuration. Several of them
run behind one address when ``vla-foundry serve --replicas`` starts them (``service/launcher.py``,
one host) or when Ray Serve does (``service/ray_serve.py``, one or many hosts). Each is given its
GPUs through ``CUDA_VISIBLE_DEVICES`` and numbers them from 0, so ``device: auto`` (or ``cuda``)
is the replica's own GPU.

``GET /models`` shows where each replica runs: ``replica`` is the one that answered, ``replicas``
every replica of the fleet. Replicas find each other through the session store (``VLA_SESSION_STORE``,
a Redis every replica already shares): each announces itself every ``HEARTBEAT_S`` seconds and one
not heard from for ``STALE_AFTER_S`` is dropped. Without a store a replica knows only itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from service.launcher import GPU_ENV
from service.settings import Settings

logger = logging.getLogger("service.replicas")

HEARTBEAT_S = 5.0
STALE_AFTER_S = 3 * HEARTBEAT_S  # two missed heartbeats and a slow third
STORE_TIMEOUT_S = 1.0  # a listing or an announcement that waits longer is given up (the store may hang)
LOAD_LOG_PERIOD_S = 30.0

# Announce: the replica's entry and its time in the store's clock (one clock for every host).
# Each announcement also gives both keys ARGV[3] seconds to live: once no replica announces any more (the whole fleet
# gone), the directory leaves the store instead of staying in it for ever.
_ANNOUNCE = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
"""
# The live entries, oldest announcement first; the stale ones are removed on the way.
_LIVE = """
local t = redis.call('TIME')
local oldest = tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', oldest)) do redis.call('HDEL', KEYS[1], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', oldest)
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[1], unpack(ids))
"""


@dataclass(frozen=True)
class Replica:
    """This process as a replica of the fleet."""

    id: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    index: Optional[int] = None  # its place in `vla-foundry serve --replicas` (None: started otherwise)
    gpus: Optional[str] = None  # the GPUs it was given (CUDA_VISIBLE_DEVICES); None: it was not restricted
    launcher: str = "vla-foundry serve"  # what started it: "vla-foundry serve", "vla-foundry serve --replicas", "ray"
    started: float = field(default_factory=time.time)

    @classmethod
    def of_this_process(cls, launcher: str = "vla-foundry serve", index: Optional[int] = None,
                        id: Optional[str] = None) -> "Replica":
        return cls(id=id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}", index=index,
                   gpus=os.environ.get(GPU_ENV), launcher=launcher)

    def info(self, deployments: list[dict[str, Any]]) -> dict[str, Any]:
        """The replica and where each of its deployments runs (``deployments``: their ``info()``)."""
        return {**asdict(self), "deployments": [{"name": d["name"], "status": d["status"], "device": d.get("device")}
                                                for d in deployments]}


class ReplicaDirectory:
    """The fleet's replicas, kept in the session store's Redis (``client``: its ``redis.asyncio.Redis``)."""

    def __init__(self, client, prefix: str):
        self.entries, self.seen = f"{prefix}replicas", f"{prefix}replicas:seen"
        self._announce = client.register_script(_ANNOUNCE)
        self._live = client.register_script(_LIVE)
        self._client = client

    async def announce(self, entry: dict[str, Any]) -> None:
        await self._announce(keys=[self.entries, self.seen],
                             args=[entry["id"], json.dumps(entry), math.ceil(STALE_AFTER_S)])

    async def withdraw(self, replica_id: str) -> None:
        await self._client.hdel(self.entries, replica_id)
        await self._client.zrem(self.seen, replica_id)

    async def live(self) -> list[dict[str, Any]]:
        found = await self._live(keys=[self.entries, self.seen], args=[STALE_AFTER_S])
        return [json.loads(raw) for raw in found if raw is not None]


class Fleet:
    """What ``GET /models`` says about replicas: this one, and every live one the directory knows."""

    def __init__(self, replica: Replica, deployments: Callable[[], list[dict[str, Any]]],
                 directory: Optional[ReplicaDirectory] = None):
        self.replica, self._deployments, self.directory = replica, deployments, directory
        self._task: Optional[asyncio.Task] = None
        self._warned = -math.inf

    def this(self) -> dict[str, Any]:
        return self.replica.info(self._deployments())

    async def replicas(self, this: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
        """Every live replica (this one as ``this`` says, default: now); only this one without a directory or when
        the store does not answer (the listing is information, not worth a failed ``/models``)."""
        this = this or self.this()
        if self.directory is None:
            return [this]
        try:
            live = await asyncio.wait_for(self.directory.live(), STORE_TIMEOUT_S)
        except Exception as e:
            if time.monotonic() - self._warned > 60:  # once a minute, not on every /models
                self._warned = time.monotonic()
                logger.warning("the replica directory could not be read (%s: %s); listing this replica only",
                               type(e).__name__, e)
            return [this]
        others = [r for r in live if r.get("id") != this["id"]]
        return sorted([this, *others], key=lambda r: (r.get("index") is None, r.get("index") or 0, r["started"]))

    def start(self) -> None:
        if self.directory is not None:
            self._task = asyncio.get_running_loop().create_task(self._heartbeat(), name="replica-heartbeat")

    async def stop(self) -> None:
        """Leaves the listing (at the start of a drain, and at shutdown; the second time does nothing)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        try:
            await asyncio.wait_for(self.directory.withdraw(self.replica.id), STORE_TIMEOUT_S)
        except Exception:  # gone from the listing within STALE_AFTER_S anyway
            pass

    async def _heartbeat(self) -> None:
        failing = False
        while True:
            try:
                await asyncio.wait_for(self.directory.announce(self.this()), STORE_TIMEOUT_S)
                if failing:
                    logger.info("the replica directory answers again")
                failing = False
            except Exception as e:
                if not failing:
                    logger.warning("cannot announce this replica (%s: %s); retrying every %.0f s",
                                   type(e).__name__, e, HEARTBEAT_S)
                failing = True
            await asyncio.sleep(HEARTBEAT_S)


# ---------------------------------------------------------------------------- settings and start of a replica


def hold_startup_until_loaded(fastapi_app, stopping: Callable[[], bool] = lambda: False) -> None:
    """Wrap the app's lifespan: after it starts the manager, wait until nothing is loading any more.

    A replica behind a shared address (a launcher's socket, Serve's proxy) then takes no connection while it
    loads: they go to the replicas that are ready, or wait, instead of getting 503 "still loading" from it.
    When ``stopping()`` turns true meanwhile (SIGTERM), the start fails at once, so the replica exits without
    ever listening instead of finishing its loads first.
    """
    inner = fastapi_app.router.lifespan_context
    manager = fastapi_app.state.manager

    @asynccontextmanager
    async def lifespan(app_):
        async with inner(app_) as state:
            started = last_log = time.monotonic()
            while True:
                _, body = manager.readiness()
                if body["status"] != "loading":
                    break
                if stopping():
                    raise RuntimeError("stopped while loading (SIGTERM before every deployment had loaded)")
                if time.monotonic() - last_log > LOAD_LOG_PERIOD_S:
                    last_log = time.monotonic()
                    logger.info("still loading after %.0f s: %s", last_log - started, body["deployments"])
                await asyncio.sleep(0.2)
            failed = [name for name, status in body["deployments"].items() if status == "failed"]
            if failed:
                logger.warning("deployments failed to load (GET /models has the reasons): %s", failed)
            yield state

    fastapi_app.router.lifespan_context = lifespan



def settings_for_replica(settings: Settings, num_gpus: int, given_by: str) -> Settings:
    """``settings`` for a replica given ``num_gpus`` GPUs (numbered from 0 in it): no GPU ⇒ ``auto`` means the
    CPU; a ``cuda:N`` it does not have fails here, naming ``given_by`` (how to give it more)."""
    if num_gpus == 0:
        cpu_device_check(settings, given_by)
        return settings.model_copy(update={"device": "cpu"}) if settings.device == "auto" else settings
    for where, device in _devices(settings):
        if device.startswith("cuda:") and int(device.split(":", 1)[1]) >= num_gpus:
            raise ValueError(f"{where} is {device!r}, but this replica was given {num_gpus} GPU(s) "
                             f"({GPU_ENV} names them, numbered from 0 in the replica); use `cuda` or `auto`, or "
                             f"give each replica more GPUs ({given_by})")
    return settings


def cpu_device_check(settings: Settings, given_by: str) -> None:
    for where, device in _devices(settings):
        if device.startswith("cuda"):
            raise ValueError(f"{where} is {device!r}, but the replicas get no GPU ({given_by}); give them GPUs or "
                             "use device cpu or auto")


def check_devices_exist(settings: Settings) -> None:
    """Every device the settings name (``device``, ``deployments[].device``) is one this process has; else an error
    naming it and the devices there are. (Found only at load, such a deployment failed, and the server stayed
    unready for good.)"""
    import torch

    from vla_foundry.devices import resolve_device

    for where, device in _devices(settings):
        try:
            resolve_device(device)
        except ValueError:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            visible = os.environ.get(GPU_ENV)
            if count == 0:
                hidden = f" this process sees ({GPU_ENV}={visible!r})" if visible is not None else ""
                raise ValueError(f"{where} is {device!r}, but this host has no CUDA device{hidden}, only the cpu; "
                                 "use cpu or auto") from None
            gpus = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
            numbered = f" ({GPU_ENV}={visible!r}, numbered from 0)" if visible is not None else ""
            raise ValueError(f"{where} is {device!r}, but this host's devices are cpu and {gpus}{numbered}; use one "
                             "of them, or auto") from None


def _devices(settings: Settings) -> list[tuple[str, str]]:
    found = [("device", settings.device)]
    found += [(f"deployment {s.resolved_name!r} device", s.device) for s in settings.deployments if s.device]
    return found
