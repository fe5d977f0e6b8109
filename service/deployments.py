"""Deployments: the checkpoints this server serves, their status, and how a request finds one.

Each deployment is loaded on its own executor thread (building the models one at a time),
and a load failure marks only that deployment ``failed`` with the reason while the rest
serve.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from service.errors import ApiError
from service.deadlines import Reservation, deadline_for, early_reservation, release_early_reservation
from service.executor import DeadlineExceeded, ModelExecutor, QueueFull, Timed
from service.gc_pauses import freeze_long_lived, thaw, thaw_and_collect
from service.metrics import Metrics
from service.model_process import GENERATING_MODALITIES, RESTART_RETRY_AFTER_S, ModelProcess, ModelProcessExited
from service.text_process import TextModelProcess
from service.modalities.base import ModelCall
from service.settings import DeploymentSpec, Settings
from vla_foundry.config_files import read_model_config, read_training_config
from vla_foundry.devices import free_memory_bytes, resolve_device, resolve_model_dtype
from vla_foundry.models.registry import model_modality
from vla_foundry.pipelines import Pipeline, load_pipeline

logger = logging.getLogger(__name__)

LOADING, READY, FAILED = "loading", "ready", "failed"
STATES = (LOADING, READY, FAILED)
# Checkpoints are built one at a time: transformers' lazy imports are not safe when two threads
# import the same modules at once (one sees a half-initialised module). Warmups still run in parallel.
# KV caches are allocated one at a time too, each sized by the memory the ones before it left.
_LOAD_LOCK = threading.Lock()
RESTART_WINDOW_S = 600.0  # model_process_restarts counts the restarts within this long
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _alone(runner, item):
    """A call that shares no batch: its one result, raised when it is an exception."""
    (result,) = runner([item])
    if isinstance(result, BaseException):
        raise result
    return result


class Deployment:
    def __init__(self, spec: DeploymentSpec, settings: Settings, prepare: Optional[callable] = None,
                 metrics: Optional[Metrics] = None):
        self.spec = spec
        self.name = spec.resolved_name
        self.settings = settings
        self.status = LOADING
        self.stage: Optional[str] = "queued"  # while loading: what it is doing now (shown in /models)
        self.error: Optional[str] = None
        self.pipeline: Optional[Pipeline] = None
        self.model_type: Optional[str] = None
        self.modality: Optional[str] = None
        self.device: Optional[str] = None
        self.dtype: Optional[str] = None
        self.demo_card: Optional[dict] = None
        self.created = int(time.time())  # OpenAI's model "created" (when this server took the deployment on)
        self.executor = ModelExecutor(self.name, settings.max_queue, batch_wait_ms=self.batch_wait_ms)
        self._prepare = prepare  # e.g. build the demo pack before the first load
        self.metrics = metrics
        self.load_seconds: Optional[float] = None  # loading and warm-up, once ready
        # Set when this deployment has been replaced (a reload: the new one) or unloaded (None with retired):
        # calls that still reach it go to its successor, so a reload fails no request.
        self.retired = False
        self.successor: Optional["Deployment"] = None
        self._runners: dict[Any, Any] = {}  # ModelCall.run → the executor's callable for it
        self.batcher = None  # text and captions: the ContinuousBatcher its generations share, when it has one
        self.model_process: Optional[ModelProcess] = None  # with model_process: the child, also its pipeline
        self.restarting = False  # its model process died and a new one is loading (status LOADING meanwhile)
        # status and restarting, between the loading thread and a model process's watching thread
        self._state_lock = threading.Lock()
        self.model_process_restarts: list[float] = []  # when it restarted its model process (time.monotonic())
        self.model_process_exit: Optional[str] = None  # why its last model process ended, if one did
        # A child's death reported while the deployment loaded or restarted (its watcher left it): that load or
        # restart acts on it once it is done, and only then (a death reported later is its watcher's to act on).
        self._exit_left: Optional[str] = None
        self.closed = False  # the server has shut it down (``close``): a load still running stops before it serves

    @property
    def batch_wait_ms(self) -> float:
        return self.spec.batch_wait_ms if self.spec.batch_wait_ms is not None else self.settings.batch_wait_ms

    # ------------------------------------------------------------------ loading (on the executor thread)

    def start_loading(self) -> concurrent.futures.Future:
        """Load (and warm up) on this deployment's thread; the future is done when it is ready or failed."""
        return self.executor.submit_setup(self._load)

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            if self._prepare is not None:
                self.stage = "preparing the checkpoint (the demo pack: copying, or training where none shipped)"
                self._prepare()
            self.stage = "loading the checkpoint"
            path = Path(self.spec.checkpoint)
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint directory {path} does not exist")
            card = path / "demo.json"  # the demo pack says what each member is (trained or random weights)
            self.demo_card = json.loads(card.read_text()) if card.is_file() else None
            training_config = read_training_config(path)
            self.model_type = read_model_config(path, training_config).get("type")
            self.modality = model_modality(self.model_type)  # an unknown type fails here, naming the closest
            device = resolve_device(self.spec.device or self.settings.device)
            precision = (training_config.get("hparams") or {}).get("precision")
            dtype = resolve_model_dtype(self.spec.dtype or self.settings.dtype, device, precision)
            options = {"cuda_graphs": self.settings.cuda_graphs, "traced_sampling": self.settings.traced_sampling}
            if self.spec.tokenizer:
                options["tokenizer"] = self.spec.tokenizer
            policy_only = ("num_inference_steps", "n_action_steps", "open_loop_steps", "control_period_s",
                           "max_observation_age_s")
            misplaced = [name for name in policy_only if name in self.spec.model_fields_set] \
                if self.modality != "action" else []
            if misplaced:  # (an operator's setting that would change nothing: said, not ignored)
                raise ValueError(f"deployment {self.name!r} is a {self.model_type}: {', '.join(misplaced)} "
                                 f"appl{'ies' if len(misplaced) == 1 else 'y'} to policies only; remove "
                                 f"{'it' if len(misplaced) == 1 else 'them'} from its entry (requests say their own "
                                 "num_inference_steps where the model takes it)")
            for name in policy_only:
                if getattr(self.spec, name) is not None:
                    options[name] = getattr(self.spec, name)
            load = dict(path=path, checkpoint=self.spec.checkpoint_file, use_ema=self.spec.use_ema, device=device,
                        dtype=dtype, **options)
            continuous = self.settings.continuous_batching
            if continuous is None:  # on CUDA a lone request's steps replay from a graph; a continuous batch's lone
                # sequence now does too (the one-row graph), but one client has not been measured both ways on a
                # GPU yet (README, "Continuous batching of text and captions")
                continuous = not (device.type == "cuda" and self.settings.cuda_graphs)
            in_process = not self._model_process(continuous)
            with _LOAD_LOCK:  # (in a model process: the server's copy, for the checks, on the CPU)
                pipeline = load_pipeline(**(load if in_process else {**load, "device": torch.device("cpu")}))
            if not in_process and self.modality != "action" and not pipeline.decodes_continuously:
                logger.info("deployment %s (%s) runs its model on its thread: its model cannot decode in a continuous "
                            "batcher's slots, which a model process needs", self.name, self.model_type)
                in_process = True
                if device.type != "cpu":  # (on the CPU the copy already is what loading in-process gives)
                    pipeline.close()
                    with _LOAD_LOCK:
                        pipeline = load_pipeline(**load)
            if not in_process:
                self.stage = "starting the model process"
                process_class = ModelProcess if self.modality == "action" else TextModelProcess
                with _LOAD_LOCK:  # (its weights are on the device before another deployment sizes a cache by it)
                    pipeline = self.model_process = process_class.start(
                        pipeline, load, name=self.name, gc_freeze=self.settings.gc_freeze,
                        log_format=self.settings.log_format,
                        start_timeout_s=self.settings.model_process_start_timeout_s,
                        on_exit=self._model_process_exited)
                self._stop_if_closed()  # (the server shut down while the child loaded: it is closed on the way out)
            self.executor.max_batch_size = (self.spec.max_batch_size or self.settings.max_batch_size
                                            or (32 if device.type == "cuda" else 8))
            if self.settings.warmup:
                self.stage = f"warming up (batch sizes up to {self.executor.max_batch_size})"
                pipeline.warmup(self.executor.max_batch_size)
            pipeline.serving()
            if continuous:
                with _LOAD_LOCK:  # one at a time: each sizes its cache by the memory the others left
                    self.batcher = self._continuous_batcher(pipeline, device)
                    if self.batcher is None and self.model_process is not None and self.modality != "action":
                        raise ValueError("a text model process streams only from a continuous batcher, and this "
                                         "deployment has none (see the warning above): allow it more cache "
                                         "(VLA_KV_CACHE_MB), or serve it without model_process")
                    if self.batcher is not None and self.settings.warmup:  # (captures take memory too)
                        self.stage = "capturing decode steps"
                        self.batcher.warmup()
            self.device, self.dtype = str(device), DTYPE_NAMES.get(dtype, str(dtype))
            self.pipeline = pipeline
            if self.settings.gc_freeze:  # before ready: the one full collection runs while this one still loads
                freeze_long_lived()
            self.load_seconds = time.perf_counter() - started
            with self._state_lock:  # (a child that dies from now on is restarted by its watching thread)
                self._stop_if_closed()
                self.status, self.stage = READY, None
                died, self._exit_left = self._exit_left, None
            if died is not None:  # (it died while this one loaded: its watcher saw it loading and left it to this)
                raise ModelProcessExited(f"the model process of deployment {self.name!r} exited while it loaded")
            logger.info("deployment %s (%s) ready on %s/%s", self.name, self.model_type, self.device, self.dtype)
        except Exception as e:  # the reason goes to /models; the others keep serving
            self.status, self.stage, self.error = FAILED, None, f"{type(e).__name__}: {e}"
            logger.error("deployment %s failed to load: %s", self.name, self.error)
            if self.model_process is not None:  # (a warm-up that failed in the child, or a child that died)
                self.model_process.close()
                self.pipeline = self.model_process = None
            elif self.closed and self.pipeline is not None:  # (shut down as it loaded in-process; twice is harmless)
                self.pipeline.close()
                self.pipeline = None
            if self.settings.gc_freeze:  # another's load may have frozen this one's half-built objects
                thaw_and_collect()

    def _stop_if_closed(self) -> None:
        """A load that the server's shutdown has overtaken stops here, as a failed load (its model process closed)."""
        if self.closed:
            raise RuntimeError(f"deployment {self.name!r} was shut down while it loaded")

    def close(self) -> None:
        """At shutdown: close what it holds (its pipeline, or a model process still warming up), and a load still
        running stops before it serves (``_stop_if_closed``)."""
        with self._state_lock:
            self.closed = True
            held = self.pipeline if self.pipeline is not None else self.model_process
        if held is not None:
            held.close()  # (its queued background work is dropped)

    def _model_process(self, continuous: bool) -> bool:
        """Whether this deployment's model calls run in a child process: policies (``model_process.py``), and text
        and captions that batch continuously (``text_process.py``)."""
        asked = self.spec.model_process if self.spec.model_process is not None else self.settings.model_process
        fits = self.modality == "action" or (self.modality in GENERATING_MODALITIES and continuous)
        if asked and not fits:
            logger.info("deployment %s (%s) runs its model on its thread: model_process applies to policies, and to "
                        "text and captions with continuous batching", self.name, self.model_type)
        return bool(asked) and fits

    def _model_process_exited(self, message: str) -> None:
        """The model process died while serving (on its watching thread): the calls it was running have failed
        (503). The deployment refuses requests (503, Retry-After) while a new one loads with the same weights and
        warms up, then serves again; after ``model_process_restarts`` restarts in ``RESTART_WINDOW_S``, or when
        the restart fails, it stays failed (503, readiness drops it, /models says why)."""
        with self._state_lock:
            self.model_process_exit = message
            process = self.model_process
            # (one that dies while the deployment loads fails the load, ``_load``; one that dies while a restart
            # warms it up fails that restart, below)
            if self.status != READY or self.restarting or process is None:
                self._exit_left = message
                return
            now = time.monotonic()
            recent = self.recent_restarts(now)
            allowed = self.settings.model_process_restarts
            if self.retired:  # (replaced by a reload: its successor serves its requests)
                self.status, self.error = FAILED, f"ModelProcessExited: {message}"
                return
            if len(recent) >= allowed:
                why = (f"it was restarted {len(recent)} time{'s' if len(recent) != 1 else ''} in the last "
                       f"{RESTART_WINDOW_S / 60:g} minutes, the most VLA_MODEL_PROCESS_RESTARTS allows"
                       if allowed else "VLA_MODEL_PROCESS_RESTARTS is 0")
                self.status, self.error = FAILED, f"ModelProcessExited: {message}; {why}; {self._recover}"
                return
            self.model_process_restarts = recent + [now]
            self.restarting, self.status, self.stage = True, LOADING, f"restarting the model process ({message})"
            self._exit_left = None
        logger.warning("deployment %s restarts its model process (restart %d of at most %d in %g minutes)",
                       self.name, len(recent) + 1, allowed, RESTART_WINDOW_S / 60)
        started = time.perf_counter()
        try:
            with _LOAD_LOCK:  # (its weights are on the device before another deployment sizes a cache by it)
                process.restart()
            if self.settings.warmup:
                process.warmup(self.executor.max_batch_size)
            process.serving()
        except Exception as e:
            with self._state_lock:
                self.restarting, self.stage, self._exit_left = False, None, None
                if self.closed:  # the server shut down meanwhile, and closing stopped the new child: no failure
                    return
                if not self.retired:
                    self.status = FAILED
                    self.error = f"restarting the model process failed: {type(e).__name__}: {e}; {self._recover}"
            logger.error("deployment %s: %s", self.name, self.error)
            return
        with self._state_lock:  # (a child that dies from now on is restarted by its watching thread)
            self.restarting, self.stage = False, None
            if not self.retired:
                self.status = READY
            died, self._exit_left = self._exit_left, None
        if self.metrics is not None:
            self.metrics.model_process_restarts.labels(self.name).inc()
        logger.info("deployment %s serves again from model process %d (restarted in %.1f s)", self.name,
                    process.pid, time.perf_counter() - started)
        if died is not None:  # (it died again as it warmed up: its watcher saw it restarting and left it to this)
            self._model_process_exited(died)

    def recent_restarts(self, now: Optional[float] = None) -> list[float]:
        """When its model process was restarted within the last ``RESTART_WINDOW_S`` (``time.monotonic()``)."""
        now = time.monotonic() if now is None else now
        return [t for t in self.model_process_restarts if now - t < RESTART_WINDOW_S]

    @property
    def _recover(self) -> str:
        return f"reload the deployment (POST /admin/deployments/{self.name}/reload) or restart the server"

    def _continuous_batcher(self, pipeline, device: torch.device):
        """The pipeline's continuous batcher (None: its model generates one request at a time), its KV cache capped
        by VLA_KV_CACHE_MB, by default a quarter of the memory free now. When not even one sequence fits under
        the default cap (a model with a long context on a small host), requests run one at a time instead."""
        cache_mb = self.settings.kv_cache_mb
        if cache_mb is not None:
            return pipeline.continuous_batcher(self.executor.max_batch_size, int(cache_mb * 2**20),
                                               prefill_tokens=self.settings.prefill_tokens_per_step)
        try:  # (a model process measures the memory free on its device itself)
            return pipeline.continuous_batcher(self.executor.max_batch_size, None if self.model_process is not None
                                               else free_memory_bytes(device) // 4,
                                               prefill_tokens=self.settings.prefill_tokens_per_step)
        except ValueError as e:
            logger.warning("deployment %s generates one request at a time: %s", self.name, e)
            return None

    # ------------------------------------------------------------------ requests

    def current(self) -> "Deployment":
        """This deployment, or what replaced it when it was reloaded meanwhile (404 when it was unloaded): a
        transport that awaited something since it found the deployment asks again before using it."""
        deployment = self
        while deployment.retired:
            if deployment.successor is None:
                raise ApiError(404, f"deployment {self.name!r} was unloaded", field="model")
            deployment = deployment.successor
        return deployment

    def check_ready(self) -> None:
        """Refuse (503) while loading or after a failed load: before a transport decodes a request for it."""
        if self.status == LOADING:
            if self.restarting:
                raise ApiError(503, f"deployment {self.name!r} is restarting its model process, which ended "
                                    f"({self.model_process_exit}); retry shortly",
                               retry_after=RESTART_RETRY_AFTER_S)
            raise ApiError(503, f"deployment {self.name!r} is still loading; retry shortly", retry_after=5)
        if self.status == FAILED:
            what = "stopped serving" if self.pipeline is not None else "failed to load"
            raise ApiError(503, f"deployment {self.name!r} {what}; GET /models/{self.name} has the reason")

    def reserve(self, batchable: bool, held: bool = True) -> Reservation:
        """Count a request admitted but not queued yet (its body parsed, its images decoded) as waiting until the
        reservation is released (from ``hold`` when not ``held`` at once): admission sees it, so a burst that
        arrives at an empty queue is not admitted whole only to wait (and be refused when it queues, after the
        costly parts)."""
        return Reservation(self.executor.pending, batchable, held)

    @contextlib.contextmanager
    def reserving(self, batchable: bool) -> Iterator[None]:
        """``reserve`` for the block, unless the request holds its early reservation here already (``admit``, which
        comes first, has given it the route's kind)."""
        early = early_reservation()
        if early is not None and early.counted_in(self.executor.pending) is not None:
            yield
            return
        reservation = self.reserve(batchable)
        try:
            yield
        finally:
            reservation.release()

    def admit(self, batchable: bool = True, stage: str = "queue", generation: bool = False,
              rows: int = 1) -> Optional[float]:
        """This request's deadline (deadlines.py), after refusing it (503) when the expected wait already
        exceeds what is left of it, or this deployment's bound (``queue_bound``). ``call`` admits (``stage``
        "queue"); transports also admit before the costly parts of a request ("body": before it is read,
        "decode": before its images are decoded); ``vla_requests_shed_total`` counts refusals by stage. A
        ``generation`` for the continuous batcher waits for slots (``rows`` of them), not for the queue's calls:
        the batcher estimates that wait. The request's own early reservation (``front_door.py``) is not counted
        against it."""
        self.check_ready()
        deadline = deadline_for(self.spec.request_timeout_s)
        early = early_reservation()
        own = None if early is None else early.counted_in(self.executor.pending)
        if own is not None and own != batchable:  # (the door reserved before it knew the route's kind)
            early.counted_as(batchable)
            own = batchable
        wait_s = (self.batcher.expected_wait_s(rows) if generation and self.batcher is not None
                  else self.executor.expected_wait_s(batchable, own))
        if not wait_s:
            return deadline
        retry_after = max(1, math.ceil(wait_s))
        reason = None
        if deadline is not None and time.perf_counter() + wait_s > deadline:
            reason = "before this request could run, past its deadline; retry later, or allow more time " \
                     "(X-Request-Timeout)"
        elif (bound := self.queue_bound(batchable, for_slots=generation and self.batcher is not None)) is not None \
                and wait_s * 1000 > bound[0]:
            reason = f"over its {bound[1]}; retry later"
        if reason is None:
            return deadline
        if self.metrics is not None:
            self.metrics.shed.labels(self.name, stage).inc()
        raise ApiError(503, f"deployment {self.name!r} expects a wait of {wait_s * 1000:.0f} ms {reason}",
                       retry_after=retry_after, type="overloaded", deadline=deadline, wait_s=wait_s)

    def queue_bound(self, batchable: bool = True, for_slots: bool = False) -> Optional[tuple[float, str]]:
        """The longest expected wait (ms) this deployment admits, and the setting that sets it: ``max_queue_ms``, or
        ``max_queue_calls`` times its recent call of the request's kind (a full batch of ``max_batch_size`` for a
        batchable request, a lone call for a plain one; until a full batch has run, the largest measured; none
        before any call), the lesser where both are set; None: no bound. ``for_slots``: a generation waiting for a
        continuous batcher's slots, which no call measures (a decode step is not a call): ``max_queue_ms`` alone."""
        bounds = []
        if self.spec.max_queue_ms is not None:
            bounds.append((self.spec.max_queue_ms, f"max_queue_ms of {self.spec.max_queue_ms:g}"))
        measured = None
        if self.spec.max_queue_calls is not None and not for_slots:
            measured = self.executor.measured_call(self.executor.max_batch_size if batchable else 1)
        if measured is not None:
            size, call_ms = measured[0], measured[1] * 1000
            bound_ms = self.spec.max_queue_calls * call_ms
            bounds.append((bound_ms, f"max_queue_calls of {self.spec.max_queue_calls:g} ({bound_ms:.1f} ms: its "
                                     f"recent call of {size} took {call_ms:.1f} ms)"))
        return min(bounds, default=None)

    async def call(self, call: ModelCall) -> Timed:
        """The one way into the model: ``call.run(pipeline, items)`` on this deployment's thread, with the
        compatible queued calls (same ``run``, equal ``batch_key``; executor.py) in one model call; returns
        an executor ``Timed`` of this call's result. Refuses with 503 when the wait is too long, 504 when the
        deadline passes in the queue; a result that is an exception is raised here."""
        if self.retired:
            return await self.current().call(call)
        deadline = self.admit(call.batch_key is not None, generation=call.start is not None, rows=call.rows)
        runner = self._runners.get(call.run)
        if runner is None:  # one callable per run: the executor batches jobs whose callable is the same
            runner = self._runners.setdefault(call.run, lambda items, run=call.run: run(self.pipeline, items))
        release_early_reservation()  # it queues now (no await before the executor counts it in its depth)
        try:
            if call.start is not None and self.batcher is not None:
                timed = await self.executor.run_continuous(
                    self.batcher, functools.partial(call.start, self.pipeline, call.item), deadline)
            elif call.batch_key is None:
                timed = await self.executor.run(_alone, runner, call.item, deadline=deadline)
            else:
                timed = await self.executor.run_batched(runner, call.batch_key, call.item, deadline)
        except QueueFull as e:
            raise ApiError(503, f"{e}; retry shortly", retry_after=1, type="overloaded") from None
        except DeadlineExceeded as e:
            raise ApiError(504, f"{e}; it was not run", type="timeout") from None
        return self._observed(timed)

    def _observed(self, timed):
        if self.metrics is not None:
            self.metrics.observe_model_call(self.name, timed.queue_ms, timed.run_ms, timed.batch_size)
        return timed

    def _generation_mode(self) -> dict[str, Any]:
        """Text and caption deployments: how their generations share the model (``continuous``: sequences join
        and leave a running batch between decode steps; ``per_request``: one request's generation at a time)."""
        if self.modality not in ("text", "caption") or self.status != READY:
            return {}
        if self.batcher is None:
            return {"generation": "per_request"}
        return {"generation": "continuous", "max_sequences": self.batcher.num_slots,
                "kv_cache_bytes": self.batcher.cache_bytes, "prefill_tokens_per_step": self.batcher.prefill_tokens,
                "decode_steps": self.batcher.decode_mode}

    def info(self) -> dict[str, Any]:
        checkpoint: dict[str, Any] = {"path": self.spec.checkpoint, "file": None, "step": None}
        io: dict[str, Any] = {}
        if self.pipeline is not None:
            checkpoint = self.pipeline.checkpoint_info()
            io = self.pipeline.io()
        info = {
            "name": self.name, "type": self.model_type, "modality": self.modality, "status": self.status,
            "stage": self.stage, "error": self.error, "device": self.device, "dtype": self.dtype,
            "checkpoint": checkpoint,
            "endpoints": ({"predict": f"/predict/{self.model_type}", "evaluate": f"/evaluate/{self.model_type}"}
                          if self.model_type else {}),
            "io": io,
            # Until it has loaded, the configured size (None: by device, decided at load).
            "batching": {"max_batch_size": self.executor.max_batch_size if self.status == READY else
                         (self.spec.max_batch_size or self.settings.max_batch_size),
                         "batch_wait_ms": self.batch_wait_ms, **self._generation_mode()},
            # With model_process: the child process that runs the model (its pid, for the operator).
            "model_process": ({"pid": self.model_process.pid, "alive": self.model_process.alive,
                               "restarts": len(self.recent_restarts()), "last_exit": self.model_process_exit}
                              if self.model_process is not None else None),
        }
        if self.demo_card is not None:
            info["demo"] = self.demo_card
        return info


