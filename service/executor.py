"""One executor per deployment: a worker thread fed by a bounded queue (DESIGN §7).

Requests to one model run on its thread, other models keep serving, and the event loop
never runs model code. A full queue is refused at once (503), not buffered.

Dynamic batching: a request submitted with ``submit_batched(fn, key, item)`` may share one
call ``fn(items)`` with the other queued requests of the same ``fn`` and ``key`` (the things
a batch must agree on, e.g. a policy's step count). When the thread is free it takes the
oldest request, then every compatible one already queued, up to ``max_batch_size``; with
``batch_wait_ms`` > 0 it waits that long for more before running a batch that is not full
(0, the default, never delays a lone request). Incompatible requests keep their place for
the next turn. ``fn`` returns one result per item, in order, where an exception instance is
that item's failure; if ``fn`` itself raises, each item is run alone, so one bad item fails
only itself.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

from service.images import hold_pixels_until
from service.text_process import GENERATIONS  # (a local batcher's Generation, or a model process's request for one)

logger = logging.getLogger(__name__)


# A batch's wait for more requests (batch_wait_ms) ends this long before the earliest deadline among its requests, so
# that the call starts before it (a thread that wakes later still runs them: they were taken in time, ``_take``).
GATHER_MARGIN_S = 0.005


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    """A request's deadline passed while it waited: it was dropped before its model call."""


@dataclass
class Timed:
    value: Any
    queue_ms: float
    run_ms: float
    batch_size: int = 1


@dataclass
class _Job:
    future: concurrent.futures.Future
    queued_at: float
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Optional[dict] = None
    batch_key: Optional[Hashable] = None  # set for batchable jobs: fn(items) → results, args = (item,)
    deadline: Optional[float] = None  # time.perf_counter() after which the job is dropped unrun
    measured: bool = True  # counts toward the model time per request (not so: loading a checkpoint)
    batcher: Any = None  # set for generations: fn() makes one, and this ContinuousBatcher decodes it with others
    released: bool = False  # no longer counted as waiting (taken by the model thread, or its client left)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    @property
    def batchable(self) -> bool:
        return self.batch_key is not None


