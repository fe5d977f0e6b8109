"""A flow-matching policy's sampling replayed from a captured graph: the backbone once, then the S
denoiser steps and flow updates, as one call with no Python between the ops. (A backbone that runs a
whole VLM runs eagerly before the graph, which then starts at its tokens: see ``_after_backbone``. Such a
trace still takes the VLM's weights among its inputs, unused: tens of microseconds a call for hundreds of
tensors.)

Why. An eager sampling call is hundreds of small ops, and every torch op hands the interpreter
lock back and reacquires it. In a server the event loop holds that lock whenever it has work, so
under cheap traffic (health probes, many robots' sockets) the model thread waits for the lock at
every op: one robot's policy call went from 28 ms to 142 ms, and in another run to 2.8 s, while 16
connections flooded ``/health/live``. A captured graph takes the lock once per call:
- on CPU, a TorchScript trace (``torch.jit.trace``) per exact input shape; the trace runs its ops
  in C++ with the lock released. TorchScript keeps every trace's graph for the life of the process
  (in its global compilation unit), whatever becomes of the traced module: tracing each loaded
  policy anew would grow the process by its traces at every reload or unload (about 60 MB per
  graph for the demo policy, 480 MB per load). So the weights are the trace's inputs, not part of
  it: one trace serves every policy of the same architecture in the process (``shared_traces.py``),
  and a reloaded checkpoint, or one loaded again, traces nothing new. Tracing is deprecated in
  favour of ``torch.compile`` and ``torch.export``, but neither runs a graph without the
  interpreter (compiled code is still driven op by op from Python, and AOTInductor needs minutes
  of C++ compilation per policy), so it is the one tool that fits; where it is gone or fails,
  sampling stays eager.
- on CUDA, a CUDA graph per batch bucket (1, 2, 4, 8, 16, 32): a batch is padded up to its bucket
  (copies of its last row; rows never mix), its inputs are copied into the graph's static
  buffers, and one replay launches every kernel, which also removes the launch cost that bounds
  a small policy on a GPU.

When graphs are captured. Warm-up (``capture``) captures every batch size at the deployment's step count before
the first request. From then on the policy is serving, and no call waits for a capture: a shape without a graph
(the first request with past action rows, say) samples eagerly, and on the CPU its trace is made on a background
thread (on CUDA, where a capture takes a fraction of a second, at once); a step count other than the warmed-up one
always samples eagerly. Tracing per step count a client names would let one request stall every robot of the
deployment (60 steps took 15 s to trace on the 2-core CPU) and grow the process by a trace each time. Before
warm-up (a pipeline used in-process), a shape is captured on first use, in the call.

Only flow-matching policies replay: their sampling is a fixed function of the observation and
the initial noise. A DDPM policy's steps draw fresh noise from each request's own generator,
which a graph cannot keep per request, so it samples eagerly.

A graph freezes every Python branch its capture took. Branches on shapes are safe: a graph serves
one shape. A branch on values would be frozen too; the usual one is a library skipping an attention
mask when nothing is padded (transformers does not skip while tracing, but other code may), so a
graph's key also holds whether each mask input is all true, next to the shapes, dtypes and step
count. Every graph is checked against the eager sampler on the inputs it was captured with before
it serves (``GRAPH_TOLERANCE``); a graph that fails the check or the capture is remembered, and that
key samples eagerly.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import threading
from typing import Callable, Optional

import torch

from vla_foundry.models.shared_traces import shared_trace
from vla_foundry.schedulers import FlowMatchingScheduler

logger = logging.getLogger(__name__)

CUDA_BUCKETS = (1, 2, 4, 8, 16, 32)
# Graphs captured per policy, at most; later shapes sample eagerly. A bound on captures, not an LRU: a dropped
# TorchScript trace does not give its memory back (see above), so replacing graphs would grow the process
# without end.
MAX_GRAPHS_PER_POLICY = 16
GRAPH_TOLERANCE = 1e-5  # max |graph − eager| in normalized action units (float32) for a graph to serve
GRAPH_TOLERANCE_LOW_PRECISION = 2e-2  # the same for bf16/fp16 layers (the two runs may pick other kernels)
# The order of the sampler's tensor inputs (``generate_actions``' names); absent ones are left out.
INPUT_NAMES = ("input_ids", "pixel_values", "attention_mask", "attention_mask_images", "condition", "actions",
               "past_mask", "proprioception")
SAMPLING_NAMES = ("actions", "past_mask", "proprioception")  # what the steps after the backbone read
MASK_NAMES = ("attention_mask", "attention_mask_images", "past_mask")  # whether each is all true is in the key


def cuda_bucket(batch_size: int) -> Optional[int]:
    """The captured batch size a batch of ``batch_size`` is padded to; None above the largest."""
    return next((b for b in CUDA_BUCKETS if b >= batch_size), None)


class _Sampler(torch.nn.Module):
    """``generate_actions`` with a fixed step count and the initial noise as an input: what is traced."""

    def __init__(self, model, names: tuple[str, ...], steps: int):
        super().__init__()
        self.model, self.names, self.steps = model, names, steps

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        *inputs, noise = tensors
        return self.model.generate_actions(**dict(zip(self.names, inputs)), num_inference_steps=self.steps,
                                           initial_noise=noise)


class _CudaGraph:
    """One captured sampling call on static buffers; ``__call__`` copies the inputs in and replays."""

    def __init__(self, sampler: _Sampler, example: list[torch.Tensor]):
        self.static = [t.clone() for t in example]
        device = example[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
            for _ in range(2):
                sampler(*self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a capture may happen while serving (a new bucket or step count), and another deployment's
        # thread using CUDA meanwhile must not spoil it (the default, global, fails it on their calls too).
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = sampler(*self.static)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        for buffer, tensor in zip(self.static, tensors):
            buffer.copy_(tensor)
        self.graph.replay()
        return self.output.clone()


class _CaptureThread:
    """The process's thread for background captures, started on first use. At exit it finishes the capture under
    way and stops: a thread still inside torch's C++ when the interpreter finalizes would abort the process, and a
    thread pool's workers would wait for every queued capture."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="policy-graph-capture", daemon=True)
                self._thread.start()
                atexit.register(self._stop)
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            _run_job(*job)
            del job  # (held while waiting for the next, it would keep its policy's model alive after an unload)

    def _stop(self) -> None:
        while True:  # queued captures are dropped: nobody will replay them
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        self._thread.join(timeout=120)


