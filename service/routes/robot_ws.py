"""``/ws/{policy type}``: the openpi robot wire protocol over a websocket.

An openpi-style robot client connects unchanged:

1. on connect the server sends one binary msgpack frame: the deployment's metadata (the
   ``GET /models`` io, plus ``model`` and ``session_id``; ``action_horizon`` is ``n_action_steps`` there, the
   actions a robot executes per reply, and ``chunk_length`` the reply's rows, F+1);
2. each binary msgpack frame from the client is an observation map, answered by a binary
   msgpack map ``{"actions": float32 [chunk_length, A], "server_timing": {"infer_ms",
   "queue_ms", "batch_size", "prev_total_ms" (from the second request on)}}`` plus the HTTP reply's bookkeeping
   (``step``, ``seed``, ``valid_until``, ``n_action_steps``);
3. ``{"endpoint": "reset"}`` (optionally with ``seed``) resets the session, answered as ``POST
   /sessions/{id}/reset`` is: ``{"reset": true, "session_id", "model", "seed"}``.

Observations are the HTTP body (``{"observation": {...}, "seed": …}``) or openpi's flat keys:
``observation/<camera>`` images, ``observation/state`` (the proprioception fields
concatenated) or ``observation/<field>``, ``prompt``. Arrays use the ``__ndarray__``
convention with str or bytes keys; every frame the server sends packs its arrays with
openpi's bytes keys, the only spelling ``openpi_client.msgpack_numpy`` turns back into
``np.ndarray``s. The connection is a session (``?session_id=`` names it, else one per
connection), so a robot may send only the current step. Errors: a refusal of the connection itself
(an unknown deployment, a session it may not have, a page of another origin, a deployment still
loading, a draining server) is the upgrade request's HTTP reply in the one error shape (404, 409,
403, 503); an error after that is a text frame with the message, then close 1008 (bad input) or
1011 (server fault), whose reason is ``field=<the field at fault>`` when there is one; never a
traceback.

A draining server (SIGTERM) answers the frame each robot's connection is computing, then sends a text frame
saying why and closes with 1001; a frame it reads after the drain began is not acted on, which that text
says (``OpenSockets``).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's real annotations.

import asyncio
import logging
import time
import uuid
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from service.auth import caller_of
from service.codecs import DecodeError, TooManyKeys, pack_msgpack, unpack_message_off_loop
from service.deadlines import tightened
from service.errors import ApiError, deny_upgrade, error_body, field_of_loc
from service.modalities.action import ActionPredictRequest, batch_key, decode_observation_frames, session_predict
from service.modalities.base import ModelCall, RequestBase
from service.settings import Settings
from vla_foundry.errors import InvalidInputError
from vla_foundry.models.registry import list_registered_models, model_modality
from vla_foundry.pipelines.action import ActionChunk

logger = logging.getLogger(__name__)

GOING_AWAY, POLICY_VIOLATION, TOO_BIG, INTERNAL_ERROR, TRY_AGAIN_LATER = 1001, 1008, 1009, 1011, 1013
GOODBYE = ("the server is shutting down: a frame it has not answered was not acted on; reconnect (to another "
           "replica) and send it again, resuming or resetting your session")
CUT = ("the server is shutting down and its drain (VLA_DRAIN_TIMEOUT_S) ended before your frame was answered: it "
       "may have been acted on; reconnect (to another replica) and reset your session")


class RobotConnection:
    """One robot websocket, as a draining server sees it."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.busy = True  # a frame (at first the metadata) is being answered: the drain waits for its reply
        self.leaving = False  # the goodbye is committed: no frame is acted on from now on
        self.closing = False  # the goodbye is being sent
        self.gone = asyncio.Event()  # the goodbye was sent, or the connection ended


