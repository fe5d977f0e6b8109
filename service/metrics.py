"""Prometheus metrics at ``GET /metrics`` (prometheus-client, the text exposition format).

One registry per app (tests and Ray replicas make several apps in one process). What each layer
knows it records:
- the ``RequestMetrics`` middleware: every HTTP request by route template and status, and its
  latency (401s included: it sits outside the API-key check; probes answered by ``probes.py``
  are not counted);
- ``Deployment`` after each model call: time queued, time running, batch size;
- the routes: tokens and images generated, websocket connections;
- read at scrape time (``_StateCollector``): each deployment's state, load time and queue depth,
  live robot sessions, and on CUDA the device memory in use;
- Python's garbage collections, timed by a ``gc.callbacks`` hook while the app runs (``GcPauses``):
  every thread waits out a collection, so a long one is a pause of the whole server.

Names follow Prometheus conventions: ``vla_`` prefix, base units (seconds), ``_total`` counters,
a ``deployment`` label where one applies.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.disconnects import CLIENT_CLOSED
from service.light_requests import ARRIVED
from service.errors import error_response, unexpected_error
from service.request_ids import loggable_path
from service.streaming import SSE_DONE, sse_error

if TYPE_CHECKING:
    from service.deployments import DeploymentManager
    from service.images import PixelBudget
    from service.sessions import SessionStore

# Robot round trips are milliseconds; image generation and long completions take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_PACE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
access_log = logging.getLogger("service.access")
UNMATCHED = "unmatched"  # the route label of a path no route serves (keeps the label set bounded)


class _NoSeries:
    """Where a record for a forgotten deployment goes: nowhere (``DeploymentMetric.labels``)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_NO_SERIES = _NoSeries()