class DeploymentManager:
    def __init__(self, settings: Settings, metrics: Optional[Metrics] = None):
        self.settings = settings
        self.metrics = metrics
        specs = list(settings.deployments)
        prepares: dict[str, Any] = {}
        if not specs:  # the demo pack: each member made ready on its own deployment's thread (the server listens)
            from vla_foundry.demo import DEMO_MEMBERS, ensure_demo_pack

            lock = threading.Lock()  # one member at a time in this process (the pack's file lock: across processes)

            def prepare_member(member: str) -> None:
                with lock:
                    ensure_demo_pack(settings.demo_dir, progress=False, members=[member])

            specs = [DeploymentSpec(name=m, checkpoint=str(Path(settings.demo_dir) / m)) for m in DEMO_MEMBERS]
            prepares = {m: functools.partial(prepare_member, m) for m in DEMO_MEMBERS}
        names = [s.resolved_name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"deployment names must be unique; repeated: {', '.join(duplicates)}. "
                             "Give each a `name:` (or --checkpoint DIR=NAME)")
        self.deployments = {s.resolved_name: Deployment(s, settings, prepares.get(s.resolved_name), metrics)
                            for s in specs}
        self._added_live: set[str] = set()  # names added while serving (``add``), not at startup
        self._reloads: set[Deployment] = set()  # reloads' new deployments while they load (not served yet)
        self._reloading: set[str] = set()  # the names those reloads are for (one reload of a name at a time)
        # The names whose reload still loaded when the server shut down (the event loop's end then cancels their
        # tasks, which frees the names, while their loads run on): what the exit's log line names.
        self.reloads_left_loading: list[str] = []
        self.shut_down = False

    def start(self) -> None:
        for deployment in self.deployments.values():
            deployment.start_loading()

    # ------------------------------------------------------------------ live control (routes/admin.py)

    def add(self, spec: DeploymentSpec) -> Deployment:
        """A new deployment, loading on its own thread from now on (409 when the name is taken)."""
        name = spec.resolved_name
        if name in self.deployments:
            raise ApiError(409, f"a deployment named {name!r} exists; reload it, or give another `name`", field="name")
        deployment = Deployment(spec, self.settings, None, self.metrics)
        self.deployments[name] = deployment
        self._added_live.add(name)
        deployment.start_loading()
        return deployment

    async def reload(self, name: str, spec: DeploymentSpec,
                     swapped: Optional[Callable[[Deployment], None]] = None) -> Deployment:
        """``spec`` loaded and warmed up beside the serving deployment ``name``, then swapped in: the old one
        serves until then, finishes what it has queued, and calls that still reach it go to the new one, so no
        request fails. A load that fails leaves the old one serving (422 with the reason). A second reload of
        ``name`` while one loads is refused at once (409): it would load a whole model beside the first, only to
        find the deployment changed. ``swapped(old)`` runs once the new one serves, even when the caller is gone."""
        old = self.get(name, field="name")
        if name in self._reloading:
            raise ApiError(409, f"a reload of {name!r} is still loading (it takes over once it is warm, and its "
                                "request gets the reply); wait for that reply, then reload again", field="name")
        self._reloading.add(name)
        reloading = asyncio.ensure_future(self._reload(name, old, spec, swapped))
        reloading.add_done_callback(functools.partial(self._reloaded, name))
        # A caller cancelled while the new model loads (the drain's end cancels the requests still running) does not
        # stop the reload half-way: its model would go on loading on its thread, untracked, and the name would take a
        # second reload beside it. The reload runs to its end (swapped in, or refused) and only then frees the name.
        return await asyncio.shield(reloading)

    def _reloaded(self, name: str, reloading: asyncio.Future) -> None:
        self._reloading.discard(name)
        if not reloading.cancelled() and reloading.exception() is not None:  # (retrieved: its caller may be gone)
            logger.info("the reload of %s ended without a swap: %s", name, reloading.exception())

    async def _reload(self, name: str, old: Deployment, spec: DeploymentSpec,
                      swapped: Optional[Callable[[Deployment], None]]) -> Deployment:
        new_type = await asyncio.to_thread(_model_type_of, Path(spec.checkpoint))
        old_type = old.model_type or await asyncio.to_thread(_model_type_of, Path(old.spec.checkpoint))  # (loading)
        if old_type is not None and new_type is not None and new_type != old_type:
            # Its clients call /predict/{old type} by its name: another type would fail every one of them.
            raise ApiError(422, f"the new checkpoint is a {new_type!r} model and {name!r} serves {old_type!r}; "
                                f"a reload keeps the type (its clients call /predict/{old_type}): load it as "
                                "a new deployment (POST /admin/deployments), or unload this one first",
                           field="checkpoint")
        new = Deployment(spec, self.settings, None, self.metrics)
        self._reloads.add(new)
        try:
            await asyncio.wrap_future(new.start_loading())
        finally:
            self._reloads.discard(new)
        if self.shut_down:  # (its load stopped, or it is closed: ``shutdown``)
            raise ApiError(503, f"the server shut down while the reload of {name!r} loaded; it was dropped",
                           retry_after=5)
        if new.status != READY:
            new.executor.shutdown(timeout=0)
            raise ApiError(422, f"the new checkpoint did not load ({new.error}); {name!r} keeps serving its current "
                                "one", field="checkpoint")
        old_type = old.model_type or old_type
        if old_type is not None and new.model_type != old_type:  # (its config changed meanwhile)
            new.executor.shutdown(timeout=0)
            await asyncio.to_thread(self._free, new)
            raise ApiError(422, f"the new checkpoint loaded as a {new.model_type!r} model; {name!r} serves "
                                f"{old_type!r} and keeps serving it", field="checkpoint")
        if self.deployments.get(name) is not old:  # unloaded meanwhile (and maybe loaded again)
            new.executor.shutdown(timeout=0)
            await asyncio.to_thread(self._free, new)  # a collection of the whole heap: off the event loop
            raise ApiError(409, f"deployment {name!r} changed while this reload loaded; retry", field="name")
        self.deployments[name] = new
        self._retire(old, successor=new)
        if swapped is not None:
            swapped(old)
        return new

    def remove(self, name: str) -> Deployment:
        """Unload ``name``: it leaves /models at once, finishes what it has queued, and its memory is freed."""
        old = self.get(name, field="name")
        del self.deployments[name]
        self._added_live.discard(name)
        retired = self._retire(old, successor=None)
        if self.metrics is not None:  # its series go once it ran its last call (unless the name is served again)
            retired.add_done_callback(
                lambda _: None if name in self.deployments else self.metrics.forget_deployment(name))
        return old

    @staticmethod
    def _retire(old: Deployment, successor: Optional[Deployment]) -> concurrent.futures.Future:
        """Done once ``old`` has run its last call and been freed."""
        old.retired, old.successor = True, successor
        retired = old.executor.retire()
        retired.add_done_callback(lambda _: DeploymentManager._free(old))  # once it ran its last call
        return retired

    @staticmethod
    def _free(old: Deployment) -> None:
        """Drop a deployment's pipeline and collect what it leaves in cycles, frozen with the rest or not."""
        if old.pipeline is not None:
            old.pipeline.close()  # (its background work would keep its model alive)
        old.pipeline = old.model_process = None  # (a model process's copy of the pipeline too)
        if old.settings.gc_freeze:  # its model was frozen with everything alive when it loaded (gc_pauses.py)
            thaw_and_collect()
        else:
            gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop every model thread, waiting at most ``timeout`` in all for calls still running: the server has
        drained (or given up on) its requests by now, and a model call cannot be interrupted, so the process
        exits without it (the threads are daemons)."""
        deadline = time.monotonic() + timeout
        self.shut_down = True
        self.reloads_left_loading = self.reloads_loading
        for deployment in self.deployments.values():
            deployment.executor.shutdown(timeout=max(0.0, deadline - time.monotonic()))
        for deployment in self._reloads:  # a reload's load: never waited for (it cannot be interrupted, and what it
            deployment.executor.shutdown(timeout=0)  # loads is dropped, ``_reload``), only stopped once it ends
        deployments = [*self.deployments.values(), *self._reloads]
        # All at once: a model process whose call still runs takes up to CLOSE_TIMEOUT_S to close, and one after
        # the other they would hold the exit that many times over.
        closing = [threading.Thread(target=d.close, name=f"close {d.name}", daemon=True) for d in deployments]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join()
        if self.settings.gc_freeze:  # an app made in a longer-lived process (tests, notebooks) leaves nothing frozen
            thaw()

    @property
    def reloads_loading(self) -> list[str]:
        """The names of the deployments whose reload is loading now."""
        return sorted(self._reloading)

    def get(self, name: str, field: str = "model") -> Deployment:
        """The deployment ``name``; 404 naming ``field`` (where the request gave the name) and the names served."""
        if name not in self.deployments:
            raise ApiError(404, f"no deployment named {name!r}; deployed: {', '.join(self.deployments) or '(none)'}",
                           field=field)
        return self.deployments[name]

    def resolve(self, model_type: str, name: Optional[str], kind: str = "predict") -> Deployment:
        """The deployment a ``/predict/{type}`` or ``/evaluate/{type}`` (``kind``) request means."""
        if name is not None:
            deployment = self.get(name)
            if deployment.model_type not in (None, model_type):
                raise ApiError(404, f"deployment {name!r} serves type {deployment.model_type!r}, not {model_type!r}; "
                                    f"POST to /{kind}/{deployment.model_type}", field="model")
            return deployment
        of_type = [d for d in self.deployments.values() if d.model_type == model_type]
        if not of_type:
            loading = [d.name for d in self.deployments.values() if d.status == LOADING]
            if loading:
                raise ApiError(503, f"no {model_type!r} deployment is ready yet ({', '.join(loading)} still loading)",
                               retry_after=5)
            served = sorted({d.model_type for d in self.deployments.values() if d.model_type})
            raise ApiError(404, f"no deployment of type {model_type!r} is served here; served types: "
                                f"{', '.join(served) or '(none)'}")
        usable = [d for d in of_type if d.status != FAILED] or of_type  # all failed ⇒ that deployment's 503
        if len(usable) > 1:
            raise ApiError(422, f"several {model_type!r} deployments are served ({', '.join(d.name for d in usable)}); "
                                "name one in `model`", field="model")
        return usable[0]

    def models_at_work(self, window_s: float) -> bool:
        """Whether any deployment is running or queueing a call, or ended one less than ``window_s`` ago."""
        return any(d.executor.at_work(window_s) for d in list(self.deployments.values()))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether to take traffic, and each deployment's status: all a probe needs. The probe is public, so
        failure reasons (which name checkpoint paths and state-dict keys) stay in ``GET /models/{name}``."""
        statuses = {d.name: d.status for d in self.deployments.values()}
        loading = [n for n, s in statuses.items() if s == LOADING]
        # A deployment added while the server runs (the admin API), or restarting its model process, does not take
        # its readiness away while it loads: the others keep serving, and a load balancer must not move away.
        restarting = {d.name for d in self.deployments.values() if d.restarting}
        ready = (not [n for n in loading if n not in self._added_live and n not in restarting]
                 and any(s == READY for s in statuses.values()))
        return ready, {"status": "ready" if ready else ("loading" if loading else "failed"), "deployments": statuses}


def _model_type_of(checkpoint: Path) -> Optional[str]:
    """The model type a checkpoint directory's config names; None where it cannot be read (its load then says why)."""
    try:
        return read_model_config(checkpoint, read_training_config(checkpoint)).get("type")
    except Exception:  # noqa: BLE001 — any unreadable config: the load reports it with its reason
        return None