class ModelExecutor:
    def __init__(self, name: str, max_queue: int, max_batch_size: int = 1, batch_wait_ms: float = 0.0):
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_ms
        self.max_queue = max_queue
        # Requests waiting, whether still in the queue or held back by a batch they could not join: the bound
        # counts both, so a turn that holds back requests does not make room for more.
        self._waiting = threading.BoundedSemaphore(max_queue)
        self.depth = 0  # requests waiting (queued or held back), for the metrics; the semaphore is the bound
        self.batched_depth = 0  # of which batchable (they wait in batches of up to max_batch_size)
        # Requests admitted but not queued yet (their bodies parsed, their images decoded), batchable or not:
        # counted by the expected wait, so a burst that arrives while the queue is empty is not all admitted
        # (event loop only).
        self.pending = {True: 0, False: 0}
        # Recent model time of one call by its batch size (moving averages), and the call now running
        # (started, batch size): what the expected wait of a new request is made of.
        self.call_seconds: dict[int, float] = {}
        self._running: Optional[tuple[float, int]] = None
        self.last_call_done = -math.inf  # time.perf_counter() when the last measured call ended
        self.decoding = False  # a continuous batcher is stepping (_run_continuous)
        # depth and batched_depth change on the event loop (a request queued) and on the model thread (taken):
        # read-modify-writes, so under a lock (an update lost would leave a phantom wait for good).
        self._counts = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._held: collections.deque[_Job] = collections.deque()  # taken off the queue, not yet batched
        self._in_hand: list[_Job] = []  # the jobs of the call or batch now running (what a fault of the loop fails)
        self._thread = threading.Thread(target=self._work, name=f"model-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, deadline: Optional[float] = None,
               **kwargs: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)``; the future's result is a :class:`Timed`. Raises QueueFull. A job still
        waiting at ``deadline`` (``time.perf_counter()``) is dropped: its future raises DeadlineExceeded."""
        return self._put(_Job(concurrent.futures.Future(), time.perf_counter(), fn, args, kwargs, None, deadline))

    def submit_setup(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Queue ``fn()`` (e.g. loading the model) on this thread, outside the model-time statistics."""
        return self._put(_Job(concurrent.futures.Future(), time.perf_counter(), fn, measured=False))

    def submit_batched(self, fn: Callable[[list], list], key: Hashable, item: Any,
                       deadline: Optional[float] = None) -> concurrent.futures.Future:
        """Queue ``item`` for ``fn(items) -> results`` with the compatible queued items (same ``fn``, same
        ``key``); the future's result is a :class:`Timed` of this item's result. Raises QueueFull."""
        return self._put(_Job(concurrent.futures.Future(), time.perf_counter(), fn, (item,), None, ("batch", key),
                              deadline))

    def submit_continuous(self, batcher: Any, start: Callable[[], Any],
                          deadline: Optional[float] = None) -> concurrent.futures.Future:
        """Queue a generation for ``batcher`` (a ``vla_foundry.continuous.ContinuousBatcher``): on the model thread
        ``start()`` makes it (any value that is not a ``Generation`` is the result at once), and the batcher decodes
        it together with the generations already running, step by step. The future's result is a :class:`Timed`;
        cancelling the future (its client left) drops the generation at the batcher's next step."""
        future = self._put(_Job(concurrent.futures.Future(), time.perf_counter(), start, deadline=deadline,
                                batcher=batcher))
        wakeup = getattr(batcher, "wakeup", None)  # (a model process's batcher: the model thread may be waiting on it)
        if wakeup is not None:
            wakeup()
        return future

    def expected_wait_s(self, batchable: bool = True, own_pending: Optional[bool] = None) -> float:
        """How long a request queued now would wait before its call starts: what is left of the running call,
        then a call per plain request ahead, then a full batch per ``max_batch_size`` batchable ones ahead
        (a batchable request joins the last batch that is not full). Under a flood of batchable requests
        this is a few batch calls, not the queue's length times one call: admission keeps batches full.
        ``own_pending``: the asking request is itself one of the ``pending`` of that kind (batchable or not), not
        ahead of itself."""
        size = max(1, self.max_batch_size)
        with self._counts:
            depth, batched_depth = self.depth, self.batched_depth
        plain = depth - batched_depth + self.pending[False] - (own_pending is False)
        batched = batched_depth + self.pending[True] - (own_pending is True)
        batches_ahead = batched // size if batchable else -(-batched // size)  # a plain request joins no batch
        wait = plain * self.call_s(1) + batches_ahead * self.call_s(size)
        running = self._running
        if running is not None:
            wait += max(0.0, self.call_s(running[1]) - (time.perf_counter() - running[0]))
        return wait

    def at_work(self, window_s: float) -> bool:
        """Whether a call is running or queued, or one ended less than ``window_s`` ago."""
        return (self._running is not None or self.decoding or self.depth > 0
                or time.perf_counter() - self.last_call_done < window_s)

    def call_s(self, batch_size: int) -> float:
        """The recent time of one call of ``batch_size`` requests; from the nearest size measured when this one
        is not (scaled up linearly, an upper bound); 0 before any call."""
        measured = dict(self.call_seconds)  # a copy: the model thread adds sizes meanwhile
        if batch_size in measured:
            return measured[batch_size]
        if not measured:
            return 0.0
        nearest = min(measured, key=lambda n: abs(n - batch_size))
        return measured[nearest] * max(1.0, batch_size / nearest)

    def measured_call(self, batch_size: int) -> Optional[tuple[int, float]]:
        """(size, seconds) of the recent call of ``batch_size`` requests as measured, else of the largest size
        below it that was (no guess from other sizes: a call of 8 is not 8 calls of 1); None before any."""
        measured = dict(self.call_seconds)  # a copy: the model thread adds sizes meanwhile
        sizes = [n for n in measured if n <= batch_size]
        return (max(sizes), measured[max(sizes)]) if sizes else None

    def _put(self, job: _Job) -> concurrent.futures.Future:
        if not self._waiting.acquire(blocking=False):
            raise QueueFull(f"deployment {self.name!r} has {self.max_queue} requests waiting")
        with self._counts:
            self.depth += 1
            self.batched_depth += job.batchable
        # A request whose client leaves while it waits (its future cancelled) gives its place back at once, not when
        # the model thread reaches it: the queue's bound and the expected wait count the live requests only. (Through
        # a weak reference: the future keeps its callbacks, and a job it referred to would be freed only by a full
        # collection, with its inputs, a request's decoded images among them.)
        waiting = weakref.ref(job)
        job.future.add_done_callback(lambda future: future.cancelled() and (job := waiting()) is not None
                                     and self._release(job))
        self._queue.put_nowait(job)
        return job.future

    async def run(self, fn: Callable[..., Any], *args: Any, deadline: Optional[float] = None, **kwargs: Any) -> Timed:
        return await _outcome(self.submit(fn, *args, deadline=deadline, **kwargs), deadline)

    async def run_batched(self, fn: Callable[[list], list], key: Hashable, item: Any,
                          deadline: Optional[float] = None) -> Timed:
        return await _outcome(self.submit_batched(fn, key, item, deadline), deadline)

    async def run_continuous(self, batcher: Any, start: Callable[[], Any], deadline: Optional[float] = None) -> Timed:
        return await _outcome(self.submit_continuous(batcher, start, deadline))

    # ------------------------------------------------------------------ the model thread

    def _next(self, timeout: Optional[float] = None) -> Optional[_Job]:
        """The oldest job not yet taken (held ones first); None at shutdown. Raises queue.Empty on timeout."""
        if self._held:
            return self._held.popleft()
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            self._turn(self._dispatch, job)

    def _turn(self, handle: Callable[["_Job"], None], job: "_Job") -> None:
        """``handle(job)``. A fault of this loop's own code (a model call's failure is its request's) fails the
        requests in hand with it, and the thread serves on: a dead thread would leave every later request of the
        deployment waiting for ever, and a turn taken between decode steps must not strand the running batch."""
        try:
            handle(job)
        except BaseException as e:
            logger.exception("deployment %s: the model thread failed a turn", self.name)
            for taken in self._in_hand:
                self._release(taken)
                _fail(taken, e)
        finally:
            self._in_hand = []

    def _dispatch(self, job: _Job) -> None:
        self._in_hand = [job]
        if job.batcher is not None:
            self._run_continuous(job)
        elif job.batchable and self.max_batch_size > 1:
            if self._take(job):  # (else it would hold a place in the batch, and its wait)
                self._run_batch(self._gather(job))
        else:
            self._run_one(job)

    def _run_continuous(self, first: _Job) -> None:
        """Decode step after step while ``first``'s batcher has generations: before each step, the generations
        queued for it join (while it has room for them to wait), and one other queued job runs, so a
        deployment's evaluations are not held up by a stream that never ends. Shutdown (``None``) waits until
        the running generations are done."""
        batcher = first.batcher
        self._join(first)
        self.decoding = True
        try:
            self._decode_while_active(batcher)
        finally:
            self.decoding = False

    def _decode_while_active(self, batcher: Any) -> None:
        while batcher.active:
            taken: list = []
            try:
                while True:
                    try:
                        job = self._held.popleft() if self._held else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None and job.batcher is batcher and batcher.waiting_sequences < batcher.num_slots:
                        self._turn(self._join, job)
                        continue
                    taken.append(job)
                    if job is None:  # shutdown: nothing after it is taken
                        break
            finally:  # (after a fault of a join too: the jobs passed over still run, in order)
                self._held.extendleft(reversed(taken))
            # The oldest job that is not a generation (none after a shutdown marker): it runs even when generations
            # that cannot join yet (the batcher's waiting room is full) are ahead of it.
            other = next((i for i, job in enumerate(self._held) if job is None or job.batcher is None), None)
            if other is not None and self._held[other] is not None:
                job = self._held[other]
                del self._held[other]
                self._turn(self._dispatch, job)
            try:
                batcher.step()
            except Exception as e:  # a fault of the batcher itself: fail what it holds, keep the thread alive
                logger.exception("deployment %s: a decode step failed", self.name)
                batcher.fail_all(e)

    def _join(self, job: _Job) -> None:
        """Hand a queued generation to its batcher (or its failure, or an immediate result, to its future)."""
        self._in_hand = [job]
        self._release(job)
        now = time.perf_counter()
        if job.expired(now):
            if job.future.set_running_or_notify_cancel():  # (a cancelled one needs no answer)
                _dropped_if_expired(job, now)
            return
        if job.future.cancelled():
            return
        try:
            generation = job.fn()
        except BaseException as e:  # its own input, refused
            generation = e
        if not isinstance(generation, GENERATIONS):
            self._finish(job, generation, now)
            return
        rows = len(generation.ids)

        def too_late() -> Optional[BaseException]:  # its deadline passed while it waited for a slot
            late = time.perf_counter()
            return _deadline_passed(job, late) if job.expired(late) else None

        job.batcher.submit(generation, lambda outcome: self._finish(job, outcome, now, job.batcher, rows),
                           cancelled=job.future.cancelled, too_late=too_late)
        self._in_hand = []  # (the batcher holds it now, and gives it its outcome)

    def _finish(self, job: _Job, outcome: Any, joined: float, batcher: Any = None, rows: int = 1) -> None:
        """A generation's outcome to its future (nothing when its client has gone: the future is cancelled)."""
        if job.future.done() or not job.future.set_running_or_notify_cancel():  # (done: failed by a fault)
            return
        done = time.perf_counter()
        self.last_call_done = done
        # The sequences that were decoding together when it finished, its own included (it has left the batch).
        together = (batcher.running_sequences if batcher is not None else 0) + rows
        _deliver(job, outcome, joined, done, together)

    def _gather(self, first: _Job) -> list[_Job]:
        """``first`` and the queued jobs that may share its call, oldest first; others are held in order. Jobs
        whose client has gone or whose deadline has passed take no place (they are settled as they are met). The
        wait for more (``batch_wait_ms``) ends early enough for every gathered job to start before its deadline,
        and for the call to end before the deadline of every job held back behind it."""
        batch, skipped = [first], []
        self._in_hand = batch  # (taken, their futures running: a fault of this loop fails them, ``_work``)
        end = time.perf_counter() + self.batch_wait_ms / 1000
        try:
            while len(batch) < self.max_batch_size:
                due = min((job.deadline for job in batch if job.deadline is not None), default=math.inf)
                if self.batch_wait_ms:
                    behind = min((job.deadline for job in itertools.chain(skipped, self._held)
                                  if job is not None and job.deadline is not None), default=math.inf)
                    due = min(due, behind - self.call_seconds.get(len(batch), 0.0))
                wait = min(end, due - GATHER_MARGIN_S) - time.perf_counter()
                try:
                    job = self._held.popleft() if self._held else (
                        self._queue.get_nowait() if wait <= 0 else self._queue.get(timeout=wait))
                except queue.Empty:
                    break
                if job is None:  # shutdown: run this batch, then stop
                    skipped.append(job)
                    break
                if job.fn is first.fn and job.batch_key == first.batch_key:
                    batch.append(job)  # in hand while it is taken: a fault of this loop then fails it too
                    if not self._take(job):
                        batch.pop()
                else:
                    skipped.append(job)
        finally:  # (after a fault too: the jobs passed over still run, in order)
            self._held.extendleft(reversed(skipped))
        return batch

    def _take(self, job: _Job) -> bool:
        """The model thread takes ``job`` into the batch it gathers: it runs from now on (its future is running, so
        neither its client leaving nor its deadline passing during the gathering's own wait drops it: that wait ends
        before every gathered job's deadline, but a thread wakes late on a busy host, and a request due when the
        model took it is not late). False: it was settled unrun (its client had gone, or its deadline had passed)."""
        if self._settled_unrun(job):
            return False
        if not job.future.set_running_or_notify_cancel():  # its client left just now
            self._release(job)
            return False
        return True

    def _settled_unrun(self, job: _Job) -> bool:
        """Whether ``job``, still queued, no longer runs: its client has gone (dropped) or its deadline has passed
        (failed, 504). Either way it is out of the counts now."""
        now = time.perf_counter()
        if not job.future.cancelled() and not job.expired(now):
            return False
        self._release(job)
        if job.future.set_running_or_notify_cancel():  # (a cancelled one needs no answer)
            _dropped_if_expired(job, now)
        return True

    def _run_one(self, job: _Job) -> None:
        self._release(job)
        if job.future.set_running_or_notify_cancel() and not _dropped_if_expired(job, time.perf_counter()):
            self._call(job)

    def _release(self, job: _Job) -> None:
        """``job`` no longer waits: out of the counts and the queue's bound (once, whoever calls it first)."""
        with self._counts:
            if job.released:
                return
            job.released = True
            self.depth -= 1
            self.batched_depth -= job.batchable
        self._waiting.release()

    def _call(self, job: _Job) -> None:
        """Run one job by itself (its future already running): a plain call, or a batch of one."""
        started = time.perf_counter()
        self._running = (started, 1) if job.measured else None
        try:
            value = job.fn([job.args[0]])[0] if job.batchable else job.fn(*job.args, **(job.kwargs or {}))
        except BaseException as e:  # handed to the awaiting request
            value = e
        done = time.perf_counter()
        self._running = None
        if job.measured:
            self._observe(done - started, 1)
        _deliver(job, value, started, done, 1)

    def _observe(self, seconds: float, items: int) -> None:
        self.last_call_done = time.perf_counter()
        previous = self.call_seconds.get(items)
        self.call_seconds[items] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def _run_batch(self, batch: list[_Job]) -> None:
        """Run a gathered batch (its jobs taken, ``_take``: their futures running)."""
        self._in_hand = batch
        for job in batch:
            self._release(job)
        started = time.perf_counter()
        self._running = (started, len(batch))
        try:
            values = batch[0].fn([job.args[0] for job in batch])
            if len(values) != len(batch):
                raise RuntimeError(f"a batched call returned {len(values)} results for {len(batch)} items")
        except BaseException as e:
            self._running = None
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            logger.info("deployment %s: a batch of %d failed (%s: %s); running its items one by one", self.name,
                        len(batch), type(e).__name__, e)
            for job in batch:  # (each still due: the failed call may have taken it past its deadline)
                if not _dropped_if_expired(job, time.perf_counter()):
                    self._call(job)
            return
        done = time.perf_counter()
        self._running = None
        self._observe(done - started, len(batch))
        for job, value in zip(batch, values):
            _deliver(job, value, started, done, len(batch))

    def retire(self) -> concurrent.futures.Future:
        """Stop after the requests already queued (they run as usual); the future is done when the thread has
        ended. A deployment that is reloaded or unloaded retires its executor: nothing queued is lost."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def watch() -> None:
            self._thread.join()
            done.set_result(None)

        self._queue.put(None)
        threading.Thread(target=watch, name=f"retire-{self.name}", daemon=True).start()
        return done

    def shutdown(self, timeout: float = 10.0) -> None:
        """Finish what is running, then stop; requests still queued are cancelled."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        for job in list(self._held):
            if job is not None:
                job.future.cancel()
        self._queue.put(None)
        self._thread.join(timeout)