def _run_job(future: concurrent.futures.Future, fn: Callable, args: tuple) -> None:
    """One job: its outcome to its future (None: a capture's graph is kept by its policy, not by the future)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        fn(*args)
        future.set_result(None)
    except BaseException as e:  # noqa: BLE001 — handed to whoever waits on it
        future.set_exception(e)


_CAPTURE_THREAD = _CaptureThread()


def _resize_batch(t: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    """``t`` of ``batch`` samples (each its dim-0 block of rows: one row, or one per camera frame for pixels)
    grown to ``size`` samples with copies of the last sample."""
    rows = t.shape[0] // batch
    extra = t[-rows:].repeat(size - batch, *([1] * (t.dim() - 1)))
    return torch.cat([t, extra])


class PolicyGraphs:
    """Captured sampling graphs for one flow-matching ``DiffusionPolicy``, created on first use per shape."""

    def __init__(self, model, *, cuda_graphs: bool = True, trace_on_cpu: bool = True):
        self.model = model
        self.cuda_graphs, self.trace_on_cpu = cuda_graphs, trace_on_cpu
        self._graphs: dict[tuple, Callable[..., torch.Tensor]] = {}
        self._refused: set[tuple] = set()
        # Serving (``serve``): the step counts whose shapes are still captured (in the background on the CPU).
        self.serving_steps: Optional[frozenset[int]] = None
        self._closed = False  # (``close``: its policy is unloaded; nothing more is captured)
        self._pending: dict[tuple, concurrent.futures.Future] = {}  # background captures, by key
        self._lock = threading.Lock()  # _pending and the bound on graphs: the model thread and the capturer

    def __len__(self) -> int:
        """How many graphs are captured and serving."""
        return len(self._graphs)

    @staticmethod
    def supports(model) -> bool:
        """Flow-matching policies replay (a DDPM policy's steps draw noise per request: eager, see above)."""
        return isinstance(model.scheduler, FlowMatchingScheduler)

    def _after_backbone(self, inputs: dict[str, Optional[torch.Tensor]]) -> dict[str, Optional[torch.Tensor]]:
        """``inputs`` for a graph that starts at the backbone's tokens, the backbone run eagerly now: for a backbone
        whose work is no fixed function of its inputs' shapes (the VLM backbones branch on their inputs' values,
        see ``vlm_backbones.py``, which a graph would freeze)."""
        if getattr(self.model.vision_language_backbone, "traceable", True) or "condition" in inputs:
            return inputs
        observation = {n: t for n, t in inputs.items() if n not in SAMPLING_NAMES}
        return {"condition": self.model.encode_observation(**observation),
                **{n: inputs.get(n) for n in SAMPLING_NAMES}}

    @property
    def enabled(self) -> bool:
        device = next(self.model.parameters()).device
        return self.supports(self.model) and (self.cuda_graphs if device.type == "cuda" else self.trace_on_cpu)

    def mode(self) -> str:
        """How sampling runs: ``cuda_graph``, ``traced`` or ``eager`` (shown in ``/models``)."""
        if not self.enabled:
            return "eager"
        return "cuda_graph" if next(self.model.parameters()).device.type == "cuda" else "traced"

    def sample(self, inputs: dict[str, Optional[torch.Tensor]], steps: int, initial_noise: torch.Tensor
               ) -> torch.Tensor:
        """Normalized actions (B, Ta, A), equal to ``model.generate_actions(**inputs, num_inference_steps=steps,
        initial_noise=initial_noise)``: from a graph where one serves this shape, else eagerly."""
        if self.enabled:
            inputs = self._after_backbone(inputs)
            names = tuple(n for n in INPUT_NAMES if inputs.get(n) is not None)
            tensors = [inputs[n] for n in names] + [initial_noise]
            out = self._replay(names, tensors, steps)
            if out is not None:
                return out
        return self.model.generate_actions(**inputs, num_inference_steps=steps, initial_noise=initial_noise)

    def _replay(self, names: tuple[str, ...], tensors: list[torch.Tensor], steps: int) -> Optional[torch.Tensor]:
        batch = tensors[-1].shape[0]  # the initial noise (B, Ta, A)
        on_cuda = tensors[-1].device.type == "cuda"
        size = cuda_bucket(batch) if on_cuda else batch
        if size is None:
            return None
        if size > batch:  # pad with copies of the last sample: each sample's result depends on its own rows alone
            tensors = [_resize_batch(t, batch, size) for t in tensors]
        masks = tuple(bool(t.all()) for n, t in zip(names, tensors) if n in MASK_NAMES)
        key = (names, steps, tuple((tuple(t.shape), t.dtype) for t in tensors), masks)
        graph = self._graphs.get(key)
        if graph is None:
            if key in self._refused or not self._may_capture(key, batch, steps):
                return None
            if self.serving_steps is not None and not on_cuda:  # serving: traced meanwhile, this call eager
                with torch.inference_mode(False):  # (the caller's tensors are its own to change; plain copies)
                    example = [t.clone() for t in tensors]
                with self._lock:  # (held until it is recorded: the capture forgets it under the lock when done)
                    self._pending[key] = self._in_background(self._capture, key, names, example, steps, False)
                return None
            graph = self._capture(key, names, tensors, steps, on_cuda)
            if graph is None:
                return None
        return graph(*tensors)[:batch]

    def _may_capture(self, key: tuple, batch: int, steps: int) -> bool:
        """Whether ``key`` may be captured now: a step count a serving policy captures, no capture of it under way,
        and room under the bound (else it samples eagerly for good)."""
        if self.serving_steps is not None and steps not in self.serving_steps:
            return False
        with self._lock:
            if key in self._pending:
                return False
            if len(self._graphs) + len(self._pending) >= MAX_GRAPHS_PER_POLICY:
                self._refused.add(key)
                logger.warning("policy sampling for batch %d, %d steps runs eagerly: this policy has captured its "
                               "%d graphs", batch, steps, MAX_GRAPHS_PER_POLICY)
                return False
        return True

    @staticmethod
    def _in_background(fn: Callable, *args) -> concurrent.futures.Future:
        """``fn(*args)`` on the process's capture thread (one capture at a time, every policy's)."""
        return _CAPTURE_THREAD.submit(fn, *args)

    def serve(self, steps: int) -> None:
        """Serving from now on, at ``steps`` among others (see the module's docstring): no call waits for a capture
        any more; later shapes of these step counts are captured without a call waiting, other step counts
        sample eagerly."""
        self.serving_steps = (self.serving_steps or frozenset()) | {steps}

    def close(self) -> None:
        """Its policy is done (unloaded, or replaced by a reload): queued captures are dropped, and one under way
        keeps nothing (its policy's model is freed once it ends)."""
        self._closed = True
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            future.cancel()

    def wait(self) -> None:
        """Until the background captures asked for so far have ended (captured, refused or dropped)."""
        for future in list(self._pending.values()):
            concurrent.futures.wait([future])

    def _capture(self, key: tuple, names, tensors: list[torch.Tensor], steps: int, on_cuda: bool):
        try:
            if self._closed:  # (queued before its policy was unloaded)
                return None
            return self._captured(key, names, tensors, steps, on_cuda)
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _captured(self, key: tuple, names, tensors: list[torch.Tensor], steps: int, on_cuda: bool):
        sampler = _Sampler(self.model, names, steps)
        try:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: the graph serves any later mode
                example = [t.clone() for t in tensors]
                # On CPU the process's trace for this key, with this policy's weights: the key and the check below
                # cover the branches a trace froze, and the check runs for each policy that takes up a shared trace.
                graph = _CudaGraph(sampler, example) if on_cuda else shared_trace(sampler, key, example)
                eager = sampler(*example)
                for _ in range(2):  # TorchScript's executor optimizes after its first runs: check what serves
                    replayed = graph(*example)
            error = (replayed.float() - eager.float()).abs().max().item()
            low_precision = next(self.model.parameters()).dtype != torch.float32
            tolerance = GRAPH_TOLERANCE_LOW_PRECISION if low_precision else GRAPH_TOLERANCE
            if not error <= tolerance:
                raise RuntimeError(f"the graph differs from eager sampling by {error:.3g} (tolerance {tolerance:g})")
        except Exception as e:  # noqa: BLE001 — any capture failure means eager sampling for this shape
            self._refused.add(key)
            logger.warning("policy sampling for batch %d, %d steps runs eagerly: %s: %s", tensors[0].shape[0],
                           steps, type(e).__name__, e)
            return None
        self._graphs[key] = graph
        return graph

    def capture(self, inputs: dict[str, Optional[torch.Tensor]], steps: int, batch_sizes: list[int]) -> None:
        """Capture ahead of the first requests (warm-up): one graph per batch size (on CUDA, per bucket),
        from ``inputs`` of batch 1 repeated. The policy is serving from then on (see the module's docstring):
        later shapes of ``steps`` are captured without a call waiting, other step counts sample eagerly."""
        if not self.enabled:
            return
        sizes = sorted({cuda_bucket(b) or b for b in batch_sizes} if next(self.model.parameters()).device.type
                       == "cuda" else set(batch_sizes))
        one = inputs["actions"].shape[0]
        inputs = self._after_backbone(inputs)  # (a VLM backbone runs once here, on the real rows alone)
        serving, self.serving_steps = self.serving_steps, None  # (captured in this call, whatever came before)
        try:
            for size in sizes:
                batch = {n: (_resize_batch(t, one, size) if t is not None else None) for n, t in inputs.items()}
                self.sample(batch, steps, torch.zeros_like(batch["actions"]))
        finally:
            self.serving_steps = serving
        self.serve(steps)