class OpenSockets:
    """The open robot websockets, so that a draining server says goodbye (1001) to each robot after the reply
    it is computing, instead of cutting the connection (uvicorn's own shutdown fails it with 1012).

    When the drain begins, every connection waiting for a frame is committed to leave at once: a frame it reads
    from then on (one that crossed the goodbye) is not acted on, and the goodbye's text says so. A connection
    answering a frame sends its reply, then the goodbye, without reading another frame. Both decisions are taken
    without yielding to the event loop, so no frame is ever acted on and left unanswered (the goodbye used to
    close a connection that had just read its next frame, which was then planned and its reply lost)."""

    def __init__(self) -> None:
        self.draining = False
        self._open: dict[WebSocket, RobotConnection] = {}

    def opened(self, websocket: WebSocket) -> RobotConnection:
        connection = self._open[websocket] = RobotConnection(websocket)
        return connection

    def closed(self, websocket: WebSocket) -> None:
        connection = self._open.pop(websocket, None)
        if connection is not None:
            connection.leaving = True
            connection.gone.set()

    def take(self, connection: RobotConnection) -> bool:
        """A frame arrived: whether to act on it (False: the goodbye is committed; the frame is dropped)."""
        if connection.leaving:
            return False
        connection.busy = True
        return True

    def answered(self, connection: RobotConnection) -> bool:
        """The frame's reply was sent: whether to wait for the next frame (False: draining, say goodbye now)."""
        connection.busy = False
        return not self.draining

    async def goodbye(self, connection: RobotConnection, message: str = GOODBYE) -> None:
        """The text frame saying why, then close 1001; sent once (a second caller waits for the first's)."""
        connection.leaving = True
        if connection.closing or connection.gone.is_set():  # being sent, or the connection ended
            await connection.gone.wait()
            return
        connection.closing = True
        try:
            await _close(connection.websocket, message, GOING_AWAY)
        finally:
            connection.gone.set()

    async def close_all(self, timeout: float) -> None:
        """Close every connection with 1001: at once for those waiting for a frame, after the reply for those
        answering one (within ``timeout``; one still computing then is told its frame may have been acted on)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        connections = list(self._open.values())
        for connection in connections:
            if not connection.busy:
                connection.leaving = True  # now, before it can read (and act on) another frame

        async def goodbye(connection: RobotConnection) -> None:
            if connection.leaving:
                await self.goodbye(connection)
                return
            try:  # it says goodbye itself after its reply
                await asyncio.wait_for(connection.gone.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self.goodbye(connection, CUT)

        await asyncio.gather(*(goodbye(c) for c in connections))


MAX_CLOSE_REASON = 123  # bytes a close frame's reason may hold (a field may hold a client's non-ASCII key)
TOP_LEVEL = {"seed", "num_inference_steps", "noise", "timestamp", "step", "past_actions", "timeout_s"}


def nested_observation(obj: dict, robot_io) -> dict:
    """openpi's flat keys (``observation/<camera>``, ``observation/state``, ``prompt``) → the HTTP body form."""
    if "observation" in obj and isinstance(obj["observation"], dict):
        return obj
    observation: dict[str, Any] = {"images": {}, "lowdim": {}}
    body: dict[str, Any] = {"observation": observation}
    for key, value in obj.items():
        name = key[len("observation/"):] if key.startswith("observation/") else None
        if key in ("prompt", "language_instruction"):
            observation["language_instruction"] = value
        elif key in TOP_LEVEL:
            body[key] = value
        elif name in robot_io.camera_names:
            observation["images"][name] = value
        elif name == "state" or name in robot_io.proprioception_fields:
            rows = _split_state(value, robot_io) if name == "state" else {name: value}
            twice = sorted(set(rows) & set(observation["lowdim"]))
            if twice:  # observation/state and observation/<field> both: which one counts would be a guess
                raise InvalidInputError(f"proprioception field {twice[0]!r} is given twice (in observation/state and "
                                        f"as observation/{twice[0]}); send one of them", field=key)
            observation["lowdim"].update(rows)
        else:
            raise InvalidInputError(f"unknown observation key {key!r}; send observation/<camera> "
                                    f"({', '.join(robot_io.camera_names)}), observation/state or "
                                    f"observation/<proprioception field> "
                                    f"({', '.join(robot_io.proprioception_fields) or 'none'}), prompt", field=key)
    return body


