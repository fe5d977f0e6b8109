"""A deployment's model calls in a process of their own (``VLA_MODEL_PROCESS``, per deployment ``model_process``).

In one process the event loop (HTTP parsing, msgpack, pydantic, replies) and the model thread's Python
(preparing inputs, building chunks) share one interpreter lock, so a busy policy server uses about one
core however many it has: measured with 16 robots on the demo policy (2-core CPU), the server held 0.95 of
a core, the model thread 0.65 and the event loop 0.28, each waiting for the other. Here the model calls
(``predict_each``, ``evaluate_each``, ``evaluate``) run in a child process that loads the same checkpoint
on the deployment's device, warms up and freezes its heap; the server's model thread sends each batch's
decoded requests over a local socket in msgpack (nothing is unpickled), their frames through shared memory
(``Channel``, ``Arena``), and waits (without the lock) for the typed results, so the event loop and the
model run on two cores. Everything else a policy answers (its io, the checks made before a request queues
and on the model thread, the session's timing) comes from a copy of the pipeline in the server, loaded on
the CPU and never run.

What it costs: the checkpoint's weights are in memory twice (the server's copy in host memory), the
child's start (a fresh interpreter importing torch) adds a few seconds to loading, and each call's
hand-offs (a lone robot's round trip grows by 0.5-1 ms on a 2-core CPU). A child that dies (killed, out
of memory) fails its calls in flight at once (503 naming the exit code or signal); the deployment then
restarts it (``ModelProcess.restart``: the same weights file, warmed up again) a bounded number of times
(``VLA_MODEL_PROCESS_RESTARTS`` in 10 minutes), refusing requests with 503 and ``Retry-After`` meanwhile,
and past that stays failed (``service/deployments.py``). The child logs in the server's format
(``VLA_LOG_FORMAT``), each record naming its deployment.

Text and caption deployments with continuous batching run this way too: their child also keeps the continuous
batcher and steps it between calls, sending each step's streamed text in one report (``text_process.py``).
"""

from __future__ import annotations

import logging
import dataclasses
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import msgpack
import numpy as np
import torch

from service.errors import ApiError
from vla_foundry.config_files import is_bare_hf_directory
from vla_foundry.continuous import SlotOutlook
from vla_foundry.errors import InputTooLargeError, InvalidInputError, StaleObservationError
from vla_foundry.pipelines.action import ActionChunk, PolicyEvaluation, PolicyRequest
from vla_foundry.pipelines.caption import CaptionEvaluation
from vla_foundry.pipelines.text import Completion, CompletionResult, TextEvaluation
from vla_foundry.robotics.observations import RawObservation
from vla_foundry.sampling import SamplingParams

logger = logging.getLogger("service.model_process")  # (the same name in the child, run as __main__)

# What the child runs: the model calls, and the warm-up and start of serving that capture its graphs.
CHILD_OPERATIONS = ("predict_each", "evaluate_each", "evaluate", "warmup", "serving", "io", "complete", "caption")
GENERATING_MODALITIES = ("text", "caption")  # their children also step a continuous batcher (text_process.py)
# What a restarted child runs before it serves again (its warm-up; a generating child's batcher made again first).
WARMUP_OPERATIONS = ("warmup", "serving", "io", "make_batcher", "warmup_batcher")
# Members of the server's copy that would run the model here (on the CPU, unwarmed): never read through the proxy.
MODEL_MEMBERS = ("predict", "prepare", "loss_batch", "graphs", "model", "batch_handler")
RESTART_RETRY_AFTER_S = 5  # what a request refused while a deployment restarts its child is told to wait
CLOSE_TIMEOUT_S = 3.0  # closing: for the child to close its pipeline and exit, after which it is killed
DEFAULT_START_TIMEOUT_S = 600.0  # for a child to load (VLA_MODEL_PROCESS_START_TIMEOUT_S), after which it is killed