async def _outcome(future: concurrent.futures.Future, deadline: Optional[float] = None) -> Timed:
    """``future``'s outcome, awaited. The request cancelled (its client left) while its call runs: the call goes on,
    and the request's decoded images with it, so they stay counted against the in-flight pixel budget until it
    ends (a queued call is dropped with its request).

    With a ``deadline`` (of a job whose future runs once the model thread takes it), a job still queued when the
    deadline passes is cancelled then (dropped unrun, its place given back) and ``DeadlineExceeded`` raised at
    once: the model thread would see it only once it is free, which a long call may put off far past the
    deadline. A job that runs by then (or was gathered into a batch by then) gives its answer."""
    waiting_since = time.perf_counter()
    try:
        wrapped = asyncio.wrap_future(future)
        if deadline is None:
            return await wrapped
        try:
            return await asyncio.wait_for(asyncio.shield(wrapped), max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            if future.cancel():
                now = time.perf_counter()
                raise DeadlineExceeded(f"the request's deadline passed while it waited for the model (it waited "
                                       f"{(now - waiting_since) * 1000:.0f} ms)") from None
            return await wrapped
    except asyncio.CancelledError:
        future.cancel()  # still queued: dropped with its request (awaited through ``shield``, it is not cancelled yet)
        if not future.done():
            hold_pixels_until(future)
        raise


def _dropped_if_expired(job: _Job, now: float) -> bool:
    """Fail a running job whose deadline has passed (its model call never starts); whether it was."""
    if not job.expired(now):
        return False
    job.future.set_exception(_deadline_passed(job, now))
    return True


def _fail(job: _Job, error: BaseException) -> None:
    """Fail ``job`` with ``error`` unless it has its outcome already (or its client has gone)."""
    if not job.future.done() and (job.future.running() or job.future.set_running_or_notify_cancel()):
        job.future.set_exception(error)


def _deadline_passed(job: _Job, now: float) -> DeadlineExceeded:
    late_ms = (now - job.deadline) * 1000
    return DeadlineExceeded(f"the request's deadline passed {late_ms:.0f} ms before the model was free (it waited "
                            f"{(now - job.queued_at) * 1000:.0f} ms)")


def _deliver(job: _Job, value: Any, started: float, done: float, batch_size: int) -> None:
    """A job's outcome to its future: an exception instance is the job's failure."""
    if isinstance(value, BaseException):
        job.future.set_exception(value)
    else:
        job.future.set_result(Timed(value, (started - job.queued_at) * 1000, (done - started) * 1000, batch_size))