def _split_state(value: Any, robot_io) -> dict[str, Any]:
    """``observation/state`` = the proprioception fields concatenated ([Dp] or [P+1][Dp])."""
    from service.modalities.action import decode_numbers

    try:
        array = np.asarray(decode_numbers(value, "observation/state"), dtype=np.float64)
    except (TypeError, ValueError) as e:  # ragged rows, or not numbers
        raise InvalidInputError(f"observation/state must be numbers, [Dp] or [P+1][Dp]; got {type(value).__name__} "
                                f"({e})", field="observation/state") from None
    total = robot_io.proprioception_dim
    if array.ndim not in (1, 2) or array.shape[-1] != total:
        raise InvalidInputError(f"observation/state must be [{total}] (or [P+1][{total}]): the fields "
                                f"{robot_io.proprioception_fields} concatenated; got shape {list(array.shape)}",
                                field="observation/state")
    out, start = {}, 0
    for field in robot_io.proprioception_fields:
        d = robot_io.field_dims[field]
        out[field] = array[..., start:start + d].tolist()
        start += d
    return out


def add_robot_websocket(app: FastAPI, settings: Settings) -> None:
    app.state.robot_sockets = OpenSockets()
    paths = []
    for model_type in list_registered_models():
        if model_modality(model_type) != "action":
            continue
        request_cls = type(f"{model_type}WsRequest", (ActionPredictRequest,),
                           {"__module__": __name__, **RequestBase.limits_from(settings)})
        paths.append(f"/ws/{model_type}")
        app.add_api_websocket_route(paths[-1], _endpoint(model_type, request_cls, settings))
    app.add_api_websocket_route("/{path:path}", _no_websocket_here(paths))


def _no_websocket_here(paths: list[str]):
    """Any other path's upgrade: 404 in the error shape, naming the robot websockets (openpi's client connects to
    ``/`` unless given a path; a bare 403 there read as an auth or origin refusal)."""
    async def endpoint(websocket: WebSocket, path: str):
        example = f"ws://HOST:PORT{paths[0]}" if paths else "ws://HOST:PORT/ws/<policy type>"
        await _refuse(websocket, ApiError(404, f"no websocket at /{path[:80]}: the robot websockets are "
                                               f"{', '.join(paths) or 'none (no policy type is registered)'} "
                                               f"(an openpi client: WebsocketClientPolicy(host=\"{example}\"))"),
                      POLICY_VIOLATION)

    return endpoint