class ModelProcessExited(ApiError):
    """The child process that runs a deployment's model has exited (or is being replaced): its calls cannot be
    answered (503; the deployment restarts it, or fails, and ``/models`` says which). Retry-After is the one a
    request gets while the deployment restarts its child (raised before the deployment decides, it cannot tell
    whether the restarts are used up: then the retry gets the deployment's failure)."""

    def __init__(self, message: str):
        super().__init__(503, message, retry_after=RESTART_RETRY_AFTER_S)


class Arena:
    """Shared memory for the large buffers of the messages one side sends (an anonymous ``memfd``, mapped by both
    processes; Linux). The sender copies each buffer in once; the receiver reads it where it lies. Only one
    message is in flight at a time (the sender waits for the reply before it sends again), so every message
    starts again at offset 0. It grows (doubling) when a message needs more; the receiver maps the new size
    when a message says so, and never unmaps a size that views of an earlier message may still point into
    (the old mapping closes once the last view of it is gone)."""

    ALIGN = 64

    def __init__(self, fd: int):
        self.fd = fd
        self.size = 0
        self.map: Optional[mmap.mmap] = None

    @classmethod
    def create(cls) -> Optional["Arena"]:
        """A new arena, or None where ``os.memfd_create`` is missing (the buffers then cross the socket)."""
        if not hasattr(os, "memfd_create"):
            return None
        return cls(os.memfd_create("vla-model-process", os.MFD_CLOEXEC))  # (pass_fds hands it to the child)

    def place(self, raw: memoryview, offset: int) -> int:
        """Copy ``raw`` in at ``offset`` (aligned), growing the arena first when it does not fit (what earlier
        placements of the same message wrote stays: the memory is the file's); the offset after it."""
        end = offset + raw.nbytes
        if end > self.size:
            size = max(end, 2 * self.size, 1 << 20)
            os.ftruncate(self.fd, size)
            if self.map is not None:
                self.map.close()  # (the sender keeps no views of it)
            self.map, self.size = mmap.mmap(self.fd, size), size
        self.map[offset:end] = raw
        return -(-end // self.ALIGN) * self.ALIGN

    def view(self, size: int, offset: int, length: int) -> memoryview:
        """A view of what a message placed at ``offset`` in an arena of ``size`` bytes (mapped anew when it has
        grown)."""
        if size != self.size:
            self.map, self.size = mmap.mmap(self.fd, size), size  # (the old map lives on while views of it do)
        return memoryview(self.map)[offset:offset + length]

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # views of it are still alive: it closes with the last of them
                pass
        os.close(self.fd)


# What may cross the channel besides msgpack's own types: the policy's request and result dataclasses (by name,
# from this list only: the channel never builds anything else) and the errors a call may fail with.
DATACLASSES = {cls.__name__: cls for cls in (PolicyRequest, RawObservation, PolicyEvaluation, ActionChunk,
                                             SamplingParams, CompletionResult, Completion, TextEvaluation,
                                             CaptionEvaluation, SlotOutlook)}
ERRORS = {cls.__name__: cls for cls in (InvalidInputError, InputTooLargeError, StaleObservationError)}
ARRAY, ARRAY_IN_ARENA, DATACLASS, ERROR = 1, 2, 3, 4  # msgpack extension codes


class Channel:
    """Messages over a connected local socket, in msgpack: nothing that crosses is unpickled. Beside msgpack's own
    types a message may hold numpy arrays, the policy's request and result dataclasses (``DATACLASSES``) and
    errors (``ERRORS`` keep their type and field; any other becomes a RuntimeError naming it), each a msgpack
    extension. Where the sender has an arena (the server, towards the child), an array of ``IN_BAND_BYTES`` or
    more (a camera frame) is copied once into shared memory and read there by the receiver (``receive_arena``:
    the same memory) without a copy; other arrays travel in the message. 16 robots' three 224 px frames (7.2
    MB) crossed and came back acknowledged in 0.89 ms through the arena, 6.9 ms in the message, 14.2 ms through
    multiprocessing's ``Connection``, which pickles them (2-core CPU, ``bench/model_process_channel.py``)."""

    # The message's length, the arena's size when arrays lie there (0: none), and whether its sender waits for a
    # reply (a message that cannot be decoded is answered with an error only then).
    FRAME = struct.Struct("<QQ?")
    IN_BAND_BYTES = 64 * 1024

    def __init__(self, sock: socket.socket, send_arena: Optional[Arena] = None,
                 receive_arena: Optional[Arena] = None):
        self.sock = sock
        self.send_arena = send_arena
        self.receive_arena = receive_arena
        self.last_answered = True  # whether the last message received waits for a reply

    # ------------------------------------------------------------------ encoding

    def _encoder(self, use_arena: bool = True) -> tuple[Callable[[Any], Any], list[int]]:
        """msgpack's ``default`` for one message, and where its arena placements have reached (``[0]``: none)."""
        placed = [0]
        arena = self.send_arena if use_arena else None

        def default(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                array = np.ascontiguousarray(value)
                if array.dtype.hasobject:
                    raise TypeError(f"an array of Python objects ({array.dtype}) cannot cross to the model process")
                header = [array.dtype.str, list(array.shape)]
                if arena is not None and array.nbytes >= self.IN_BAND_BYTES:
                    start = placed[0]
                    placed[0] = arena.place(memoryview(array).cast("B"), start)
                    return msgpack.ExtType(ARRAY_IN_ARENA, msgpack.packb([*header, start, array.nbytes]))
                return msgpack.ExtType(ARRAY, msgpack.packb([*header, array.tobytes()]))
            if isinstance(value, np.generic):
                return value.item()
            if dataclasses.is_dataclass(value) and DATACLASSES.get(type(value).__name__) is type(value):
                fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
                return msgpack.ExtType(DATACLASS, msgpack.packb([type(value).__name__, fields], default=default))
            if isinstance(value, BaseException):
                name = type(value).__name__ if ERRORS.get(type(value).__name__) is type(value) else None
                message = str(value) if name else f"{type(value).__name__}: {value}"
                return msgpack.ExtType(ERROR, msgpack.packb([name, message, getattr(value, "field", None)]))
            if isinstance(value, (Path, torch.device)):
                return str(value)
            if isinstance(value, torch.dtype):
                return str(value).removeprefix("torch.")
            raise TypeError(f"a {type(value).__name__} cannot cross to the model process")

        return default, placed

    def _decoder(self, arena_size: int) -> Callable[[int, bytes], Any]:
        def ext_hook(code: int, data: bytes) -> Any:
            if code == ARRAY:
                dtype, shape, raw = msgpack.unpackb(data)
                return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()  # (small: its own, writable)
            if code == ARRAY_IN_ARENA:
                if self.receive_arena is None:
                    raise ValueError("an array placed in shared memory this side has not mapped")
                dtype, shape, offset, length = msgpack.unpackb(data)
                view = self.receive_arena.view(arena_size, offset, length)
                return np.frombuffer(view, dtype=np.dtype(dtype)).reshape(shape)
            if code == DATACLASS:
                name, fields = msgpack.unpackb(data, ext_hook=ext_hook, strict_map_key=False)
                return DATACLASSES[name](**fields)
            if code == ERROR:
                name, message, field = msgpack.unpackb(data)
                return ERRORS[name](message, field) if name in ERRORS else RuntimeError(message)
            raise ValueError(f"unknown model process message extension {code}")

        return ext_hook

    # ------------------------------------------------------------------ the socket

    def send(self, message: Any, answered: bool = True) -> None:
        self.sock.sendall(self.frame(message, answered))

    def frame(self, message: Any, answered: bool = True) -> bytes:
        """``message`` as it goes on the socket. Encoded whole before a byte is written: a message that cannot be
        encoded sends nothing (arena placements it made are overwritten by the next message). Only a message whose
        reply the sender waits for (``answered``) may place its arrays in the arena: the next one starts again at
        its offset 0, so a message still unread there would see them overwritten; the others carry their arrays
        in the message."""
        default, placed = self._encoder(use_arena=answered)
        body = msgpack.packb(message, default=default)
        arena_size = self.send_arena.size if placed[0] else 0
        return self.FRAME.pack(len(body), arena_size, answered) + body

    def _read(self, n: int) -> bytearray:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            read = self.sock.recv_into(view[got:], n - got)
            if read == 0:
                raise EOFError("the other end closed the channel")
            got += read
        return buffer

    def recv(self) -> Any:
        length, arena_size, self.last_answered = self.FRAME.unpack(self._read(self.FRAME.size))
        return msgpack.unpackb(self._read(length), ext_hook=self._decoder(arena_size), strict_map_key=False)

    def poll(self, timeout: float) -> bool:
        """Whether a message has begun to arrive within ``timeout`` seconds."""
        poller = select.poll()  # (select.select refuses descriptors over 1023, which a busy server hands out)
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))

    def close(self) -> None:
        self.sock.close()
        for arena in (self.send_arena, self.receive_arena):
            if arena is not None:
                arena.close()


