"""A policy's model calls in a process of their own (``VLA_MODEL_PROCESS``, per deployment ``model_process``).

In one process the event loop (HTTP parsing, msgpack, pydantic, replies) and the model thread's Python
(preparing inputs, building chunks) share one interpreter lock, so a busy policy server uses about one
core however many it has: measured with 16 robots on the demo policy (2-core CPU), the server held 0.95
of a core, the model thread 0.65 and the event loop 0.28, each waiting for the other. Here the model
calls (``predict_each``, ``evaluate_each``, ``evaluate``) run in a child process that loads the same
checkpoint on the deployment's device, warms up and freezes its heap; the server's model thread sends
each batch's decoded requests through a local socket and waits (without the lock) for the typed results, so
the event loop and the model run on two cores. Everything else a policy answers (its io, the checks
made before a request queues and on the model thread, the session's timing) comes from a copy of the
pipeline in the server, loaded on the CPU and never run.

What it costs: the checkpoint's weights are in memory twice (the server's copy in host memory), the
child's start (a fresh interpreter importing torch) adds a few seconds to loading, and each call pickles
its requests and results through the socket (a lone robot's round trip grows by 0.5-1 ms on a 2-core
CPU). A child that dies (killed, out of memory) fails the deployment at once: a call in flight gets
500, later requests 503, ``/models`` names the exit code or signal and readiness drops it; it is not
restarted.

Only policies (the ``action`` modality) run this way: text generation's continuous batcher steps and
streams from the model thread, which the socket would have to carry token by token.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

# What the child runs: the model calls, and the warm-up and start of serving that capture its graphs.
CHILD_OPERATIONS = ("predict_each", "evaluate_each", "evaluate", "warmup", "serving", "io")
# Members of the server's copy that would run the model here (on the CPU, unwarmed): never read through the proxy.
MODEL_MEMBERS = ("predict", "prepare", "loss_batch", "graphs", "model", "batch_handler")
CLOSE_TIMEOUT_S = 10.0


class ModelProcessExited(RuntimeError):
    """The child process that runs a deployment's model has exited: its calls cannot be answered."""


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (an ``InvalidInputError`` keeps its field), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class Channel:
    """Messages over a connected local socket: each a pickle (protocol 5) whose large contiguous buffers (camera
    frames, action chunks) travel out of band, written from where they lie and read into buffers of their own,
    never copied into the pickle. multiprocessing's ``Connection`` pickles them in band: 16 robots' three 224 px
    frames (7.2 MB) took 17.7-19.6 ms to cross and come back acknowledged on a 2-core CPU, 7.5-10.3 ms this way
    (two runs of ``bench/model_process_channel.py``)."""

    FRAME = struct.Struct("<QI")  # the pickle's length, then how many out-of-band buffers follow it
    IN_BAND_BYTES = 64 * 1024  # smaller buffers stay in the pickle: one write and one read less each

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, message: Any) -> None:
        """Pickled whole before a byte is written: a message that cannot be pickled sends nothing."""
        raws: list[memoryview] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:  # (False: out of band)
            raw = buffer.raw()
            if raw.nbytes < self.IN_BAND_BYTES:
                return True
            raws.append(raw)
            return False

        head = pickle.dumps(message, protocol=5, buffer_callback=out_of_band)
        sizes = struct.pack(f"<{len(raws)}Q", *(raw.nbytes for raw in raws))
        self.sock.sendall(self.FRAME.pack(len(head), len(raws)) + sizes + head)
        for raw in raws:
            self.sock.sendall(raw)

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
        length, count = self.FRAME.unpack(self._read(self.FRAME.size))
        rest = self._read(8 * count + length)  # the buffers' sizes, then the pickle
        sizes = struct.unpack_from(f"<{count}Q", rest)
        return pickle.loads(memoryview(rest)[8 * count:], buffers=[self._read(size) for size in sizes])

    def poll(self, timeout: float) -> bool:
        """Whether a message has begun to arrive within ``timeout`` seconds."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def close(self) -> None:
        self.sock.close()


def _child(conn: Channel) -> None:
    """The child's life: take (load, torch threads, gc freeze), load the pipeline, then answer (operation, args,
    kwargs) until the server closes its end or says ``close``. Every reply is ("ok", result) or ("err", exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the server drains, then closes
    load, torch_threads, gc_freeze = conn.recv()
    torch.set_num_threads(torch_threads)
    from service.gc_pauses import freeze_long_lived
    from vla_foundry.pipelines import load_pipeline

    try:
        pipeline = load_pipeline(**load)
    except Exception as e:
        conn.send(("err", _portable(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            operation, args, kwargs = conn.recv()
        except (EOFError, OSError):  # the server has gone
            return
        if operation == "close":
            pipeline.close()
            conn.send(("ok", None))
            return
        try:
            if operation not in CHILD_OPERATIONS:
                raise ValueError(f"unknown model process operation {operation!r}; known: {CHILD_OPERATIONS}")
            result = getattr(pipeline, operation)(*args, **kwargs)
            if operation == "warmup" and gc_freeze:  # as a deployment freezes its heap once loaded (gc_pauses.py)
                freeze_long_lived()
            reply = ("ok", result)
        except Exception as e:  # the call's own failure: the server raises it for the call
            reply = ("err", _portable(e))
        try:
            conn.send(reply)  # (pickled whole before a byte is written: a result that cannot cross sends nothing)
        except OSError:  # the server has gone
            return
        except Exception as e:  # a result that cannot be pickled
            conn.send(("err", RuntimeError(f"the model process could not send its result: {e}")))


class ModelProcess:
    """A policy (``ActionServing``) whose model calls run in a child process; the rest is answered by ``local``,
    a copy of the same pipeline in this process that never runs its model.

    ``start`` spawns the child and waits for it to load. Calls are serialized (one model call at a time, as the
    deployment's model thread makes them). ``on_exit(message)`` is called once, from a watching thread, if the
    child exits before ``close``.
    """

    modality = "action"

    def __init__(self, local, process: subprocess.Popen, conn: Channel, name: str,
                 on_exit: Optional[Callable[[str], None]] = None):
        self._local = local
        self._process = process
        self._conn = conn
        self._name = name
        self._lock = threading.Lock()
        self._closing = False
        self._exit_message: Optional[str] = None
        self._io: Optional[dict[str, Any]] = None
        self._on_exit = on_exit
        threading.Thread(target=self._watch, name=f"model-process-watch-{name}", daemon=True).start()

    @classmethod
    def start(cls, local, load: dict[str, Any], *, name: str, torch_threads: Optional[int] = None,
              gc_freeze: bool = True, on_exit: Optional[Callable[[str], None]] = None) -> "ModelProcess":
        """Start the child (``python -m service.model_process``: a fresh interpreter that inherits nothing of this
        process's threads or CUDA state, and imports nothing of its main module), have it ``load_pipeline(**load)``,
        and wait until it has. Raises what the child's load raised."""
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[1])  # (where ``service`` is, wherever the server runs)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen([sys.executable, "-m", "service.model_process", str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()  # (only the child's copy stays open: its exit then ends our reads)
        conn = Channel(ours)
        try:
            conn.send((load, torch_threads or torch.get_num_threads(), gc_freeze))
            status, value = conn.recv()
        except (EOFError, OSError):
            conn.close()
            process.wait(CLOSE_TIMEOUT_S)
            raise ModelProcessExited(f"the model process of deployment {name!r} exited while loading "
                                     f"(exit code {process.returncode})") from None
        if status == "err":
            conn.close()
            process.wait(CLOSE_TIMEOUT_S)
            raise value
        logger.info("deployment %s runs its model in process %d", name, process.pid)
        return cls(local, process, conn, name, on_exit)

    # ------------------------------------------------------------------ the child

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._exit_message is None and self._process.poll() is None

    def _exit_reason(self) -> str:
        code = self._process.poll()
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return (f"the model process of deployment {self._name!r} (pid {self._process.pid}) {how}; restart the "
                "server, or reload the deployment (POST /admin/models/{name}/reload)")

    def _watch(self) -> None:
        self._process.wait()
        if self._closing:
            return
        self._exit_message = self._exit_reason()
        logger.error("%s", self._exit_message)
        if self._on_exit is not None:
            self._on_exit(self._exit_message)

    def _call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._exit_message is not None or self._closing:
                raise ModelProcessExited(self._exit_message or f"deployment {self._name!r} is closed")
            try:
                self._conn.send((operation, args, kwargs))
                status, value = self._conn.recv()
            except (EOFError, OSError):
                try:
                    self._process.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
                raise ModelProcessExited(self._exit_reason()) from None
        if status == "err":
            raise value
        return value

    def close(self) -> None:
        """Ask the child to close its pipeline and exit; kill it if it does not within ``CLOSE_TIMEOUT_S``."""
        self._closing = True
        if self._process.poll() is None:
            if self._lock.acquire(timeout=CLOSE_TIMEOUT_S):  # (else a call is stuck in the child: it is killed)
                try:
                    self._conn.send(("close", (), {}))
                    if self._conn.poll(CLOSE_TIMEOUT_S):
                        self._conn.recv()
                except (EOFError, OSError):
                    pass
                finally:
                    self._lock.release()
                try:
                    self._process.wait(CLOSE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
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


if __name__ == "__main__":  # the child: ``python -m service.model_process FD`` (``ModelProcess.start``)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _child(Channel(socket.socket(fileno=int(sys.argv[1]))))