def _endpoint(model_type: str, request_cls: type, settings: Settings):
    async def endpoint(websocket: WebSocket, model: Optional[str] = None, session_id: Optional[str] = None):
        manager, sessions = websocket.app.state.manager, websocket.app.state.sessions
        session_id = session_id or None  # (``?session_id=``: none named, the connection's own)
        connections, sockets = websocket.app.state.metrics.websockets, websocket.app.state.robot_sockets
        # Refusals come before the connection is accepted, as the upgrade request's HTTP reply (see ``_refuse``).
        if sockets.draining:
            await _refuse(websocket, ApiError(503, "the server is shutting down and takes no new connection; connect "
                                                   "to another replica", retry_after=1), GOING_AWAY)
            return
        origin = websocket.headers.get("origin")
        if websocket.app.state.origins.refuses(origin, websocket.headers.get("host", "")):
            await _refuse(websocket, ApiError(
                403, f"a connection from a page of another origin ({origin[:80]!r}) is not taken: browsers let any "
                     "web page open a websocket, so any page could drive a robot through it on a server without API "
                     "keys (VLA_ALLOWED_ORIGINS lists the origins allowed)", "origin"), POLICY_VIOLATION)
            return
        try:
            deployment = manager.resolve(model_type, model)
            # A connection is its session's holder from now on (pinned below): it makes room for it at once, as a
            # session made without a request does, so connections never hold more than VLA_MAX_SESSIONS.
            entry = sessions.acquire(session_id or f"ws-{uuid.uuid4().hex[:16]}", deployment,
                                     caller_of(websocket.scope), request=False)
        except ApiError as e:
            await _refuse(websocket, e, TRY_AGAIN_LATER if e.status == 503 else POLICY_VIOLATION)
            return
        try:
            await websocket.accept()
        except BaseException:  # the client left before it was accepted: its session was made for nothing
            if session_id is None:
                await sessions.end_own(entry.id)
            raise
        connections.inc()
        connection = sockets.opened(websocket)
        entry.pins += 1  # while the robot is connected its session neither expires nor is evicted
        keeper = sessions.keep_stored(entry.id)  # (nor in a shared store)
        try:
            await _serve(websocket, deployment, entry, request_cls, settings, sockets, connection)
        finally:
            if keeper is not None:
                keeper.cancel()
            entry.pins -= 1
            entry.last_used = time.time()  # idle from now on
            sockets.closed(websocket)
            connections.dec()
            if session_id is None:  # this connection's own session ends with it
                await sessions.end_own(entry.id)

    return endpoint


async def _serve(websocket: WebSocket, deployment, entry, request_cls: type, settings: Settings,
                 sockets: OpenSockets, connection: RobotConnection) -> None:
    """The protocol on an accepted connection: the metadata frame, then one reply per observation frame; once the
    server drains, the goodbye after the reply in flight (``OpenSockets``)."""
    pipeline = deployment.pipeline
    # (its io's action_horizon: the actions a robot executes from each reply before its next frame, as openpi's
    # ActionChunkBroker reads it; the session takes a frame without `step` to be that many steps later)
    metadata = {**pipeline.io(), "model": deployment.name, "session_id": entry.id}
    await websocket.send_bytes(pack_msgpack(metadata, bytes_keys=True))
    previous_total: Optional[float] = None
    while sockets.answered(connection):
        try:
            message = await websocket.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        started = time.perf_counter()
        if not sockets.take(connection):  # it crossed the goodbye: not acted on (the goodbye's text says so)
            await connection.gone.wait()
            return
        try:
            data = message.get("bytes")
            if data is None:
                raise InvalidInputError("send binary msgpack frames (an observation map), not text")
            if len(data) > settings.max_ws_frame_bytes:
                await _close(websocket, f"frame of {len(data)} bytes is over the limit of "
                                        f"{settings.max_ws_frame_bytes} (VLA_MAX_WS_FRAME_BYTES)", TOO_BIG)
                return
            websocket.app.state.sessions.check_held(entry)  # not deleted, nor ended by a reload or unload
            obj = (await unpack_message_off_loop(data, settings.max_body_keys)).value
            if not isinstance(obj, dict):
                raise InvalidInputError(f"a frame must be a msgpack map; got {type(obj).__name__}")
            if obj.get("endpoint") == "reset":
                seed = obj.get("seed")
                if seed is not None and (type(seed) is not int or not 0 <= seed < 2**62):
                    raise InvalidInputError(f"seed: a reset seed is an integer in [0, 2**62); got {seed!r}",
                                            field="seed")
                await entry.reset(seed)
                if connection.leaving:  # the drain ended while it ran: the goodbye went instead of its reply
                    await connection.gone.wait()
                    return
                # as POST /sessions/{id}/reset answers: the session's model and its new episode's seed
                reply = {"reset": True, "session_id": entry.id, "model": deployment.name, "seed": entry.policy.seed}
                await websocket.send_bytes(pack_msgpack(reply, bytes_keys=True))
                continue
            body = request_cls.model_validate(nested_observation(obj, pipeline.robot_io))
            with websocket.app.state.pixels.lease():  # the frame's decoded cameras count until its reply
                await decode_observation_frames(body)
                entry.touch()
                with tightened(body.timeout_s, started, pipeline.chunk_expiry(body.timestamp)):
                    timed = await entry.call(deployment.call(ModelCall(session_predict, (body, entry.policy),
                                                                       batch_key(body))))
        except TooManyKeys as e:
            await _close(websocket, str(e), TOO_BIG)
            return
        except (InvalidInputError, DecodeError, ValidationError) as e:  # the frame's fault (any other ValueError is
            await _close(websocket, _message(e), POLICY_VIOLATION, _field(e))  # the server's: 1011, as HTTP's 500)
            return
        except ApiError as e:  # 503 (loading, overloaded) or 504 (its deadline passed): try again later, not a fault
            code = (POLICY_VIOLATION if e.status < 500 else TRY_AGAIN_LATER if e.status in (503, 504)
                    else INTERNAL_ERROR)
            await _close(websocket, e.message, code, e.field)
            return
        except Exception:  # logged here; the client gets no traceback
            logger.exception("websocket %s: inference failed", entry.id)
            await _close(websocket, "internal error while computing actions", INTERNAL_ERROR)
            return
        chunk: ActionChunk = timed.value
        timing = {"infer_ms": timed.run_ms, "queue_ms": timed.queue_ms, "batch_size": timed.batch_size}
        if previous_total is not None:
            timing["prev_total_ms"] = previous_total
        out = {"actions": np.asarray(chunk.action_chunk[chunk.first_action_index:], np.float32),
               "server_timing": timing, "step": chunk.step, "seed": chunk.seed, "valid_until": chunk.valid_until,
               "n_action_steps": chunk.n_action_steps, "action_fields": chunk.action_fields}
        if connection.leaving:  # the drain ended while it ran: the goodbye (CUT) went instead of its reply
            await connection.gone.wait()
            return
        try:
            await websocket.send_bytes(pack_msgpack(out, bytes_keys=True))
        except (WebSocketDisconnect, OSError, RuntimeError):  # the robot left while its actions were computed
            return
        previous_total = (time.perf_counter() - started) * 1000
    await sockets.goodbye(connection)  # draining: after the reply it was computing