def _reap(process: subprocess.Popen, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Wait at most ``timeout`` for ``process`` to exit, then kill it."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class _ChildRecords(logging.Filter):
    """Marks the child's log records: the deployment (a field of its own in JSON lines), no request id."""

    def __init__(self, deployment: str):
        super().__init__()
        self.deployment = deployment

    def filter(self, record: logging.LogRecord) -> bool:
        record.deployment, record.model_process = self.deployment, os.getpid()
        return True


def _configure_child_logging(log_format: str, deployment: str) -> None:
    """The server's log format (``VLA_LOG_FORMAT``) for the child's records, each naming its deployment."""
    from service.request_ids import configure_logging

    configure_logging(log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ChildRecords(deployment))
        if log_format != "json":
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [model process %(model_process)s of %(deployment)s]: %(message)s"))


def _cuda_memory_allocated(device: torch.device) -> Optional[int]:
    """The child's CUDA memory in use by tensors on the deployment's device (the child holds its CUDA context);
    None on the CPU."""
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def _next_message(conn: Channel, engine: Any) -> Any:
    """The child's next message: those a generating engine read while a generation ran alone first (or the error
    reading one raised, raised now), else the socket's next."""
    if engine is not None and engine.backlog:
        message, conn.last_answered = engine.backlog.popleft()
        if isinstance(message, BaseException):
            raise message
        return message
    return conn.recv()


def exit_with_the_server(every_s: float = 0.5) -> None:
    """Ends this process (from a daemon thread) once the server that started it has gone. Between calls the
    channel's closing tells the child (its reads end); a call in flight reads nothing until it ends, and one that
    hangs never does, while it holds the weights (and a GPU's memory). The child has a session of its own, so no
    signal to the server's process group reaches it: its parent changing (to init, or a subreaper) is the sign."""
    server = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != server:
                logger.warning("the server (pid %d) has gone: the model process exits, its call unfinished", server)
                os._exit(1)

    threading.Thread(target=watch, name="exit with the server", daemon=True).start()


def _child(conn: Channel) -> None:
    """The child's life: take (load, torch threads, gc freeze, log format, deployment name), load the pipeline,
    then answer (operation, args, kwargs) until the server closes its end or says ``close``. Every reply is
    ("ok", result, cuda memory) or ("err", exception, cuda memory)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a terminal's Ctrl-C is the server's: it drains, then closes)
    os.set_inheritable(conn.sock.fileno(), False)  # (nothing it starts may keep the server's reads from ending)
    load, torch_threads, gc_freeze, log_format, deployment = conn.recv()
    _configure_child_logging(log_format, deployment)
    exit_with_the_server()
    torch.set_num_threads(torch_threads)
    from service.gc_pauses import freeze_long_lived
    from vla_foundry.pipelines import load_pipeline

    device = torch.device(load.get("device") or "cpu")
    try:
        pipeline = load_pipeline(**load)
    except Exception as e:
        conn.send(("err", e, None))
        return
    conn.send(("ok", None, _cuda_memory_allocated(device)))
    engine = None  # text and captions: the generations' continuous batcher, stepping between calls
    if pipeline.modality in GENERATING_MODALITIES:
        from service.text_process import GenerationEngine

        engine = GenerationEngine(pipeline, conn, device)
    while True:
        if engine is not None and engine.busy and not engine.backlog and not conn.poll(0):
            try:
                engine.step()  # (a decode step, or the events of a generation that ended when it was submitted)
            except OSError:  # the server has gone
                return
            continue
        try:
            operation, args, kwargs = _next_message(conn, engine)
        except (EOFError, OSError):  # the server has gone
            return
        except Exception as e:  # a message that could not be decoded here (it was read whole): that call fails
            logger.exception("the model process could not read a message")
            if conn.last_answered:  # (no reply to a message nobody waits on: it would pass for another's)
                conn.send(("err", RuntimeError(f"the model process could not read the call: {type(e).__name__}: "
                                               f"{e}"), None))
            continue
        if operation == "close":
            pipeline.close()
            conn.send(("ok", None, None))
            return
        if engine is not None and operation in engine.MESSAGES:  # (no reply: its events follow in step reports)
            try:
                getattr(engine, operation)(*args, **kwargs)
            except OSError:  # the server has gone (a generation run alone reports as it goes)
                return
            continue
        try:
            if engine is not None and operation in engine.OPERATIONS:
                result = getattr(engine, operation)(*args, **kwargs)
            elif operation not in CHILD_OPERATIONS:
                raise ValueError(f"unknown model process operation {operation!r}; known: {CHILD_OPERATIONS}")
            else:
                result = getattr(pipeline, operation)(*args, **kwargs)
            if operation == "serving" and gc_freeze:  # as a deployment freezes its heap once loaded (gc_pauses.py)
                freeze_long_lived()
            reply = ("ok", result, _cuda_memory_allocated(device))
        except Exception as e:  # the call's own failure: the server raises it for the call
            if not isinstance(e, InvalidInputError):  # (a request's own refusal is no fault; the rest is logged
                logger.exception("model process call %s failed", operation)  # here, with the child's traceback)
            reply = ("err", e, _cuda_memory_allocated(device))
        try:
            conn.send(reply)  # (encoded whole before a byte is written: a result that cannot cross sends nothing)
        except OSError:  # the server has gone
            return
        except Exception as e:  # a result that cannot be encoded
            conn.send(("err", RuntimeError(f"the model process could not send its result: {e}"), None))


@dataclasses.dataclass(frozen=True)
class ChildOptions:
    """How a deployment's child is started, the same on every restart."""

    torch_threads: int
    gc_freeze: bool = True
    log_format: str = "text"
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S  # for the child to load (weights, tokenizer, processor)


class ModelProcess:
    """A policy (``ActionServing``) whose model calls run in a child process; the rest is answered by ``local``,
    a copy of the same pipeline in this process that never runs its model.

    ``start`` spawns the child and waits for it to load. Calls are serialized (one model call at a time, as the
    deployment's model thread makes them). ``on_exit(message)`` is called once per child, from a watching
    thread, if it exits before ``close``; ``restart`` then starts a fresh child in its place.
    """

    modality = "action"

    def __init__(self, local, load: dict[str, Any], options: ChildOptions, process: subprocess.Popen,
                 conn: Channel, name: str, on_exit: Optional[Callable[[str], None]] = None):
        self._local = local
        self._load = load
        self._options = options
        self._process = process
        self._conn = conn
        self._name = name
        self._lock = threading.Lock()
        self._closing = False
        self._close_once = threading.Lock()  # (a second close, while or after the first runs, does nothing)
        self._exit_message: Optional[str] = None
        self._io: Optional[dict[str, Any]] = None
        self._on_exit = on_exit
        self._starting: Optional[subprocess.Popen] = None  # a restart's child while it loads (close kills it)
        self._warming = False  # restarted, and not yet serving: only the warm-up's calls run
        self.cuda_memory_allocated: Optional[int] = None  # the child's, after its last reply (None: no CUDA)
        self._watch_child()

    @classmethod
    def start(cls, local, load: dict[str, Any], *, name: str, torch_threads: Optional[int] = None,
              gc_freeze: bool = True, log_format: str = "text", start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
              on_exit: Optional[Callable[[str], None]] = None) -> "ModelProcess":
        """Start the child (``python -m service.model_process``: a fresh interpreter that inherits nothing of this
        process's threads or CUDA state, and imports nothing of its main module), have it ``load_pipeline(**load)``,
        and wait until it has. The child loads the weights file ``local`` loaded (a newer checkpoint written
        meanwhile, or later before a restart, is not picked up: the server's copy and the child stay the same
        weights). Raises what the child's load raised, or ``ModelProcessExited`` (it died, or did not load
        within ``start_timeout_s``)."""
        load = _pinned(local, load)
        options = ChildOptions(torch_threads or torch.get_num_threads(), gc_freeze, log_format, start_timeout_s)
        process, conn, memory = _spawn(load, options, name)
        started = cls(local, load, options, process, conn, name, on_exit)
        started.cuda_memory_allocated = memory
        return started

    def restart(self) -> None:
        """Start a fresh child in place of the one that exited (the same weights, options and name) and wait until it
        has loaded; it is not warmed up (``warmup``, ``serving``). Raises what its load raised, or
        ``ModelProcessExited`` (it died, did not load in time, or this was closed meanwhile)."""
        if self._closing:
            raise ModelProcessExited(f"deployment {self._name!r} was closed; its model process is not restarted")
        try:
            process, conn, memory = _spawn(self._load, self._options, self._name,
                                           started=lambda child: setattr(self, "_starting", child))
        finally:
            self._starting = None
        with self._lock:
            if self._closing:  # closed while the new one loaded: it never serves
                closed = True
            else:
                closed = False
                old, self._conn, self._process = self._conn, conn, process
                self._exit_message, self.cuda_memory_allocated, self._warming = None, memory, True
        if closed:
            conn.close()
            _reap(process, 0)
            raise ModelProcessExited(f"deployment {self._name!r} was closed while its model process restarted")
        old.close()
        self._watch_child()

    # ------------------------------------------------------------------ the child

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._exit_message is None and self._process.poll() is None

    @property
    def exit_message(self) -> Optional[str]:
        """Why the child ended (its exit code or signal), once it has; None while it runs."""
        return self._exit_message

    def _exit_reason(self, process: subprocess.Popen) -> str:
        code = process.poll()
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"the model process of deployment {self._name!r} (pid {process.pid}) {how}"

    def _watch_child(self) -> None:
        threading.Thread(target=self._watch, args=(self._process, self._conn),
                         name=f"model-process-watch-{self._name}", daemon=True).start()

    def _watch(self, process: subprocess.Popen, conn: Channel) -> None:
        process.wait()
        if self._closing or process is not self._process:
            return
        try:  # a call waiting for the child's reply wakes now, whatever else may hold the child's end
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._exit_message = self._exit_reason(process)
        logger.error("%s", self._exit_message)
        if self._on_exit is not None:
            self._on_exit(self._exit_message)

    def _refusal(self, operation: str) -> Optional[ModelProcessExited]:
        """Why ``operation`` cannot be sent to the child now (under ``_lock``), or None."""
        if self._exit_message is not None or self._closing:
            return ModelProcessExited(self._exit_message or f"deployment {self._name!r} is closed")
        if self._warming and operation not in WARMUP_OPERATIONS:  # (a call queued before the old child died)
            return ModelProcessExited(f"deployment {self._name!r} is restarting its model process")
        return None

    def _call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            refusal = self._refusal(operation)
            if refusal is not None:
                raise refusal
            process = self._process
            try:
                self._send((operation, args, kwargs))
                status, value, self.cuda_memory_allocated = self._reply()
            except (EOFError, OSError):
                raise self._exited(process) from None
        if status == "err":
            raise value
        return value

    def _send(self, message: Any, answered: bool = True, deadline: Optional[float] = None) -> None:
        """Send ``message`` to the child (under ``_lock``), taking the child's step reports while the socket is full:
        a generating child may be blocked sending them, and a message larger than the socket's buffer (a caption's
        images) would otherwise wait for a child that waits for this side to read. With ``deadline``
        (``time.monotonic()``), TimeoutError once it passes with the message not sent whole."""
        data = memoryview(self._conn.frame(message, answered))
        sock, sent, poller = self._conn.sock, 0, None
        while sent < len(data):
            if deadline is not None and time.monotonic() > deadline:  # (reports the child keeps sending count too)
                raise TimeoutError("the model process took no more of the message in time")
            try:
                sent += sock.send(data[sent:], socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:  # the socket is full: wait until it is not, or until the child sends
                pass
            if poller is None:
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLOUT)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            events = dict(poller.poll(timeout)).get(sock.fileno())
            if events is None or events & select.POLLOUT:  # (None: the deadline passed, which the loop's check ends)
                continue
            if events & select.POLLIN:  # (only step reports come unasked: every call waits for its reply)
                report = self._conn.recv()
                if report[0] != "step":
                    raise RuntimeError(f"the model process sent an unexpected {report[0]!r} reply")
                self._report(report[1])
            else:  # (hung up, or an error)
                raise EOFError("the model process closed the channel")

    def _exited(self, process: subprocess.Popen) -> ModelProcessExited:
        """The error for a call that found the child gone (its exit code, once it has been reaped)."""
        try:
            process.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        return ModelProcessExited(self._exit_reason(process))

    def _reply(self) -> tuple:
        """The child's reply to the call just sent (under ``_lock``); what it sends meanwhile that is not a reply
        (a generating child's step reports) goes to ``_report``."""
        message = self._conn.recv()
        while message[0] == "step":
            self._report(message[1])
            message = self._conn.recv()
        return message

    def _report(self, report: Any) -> None:
        """A step report of a generating child (``text_process.py``); a policy's child sends none."""
        raise RuntimeError("the model process sent a step report, but this deployment does not generate text")

    def close(self) -> None:
        """Ask the child to close its pipeline and exit; kill it if it has not within ``CLOSE_TIMEOUT_S`` in all (a
        call still running in it included: at shutdown the server has already waited for its calls)."""
        with self._close_once:
            if self._closing:  # (closing twice would close the channel's descriptors twice: maybe another's by then)
                return
            self._closing = True
        starting = self._starting
        if starting is not None:  # a restart's child still loading: it never serves
            starting.kill()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        if self._process.poll() is None and self._lock.acquire(timeout=CLOSE_TIMEOUT_S):
            try:  # (a child that takes neither the message nor its reports in time is killed below)
                self._send(("close", (), {}), deadline=deadline)
                while self._conn.poll(deadline - time.monotonic()):  # (step reports may come before the reply)
                    if self._conn.recv()[0] != "step":
                        break
            except (EOFError, OSError, RuntimeError):  # (TimeoutError is an OSError)
                pass
            finally:
                self._lock.release()
        _reap(self._process, max(0.0, deadline - time.monotonic()))
        self._conn.close()
        self._local.close()

    # ------------------------------------------------------------------ ActionServing: in the child

    def predict_each(self, requests, *, num_inference_steps: Optional[int] = None) -> list:
        return self._call("predict_each", list(requests), num_inference_steps=num_inference_steps)

    def evaluate_each(self, evaluations) -> list:
        return self._call("evaluate_each", list(evaluations))

    def evaluate(self, samples, action_windows, *, seed: Optional[int] = None, condition_on_past: bool = True):
        return self._call("evaluate", list(samples), list(action_windows), seed=seed,
                          condition_on_past=condition_on_past)

    def warmup(self, max_batch_size: int = 1) -> None:
        self._call("warmup", max_batch_size)

    def serving(self) -> None:
        self._call("serving")
        self._io = self._call("io")  # the child's: its sampling graphs are the ones that run
        self._warming = False

    def io(self) -> dict[str, Any]:
        return self._io if self._io is not None else self._local.io()

    def continuous_batcher(self, *args: Any, **kwargs: Any) -> None:
        return None  # policies do not generate text

    # ------------------------------------------------------------------ ActionServing: here, from the copy

    def checkpoint_info(self) -> dict[str, Any]:
        return self._local.checkpoint_info()

    def __getattr__(self, name: str) -> Any:
        # The checks and the session's timing (robot_io, uses_language, check_request, check_magnitudes,
        # chunk_expiry, anchor, valid_until, n_action_steps, ...): the same answers the child's copy gives.
        if name.startswith("_") or name in MODEL_MEMBERS:
            raise AttributeError(f"{type(self).__name__} has no {name!r} here: the model runs in the child process")
        return getattr(self._local, name)


def _pinned(local, load: dict[str, Any]) -> dict[str, Any]:
    """``load`` naming the weights file the server's copy ``local`` loaded, where it chose the latest by itself."""
    info = getattr(getattr(local, "model", None), "checkpoint", None)
    if load.get("checkpoint") is not None or info is None or is_bare_hf_directory(info.experiment_dir):
        return load  # (a file named already, no copy to ask, or a Hugging Face directory's one set of weights)
    return {**load, "checkpoint": str(info.file)}


def _spawn(load: dict[str, Any], options: ChildOptions, name: str,
           started: Callable[[subprocess.Popen], None] = lambda child: None
           ) -> tuple[subprocess.Popen, Channel, Optional[int]]:
    """A child that has loaded ``load_pipeline(**load)``: its process, its channel and its CUDA memory in use.
    ``started(child)`` is called as soon as it runs (before it has loaded)."""
    ours, theirs = socket.socketpair()
    arena = None
    try:
        arena = Arena.create()  # the frames of the requests, in memory both processes map
        fds = [theirs.fileno()] + ([arena.fd] if arena is not None else [])
        package_root = str(Path(__file__).resolve().parents[1])  # (where ``service`` is, wherever the server runs)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               "PYTHONSAFEPATH": "1"}  # (3.11+: not the working directory's ``service/`` ahead of ours)
        # A session of its own: signals sent to the server's process group (Ctrl-C, a group-wide SIGTERM) do not
        # reach it; the server drains, then closes it, and its socket closing ends it if the server dies.
        process = subprocess.Popen([sys.executable, "-m", "service.model_process", *map(str, fds)],
                                   pass_fds=fds, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:  # no child (out of processes or memory): nothing of it stays open
        ours.close()
        if arena is not None:
            arena.close()
        raise
    finally:
        theirs.close()  # (only the child's copy stays open: its exit then ends our reads)
    conn = Channel(ours, send_arena=arena)
    try:
        started(process)
        conn.send((load, options.torch_threads, options.gc_freeze, options.log_format, name))
        if not conn.poll(options.start_timeout_s):
            raise ModelProcessExited(f"the model process of deployment {name!r} did not load within "
                                     f"{options.start_timeout_s:g} s (VLA_MODEL_PROCESS_START_TIMEOUT_S); it was "
                                     "stopped")
        status, value, memory = conn.recv()
    except (EOFError, OSError):
        conn.close()
        _reap(process)
        raise ModelProcessExited(f"the model process of deployment {name!r} exited while loading "
                                 f"(exit code {process.returncode})") from None
    except BaseException:  # it did not load in time, or its answer could not be read: it is stopped
        conn.close()
        _reap(process, 0)
        raise
    if status == "err":
        conn.close()
        _reap(process)
        raise value
    logger.info("deployment %s runs its model in process %d", name, process.pid)
    return process, conn, memory


if __name__ == "__main__":  # the child: ``python -m service.model_process FD`` (``ModelProcess.start``)
    # (the socket; then the arena the server places the requests' frames in, where it could make one)
    _child(Channel(socket.socket(fileno=int(sys.argv[1])),
                   receive_arena=Arena(int(sys.argv[2])) if len(sys.argv) > 2 else None))
    # Its work is done (closed, or the server has gone): exit now. The interpreter's own teardown of torch and the
    # model's heap took 2.4 s here, counted against the server's shutdown (after its drain) and each restart.
    logging.shutdown()
    os._exit(0)