class DeploymentMetric:
    """A metric whose first label is ``deployment``: ``labels`` and ``remove`` as prometheus-client's, except that
    ``labels`` of a deployment whose series were forgotten (it was unloaded) makes no series again and records
    nowhere. What a deployment's last requests record after it has gone (a stream still writing its last tokens, a
    reply counted after its model call) would otherwise bring back a series that nothing removes any more."""

    def __init__(self, metric: Union[Counter, Histogram], owner: "Metrics"):
        self.metric, self._owner = metric, owner

    def labels(self, deployment: str, *labels: str):
        with self._owner.series_lock:  # (forgetting cannot come between the check and the series' creation)
            if self._owner.forgotten(deployment):
                return _NO_SERIES
            return self.metric.labels(deployment, *labels)

    def remove(self, *labels: str) -> None:
        self.metric.remove(*labels)

    def collect(self):
        return self.metric.collect()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gc_pauses: Optional[GcPauses] = None  # while the app runs (watch_gc)
        # Records of a deployment name no longer served (unloaded: its series are removed, forget_deployment) are
        # dropped (DeploymentMetric), under series_lock: the routes record on the event loop, forgetting runs on
        # the unloaded deployment's retiring thread.
        self.series_lock = threading.Lock()
        self._manager: Optional["DeploymentManager"] = None  # (watch)
        r = self.registry
        # Every metric labelled by deployment records through a DeploymentMetric: none brings back the series of a
        # deployment that was unloaded and forgotten.
        self.requests = Counter("vla_http_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("vla_http_request_duration_seconds", "HTTP request latency, first byte "
                                         "received to last byte sent.", ["route"], buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.queue_seconds = DeploymentMetric(Histogram(
            "vla_model_queue_seconds", "Time a request waited for its deployment's model thread.", ["deployment"],
            buckets=LATENCY_BUCKETS, registry=r), self)
        self.run_seconds = DeploymentMetric(Histogram(
            "vla_model_run_seconds", "Time of the model call a request ran in (preprocessing, model, "
            "postprocessing).", ["deployment"], buckets=LATENCY_BUCKETS, registry=r), self)
        self.batch_size = DeploymentMetric(Histogram(
            "vla_model_batch_size", "Requests that shared one model call.", ["deployment"], buckets=BATCH_BUCKETS,
            registry=r), self)
        self.tokens = DeploymentMetric(Counter(
            "vla_tokens_generated", "Tokens generated (completions, captions, chat).", ["deployment"], registry=r),
            self)
        self.images = DeploymentMetric(Counter("vla_images_generated", "Images generated.", ["deployment"],
                                               registry=r), self)
        self.first_token_seconds = DeploymentMetric(Histogram(
            "vla_time_to_first_token_seconds", "Streamed generations: from the request's arrival (at the metrics "
            "middleware) to its first token, ready to send.", ["deployment"], buckets=LATENCY_BUCKETS, registry=r),
            self)
        self.token_pace_seconds = DeploymentMetric(Histogram(
            "vla_time_per_output_token_seconds", "Streamed generations of two tokens or more: from the first token "
            "to the last, per decode step after the first (the longest choice's tokens).", ["deployment"],
            buckets=TOKEN_PACE_BUCKETS, registry=r), self)
        self.websockets = Gauge("vla_websocket_connections", "Open robot websocket connections.", registry=r)
        self.abandoned = DeploymentMetric(Counter(
            "vla_requests_abandoned", "Requests whose client disconnected before the reply (a queued model call is "
            "then dropped unrun).", ["deployment"], registry=r), self)

        self.shed = DeploymentMetric(Counter(
            "vla_requests_shed", "Requests refused (503 overloaded) because the deployment's expected wait was over "
            "their deadline or its max_queue_ms or max_queue_calls, by where: before the body was read (body), before "
            "its images were decoded (decode), when queueing (queue).", ["deployment", "stage"], registry=r), self)
        self.model_process_restarts = DeploymentMetric(Counter(
            "vla_model_process_restarts", "Deployments with model_process: model processes that died while serving and "
            "were started again (VLA_MODEL_PROCESS_RESTARTS).", ["deployment"], registry=r), self)
        self.read_timeouts = Counter("vla_read_timeouts", "Connections closed because a request's headers or body "
                                     "did not arrive in time (VLA_HEADER_TIMEOUT_S, VLA_BODY_TIMEOUT_S).", ["phase"],
                                     registry=r)

        self.light_delays = Histogram("vla_light_request_delay_seconds", "How long GET, HEAD and OPTIONS requests "
                                      "were held while a model was at work (VLA_LIGHT_REQUESTS_PER_S); only those "
                                      "held are observed.", buckets=LATENCY_BUCKETS, registry=r)

    def forget_deployment(self, name: str) -> None:
        """Drop the series of an unloaded deployment, so that loading and unloading names does not grow the
        scrape without end; what its requests still record afterwards is dropped too, until a deployment of the
        name is served again."""
        with self.series_lock:
            for metric in (self.queue_seconds, self.run_seconds, self.batch_size, self.tokens, self.images,
                           self.first_token_seconds, self.token_pace_seconds, self.abandoned, self.shed,
                           self.model_process_restarts):
                # each label set of this deployment, read from the metric's own samples (a histogram's add "le")
                label_sets = {tuple(v for k, v in sample.labels.items() if k != "le")
                              for family in metric.collect() for sample in family.samples
                              if sample.labels.get("deployment") == name}
                for labels in label_sets:
                    metric.remove(*labels)

    def forgotten(self, name: str) -> bool:
        """Whether ``name`` is no longer served (so its records would bring back series that ``forget_deployment``
        removed); always False before ``watch``. Under ``series_lock``."""
        return self._manager is not None and name not in self._manager.deployments

    def record_request(self, method: str, path: str, route: Optional[str], status: int, seconds: float,
                       log: bool = True) -> None:
        """One HTTP request answered: counted and timed under its route template (``route``; None: no route serves
        the path), and one ``service.access`` line (unless not ``log``: the front door's sampled refusals)."""
        self.requests.labels(route or UNMATCHED, method, str(status)).inc()
        self.request_seconds.labels(route or UNMATCHED).observe(seconds)
        if log:
            path = loggable_path(path)
            access_log.info("%s %s %d %.1fms", method, path, status, seconds * 1000,
                            extra={"method": method, "path": path, "route": route, "status": status,
                                   "duration_ms": round(seconds * 1000, 3)})

    def observe_light_delay(self, seconds: float) -> None:
        self.light_delays.observe(seconds)

    def count_read_timeout(self, phase: str) -> None:
        self.read_timeouts.labels(phase).inc()

    def observe_model_call(self, deployment: str, queue_ms: float, run_ms: float, batch_size: int) -> None:
        self.queue_seconds.labels(deployment).observe(queue_ms / 1000)
        self.run_seconds.labels(deployment).observe(run_ms / 1000)
        self.batch_size.labels(deployment).observe(batch_size)

    def observe_reply(self, deployment: str, payload: dict[str, Any]) -> None:
        """Tokens and images a reply carries (``usage.completion_tokens``, ``images``)."""
        usage = payload.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens"):
            self.tokens.labels(deployment).inc(usage["completion_tokens"])
        images = payload.get("images")
        if isinstance(images, list) and images:
            self.images.labels(deployment).inc(len(images))

    def watch(self, manager: "DeploymentManager", sessions: "SessionStore") -> None:
        self._manager = manager  # (which deployments are served: records of any other name are dropped)
        self.registry.register(_StateCollector(manager, sessions))

    def watch_pixels(self, budget: "PixelBudget") -> None:
        Gauge("vla_image_pixels_in_flight", "Decoded image pixels held by the requests in flight "
              "(VLA_MAX_PIXELS_IN_FLIGHT bounds it).", registry=self.registry).set_function(lambda: budget.used)

    def watch_gc(self) -> None:
        """Time every garbage collection from now on (``vla_gc_pause_seconds``), until ``unwatch_gc``."""
        self.gc_pauses = GcPauses()
        self.registry.register(self.gc_pauses)
        gc.callbacks.append(self.gc_pauses)

    def unwatch_gc(self) -> None:
        if self.gc_pauses is not None and self.gc_pauses in gc.callbacks:
            gc.callbacks.remove(self.gc_pauses)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class GcPauses:
    """A ``gc.callbacks`` hook: each collection's duration, per generation, as a histogram read when scraped.

    The hook only adds to plain lists, and takes no lock: a collection can start inside any code, including a
    metric's own update while it holds that metric's lock, so observing a prometheus-client histogram from here
    could deadlock."""

    def __init__(self) -> None:
        self._started = 0.0  # collections never overlap: they run under the interpreter lock, one at a time
        self._counts = [[0] * (len(GC_PAUSE_BUCKETS) + 1) for _ in range(3)]  # per generation, per bucket (+Inf)
        self._sums = [0.0] * 3

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        generation = info["generation"]
        self._counts[generation][bisect.bisect_left(GC_PAUSE_BUCKETS, seconds)] += 1  # le: seconds ≤ bound
        self._sums[generation] += seconds

    def describe(self):
        return []

    def collect(self):
        family = HistogramMetricFamily("vla_gc_pause_seconds", "Python's garbage collections by generation "
                                       "(2: a full one); the whole server waits each out.", labels=["generation"])
        for generation, counts in enumerate(self._counts):
            total, buckets = 0, []
            for bound, n in zip((*GC_PAUSE_BUCKETS, float("inf")), counts):
                total += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
            family.add_metric([str(generation)], buckets, self._sums[generation])
        yield family


class _StateCollector:
    """Gauges read when scraped: nothing to keep in step as deployments load, fail or queue."""

    def __init__(self, manager: "DeploymentManager", sessions: "SessionStore"):
        self.manager, self.sessions = manager, sessions

    def describe(self):  # no samples at registration (deployments may still be loading)
        return []

    def collect(self):
        from service.deployments import STATES

        state = GaugeMetricFamily("vla_deployment_state", "1 for the state each deployment is in.",
                                  labels=["deployment", "state"])
        load = GaugeMetricFamily("vla_deployment_load_seconds", "How long loading (and warming up) took.",
                                 labels=["deployment"])
        depth = GaugeMetricFamily("vla_queue_depth", "Requests waiting for each deployment's model thread.",
                                  labels=["deployment"])
        sequences = GaugeMetricFamily("vla_generation_sequences", "Sequences in a deployment's continuous batcher: "
                                      "decoding (running) or admitted to it and waiting for a slot (waiting).",
                                      labels=["deployment", "state"])
        for d in list(self.manager.deployments.values()):  # (a copy: the admin API changes it on the event loop)
            for s in STATES:
                state.add_metric([d.name, s], 1.0 if d.status == s else 0.0)
            if d.load_seconds is not None:
                load.add_metric([d.name], d.load_seconds)
            depth.add_metric([d.name], d.executor.depth)
            if d.batcher is not None:
                sequences.add_metric([d.name, "running"], d.batcher.running_sequences)
                sequences.add_metric([d.name, "waiting"], d.batcher.waiting_sequences)
        yield from (state, load, depth, sequences)
        yield GaugeMetricFamily("vla_robot_sessions", "Live robot sessions.", value=self.sessions.live())
        memory = _cuda_memory()
        if memory:
            family = GaugeMetricFamily("vla_cuda_memory_allocated_bytes", "CUDA memory in use by tensors (this "
                                       "process's: not its model processes').", labels=["device"])
            for device, value in memory.items():
                family.add_metric([device], value)
            yield family
        children = {d.name: process.cuda_memory_allocated for d in list(self.manager.deployments.values())
                    for process in [d.model_process]
                    if process is not None and process.alive and process.cuda_memory_allocated is not None}
        if children:
            family = GaugeMetricFamily("vla_model_process_cuda_memory_allocated_bytes", "Deployments with "
                                       "model_process on CUDA: CUDA memory in use by tensors in the deployment's "
                                       "model process, after its last call.", labels=["deployment"])
            for name, value in children.items():
                family.add_metric([name], float(value))
            yield family


def _cuda_memory() -> dict[str, float]:
    import sys

    torch = sys.modules.get("torch")  # no import here: a CPU-only scrape must not pay for it
    if torch is None or not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": float(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}


def _route_template(scope: Scope) -> Optional[str]:
    """The template of the route that serves ``scope``'s path, for a request refused before routing (a 401, an
    early 503): None where no route serves it."""
    app = scope.get("app")
    for route in _routes(getattr(getattr(app, "router", None), "routes", ())):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", None)
    return None


def _routes(routes) -> Iterator:
    """``routes`` with the routes of each included router in its place. (FastAPI 0.16x keeps an included router
    as one entry, with no path of its own; ours are included without a prefix, so their routes' paths are whole.)"""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)
        else:
            yield route


