"""TorchScript traces with the weights as inputs, one per architecture and key in the process.

Why. TorchScript keeps every trace's graph until the process ends (its functions and types stay in
its global compilation unit whatever becomes of the traced module), so tracing each loaded model
anew grows the process by its traces at every reload or unload: about 60 MB per policy graph of
the demo policy, 480 MB per load of it with its eight graphs (measured with ``/proc/self/statm``
around load and unload cycles; ``malloc_trim`` gave nothing back). Here the traced function takes
the module's parameters and buffers as inputs, so a trace holds none of them and serves every
module of the same architecture: a reloaded checkpoint, or one loaded again, traces nothing new and
its old weights are freed. What is left is one trace per architecture and key for the life of the
process (``policy_graphs.py`` and ``slot_graphs.py`` bound how many keys a model traces).

A trace still freezes everything that is not an input: Python numbers and branches, and tensors
that are plain attributes rather than parameters or buffers (rotary tables built from the config).
The architecture key holds the modules' reprs, their ``params`` and ``config`` and every weight's
name, shape, dtype and device, so modules that share a trace share those; callers still check each
trace against their own module's eager call before it serves them.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_TRACES: dict[tuple, Callable[..., torch.Tensor]] = {}  # (architecture key, caller's key) → trace
_LOCK = threading.Lock()  # two deployments of one architecture warming up at once trace it once


def architecture(module: torch.nn.Module) -> tuple[list[str], tuple]:
    """The names of ``module``'s parameters and buffers (every alias of a shared one: each is an input), and
    the key of its architecture (see the module's docstring)."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    settings = tuple(repr(getattr(m, attr)) for m in module.modules() for attr in ("params", "config")
                     if getattr(m, attr, None) is not None)
    key = (type(module).__qualname__, repr(module), settings,
           tuple((n, tuple(t.shape), t.dtype, str(t.device)) for n, t in named))
    return [n for n, _ in named], key


@contextmanager
def weights_from(module: torch.nn.Module, names: list[str], tensors) -> Iterator[None]:
    """``module`` reading ``tensors`` in place of its parameters and buffers ``names`` (a trace then takes them
    as inputs)."""
    saved = []
    for name, tensor in zip(names, tensors):
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        table = sub._parameters if attr in sub._parameters else sub._buffers
        saved.append((table, attr, table[attr]))
        table[attr] = tensor
    try:
        yield
    finally:
        for table, attr, tensor in reversed(saved):
            table[attr] = tensor


class SharedTrace:
    """A shared trace, called with one module's own weights: ``trace(*inputs)`` as ``module(*inputs)``."""

    def __init__(self, trace, weights: tuple[torch.Tensor, ...]):
        self.trace, self.weights = trace, weights

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.trace(self.weights, *inputs)


def shared_trace(module: torch.nn.Module, key: tuple, example: tuple[torch.Tensor, ...]) -> SharedTrace:
    """The process's trace of ``module`` for ``key`` (traced now on ``example`` when its architecture has none
    for that key), bound to ``module``'s weights. Tracer warnings are silenced: callers key and check what a
    trace froze."""
    names, arch = architecture(module)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    weights = tuple(tensors[n] for n in names)
    with _LOCK:
        trace = _TRACES.get((arch, key))
        if trace is None:
            held = [module]  # emptied after tracing: TorchScript keeps the traced function, and so its closure

            def call(state: tuple[torch.Tensor, ...], *inputs: torch.Tensor) -> torch.Tensor:
                with weights_from(held[0], names, state):
                    return held[0](*inputs)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)  # "torch.jit.trace is deprecated"
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
                # without the example inputs, which would keep this module's weights alive with the trace
                trace = torch.jit.trace(call, (weights, *example), check_trace=False, _store_inputs=False)
            held.clear()
            _TRACES[(arch, key)] = trace
    return SharedTrace(trace, weights)


def count() -> int:
    """Traces made in this process so far."""
    return len(_TRACES)