def _message(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(error)


def _field(error: Exception) -> Optional[str]:
    """The request field an error names, as the HTTP error body's ``field`` has it."""
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        original = (first.get("ctx") or {}).get("error")
        if isinstance(original, InvalidInputError):  # raised by a model validator: it names its field itself
            return original.field
        return field_of_loc(tuple(first.get("loc", ())))
    return getattr(error, "field", None)


async def _refuse(websocket: WebSocket, error: ApiError, close_code: int) -> None:
    """A refusal before the connection is accepted (draining, another origin, an unknown deployment, a session
    another key holds or one that is gone, a deployment still loading): the upgrade request's HTTP reply, in the
    one error shape with its status, which every websocket client reports as such (openpi's client reads the first
    frame as msgpack: a refusal sent as a text frame after accepting reached it as a TypeError). Where the server
    cannot answer an upgrade with a body, the connection is accepted, then closed with the text and ``close_code``."""
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    response = JSONResponse(error_body(error.status, error.message, field=error.field, type=error.type,
                                       scope=websocket.scope), status_code=error.status, headers=headers)
    if await deny_upgrade(websocket.scope, websocket.send, response):
        return
    await websocket.accept()
    await _close(websocket, error.message, close_code, error.field)


async def _close(websocket: WebSocket, message: str, code: int, field: Optional[str] = None) -> None:
    """The error as a text frame, then the close; the close reason carries the field (at most 123 bytes)."""
    reason = f"field={field}".encode()[:MAX_CLOSE_REASON].decode("utf-8", "ignore") if field else None
    try:
        await websocket.send_text(message)
        await websocket.close(code, reason)
    except Exception:  # the client is already gone
        pass