class RequestMetrics:
    """Counts, times and logs (one ``service.access`` line) every HTTP request, refused ones included, by its
    route template (``/predict/transformer``, ``/sessions/{session_id}/step``): the route Starlette matched."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # From its arrival (a light request the pacer held: from before its hold), for its latency here and for those
        # counted from arrival (first token). (Set in every request's state: a server may share one state dict.)
        started = scope.get(ARRIVED) or time.perf_counter()
        scope.setdefault("state", {})["received_at"] = started
        status: Optional[int] = None
        left = False  # the client disconnected (an app that then answers nothing has no error of its own)
        event_stream = False  # the reply is a stream of server-sent events

        async def send_counted(message: Message) -> None:
            nonlocal status, event_stream
            if message["type"] == "http.response.start":
                status = message["status"]
                event_stream = any(name == b"content-type" and value.startswith(b"text/event-stream")
                                   for name, value in message.get("headers", ()))
            await send(message)

        async def receive_watched() -> Message:
            nonlocal left
            message = await receive()
            left = left or message["type"] == "http.disconnect"
            return message

        try:
            await self.app(scope, receive_watched, send_counted)
        except Exception as e:
            # Answered here, inside the request-id layer: the 500 has the error shape and the request's id, and the
            # keep-alive connection goes on (Starlette's outermost handler answers, then re-raises, and uvicorn
            # resets the connection). A reply already started cannot become an error: that one ends the connection.
            if status is not None:
                raise
            await unexpected_error(scope, e)(scope, receive, send_counted)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs once the drain (VLA_DRAIN_TIMEOUT_S) is over: the client is told in
            # the error shape, with its request id, instead of uvicorn's plain 500 and a logged traceback, and the
            # request ends here (the process is exiting).
            if not getattr(scope["app"].state, "draining", False):
                raise
            access_log.warning("%s %s cut off: the drain timeout (VLA_DRAIN_TIMEOUT_S) was over",
                               scope["method"], loggable_path(scope["path"]))
            message = ("the server shut down before this request finished: its drain timeout (VLA_DRAIN_TIMEOUT_S) "
                       "was over; send it again (to another replica)")
            if status is None:
                await error_response(Request(scope), 503, message, type="unavailable",
                                     headers={"Connection": "close", "Retry-After": "1"})(scope, receive, send_counted)
            elif event_stream:  # a stream under way ends with the error in-band and its end, as its other errors do
                last = sse_error(503, message, scope) + SSE_DONE
                try:
                    await send({"type": "http.response.body", "body": last.encode(), "more_body": False})
                except Exception:  # (its client has gone too)
                    pass
        finally:
            route = getattr(scope.get("route"), "path", None) or _route_template(scope)
            if status is None:  # nothing answered: the client left first (nginx's 499), else a fault of ours
                status = CLIENT_CLOSED if left else 500
            self.metrics.record_request(scope["method"], scope["path"], route, status, time.perf_counter() - started)
