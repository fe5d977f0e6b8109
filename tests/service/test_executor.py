"""The deployment executor's dynamic batching: which queued requests share a call, in what order, and what
happens when a batched call fails."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.executor import DeadlineExceeded, ModelExecutor, QueueFull
from vla_foundry.sampling import SamplingParams


class Recorder:
    """A batched function that records each call's items; items named "bad" make the call raise."""

    def __init__(self):
        self.calls: list[list] = []

    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        if "bad" in items:
            raise ValueError("a bad item")
        return [f"done {item}" for item in items]


def blocked(executor: ModelExecutor) -> threading.Event:
    """Occupies the model thread until the returned event is set (so the next submissions queue up)."""
    release, started = threading.Event(), threading.Event()
    executor.submit(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


@pytest.fixture
def executor():
    executor = ModelExecutor("test", max_queue=64, max_batch_size=3)
    yield executor
    executor.shutdown()


def test_queued_compatible_items_share_calls_fifo_up_to_the_batch_size(executor):
    fn = Recorder()
    release = blocked(executor)
    futures = [executor.submit_batched(fn, key, item) for key, item in
               [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("a", 5), ("b", 6)]]
    release.set()
    results = [f.result(10) for f in futures]
    assert fn.calls == [[1, 3, 4], [2, 6], [5]]  # oldest first; a held item keeps its turn
    assert [r.value for r in results] == [f"done {i}" for i in range(1, 7)]
    assert [r.batch_size for r in results] == [3, 2, 3, 3, 1, 2]


def test_different_functions_never_share_a_call(executor):
    first, second = Recorder(), Recorder()
    release = blocked(executor)
    futures = [executor.submit_batched(first, "k", 1), executor.submit_batched(second, "k", 2),
               executor.submit_batched(first, "k", 3)]
    release.set()
    assert [f.result(10).value for f in futures] == ["done 1", "done 2", "done 3"]
    assert first.calls == [[1, 3]] and second.calls == [[2]]


def test_a_bad_item_fails_alone(executor):
    fn = Recorder()
    release = blocked(executor)
    futures = [executor.submit_batched(fn, "k", item) for item in ("good", "bad", "fine")]
    release.set()
    assert futures[0].result(10).value == "done good" and futures[2].result(10).value == "done fine"
    with pytest.raises(ValueError, match="a bad item"):
        futures[1].result(10)
    assert fn.calls == [["good", "bad", "fine"], ["good"], ["bad"], ["fine"]]  # the batch, then one by one


def test_a_lone_request_is_not_delayed_without_batch_wait():
    """With ``batch_wait_ms`` 0 (the default) a lone request runs at once; beside it, the same request on an
    executor that waits 300 ms for more, so that the bound below tells a wait from a slow thread hand-off."""
    for wait_ms, bound in ((0, lambda s: s < 0.15), (300, lambda s: s >= 0.3)):
        executor = ModelExecutor("test", max_queue=64, max_batch_size=3, batch_wait_ms=wait_ms)
        try:
            fn = Recorder()
            started = time.perf_counter()
            assert executor.submit_batched(fn, "k", 1).result(10).batch_size == 1
            took = time.perf_counter() - started
            assert bound(took) and fn.calls == [[1]], (wait_ms, took)
        finally:
            executor.shutdown()
    default = ModelExecutor("default", max_queue=1)
    assert default.batch_wait_ms == 0
    default.shutdown()


def test_batch_wait_gathers_requests_that_arrive_while_waiting():
    executor = ModelExecutor("test", max_queue=8, max_batch_size=4, batch_wait_ms=400)
    try:
        fn = Recorder()
        first = executor.submit_batched(fn, "k", 1)
        time.sleep(0.05)
        second = executor.submit_batched(fn, "k", 2)
        assert first.result(10).batch_size == second.result(10).batch_size == 2 and fn.calls == [[1, 2]]
    finally:
        executor.shutdown()


def test_batching_off_runs_each_item_alone():
    executor = ModelExecutor("test", max_queue=8, max_batch_size=1)
    try:
        fn = Recorder()
        release = blocked(executor)
        futures = [executor.submit_batched(fn, "k", item) for item in (1, 2)]
        release.set()
        assert [f.result(10).batch_size for f in futures] == [1, 1] and fn.calls == [[1], [2]]
    finally:
        executor.shutdown()


@pytest.mark.parametrize("dead", [1, 2], ids=["first", "later"])
@pytest.mark.parametrize("how", ["cancelled", "expired"])
def test_requests_whose_client_left_or_deadline_passed_take_no_place_in_a_batch(executor, dead, how):
    """Batches of 3: with one of the first three queued requests gone, the fourth takes its place (it was left
    for another call). An expired one gets DeadlineExceeded unrun."""
    fn = Recorder()
    release = blocked(executor)
    soon = time.perf_counter() + 0.05
    futures = [executor.submit_batched(fn, "k", item, deadline=soon if how == "expired" and item == dead else None)
               for item in (1, 2, 3, 4)]
    if how == "cancelled":
        futures[dead - 1].cancel()
    time.sleep(0.1)
    release.set()
    live = [item for item in (1, 2, 3, 4) if item != dead]
    assert [futures[i - 1].result(10).value for i in live] == [f"done {i}" for i in live]
    assert fn.calls == [live]
    if how == "expired":
        with pytest.raises(DeadlineExceeded):
            futures[dead - 1].result(10)
    assert executor.depth == 0


def test_batch_wait_ends_in_time_for_the_deadline_of_a_request_held_back_behind_the_batch():
    """The thread waits for more requests of the oldest one's kind (batch_wait_ms 1 s); a request of another kind
    queued behind it, due in 300 ms, still runs before its deadline (it got 504 with the thread idle)."""
    executor = ModelExecutor("test", max_queue=8, max_batch_size=4, batch_wait_ms=1000)
    try:
        fn = Recorder()
        release = blocked(executor)
        a = executor.submit_batched(fn, "a", "a1")
        b = executor.submit_batched(fn, "b", "b1", deadline=time.perf_counter() + 0.3)
        release.set()
        assert b.result(10).value == "done b1" and a.result(10).value == "done a1"
        assert fn.calls == [["a1"], ["b1"]]
    finally:
        executor.shutdown()


def test_requests_held_back_from_a_batch_still_count_against_the_queue_bound():
    """Requests that could not join the running batch wait outside the queue: the bound counts them, so a full
    deployment still answers QueueFull instead of accepting more."""
    from service.executor import QueueFull

    executor = ModelExecutor("test", max_queue=3, max_batch_size=4)
    try:
        fn, started, gate = Recorder(), threading.Event(), threading.Event()

        def slow(items):
            started.set()
            gate.wait(10)
            return fn(items)

        release = blocked(executor)
        first = executor.submit_batched(slow, "a", 1)
        held = [executor.submit_batched(fn, key, i) for i, key in ((2, "b"), (3, "c"))]
        release.set()
        assert started.wait(10)  # "a" runs; "b" and "c" were looked at and held back: 2 waiting
        extra = executor.submit_batched(fn, "d", 4)  # the one free place
        with pytest.raises(QueueFull):
            executor.submit_batched(fn, "e", 5)
        gate.set()
        assert [f.result(10).value for f in (first, *held, extra)] == [f"done {i}" for i in range(1, 5)]
        assert executor.submit_batched(fn, "e", 5).result(10).value == "done 5"  # room again
    finally:
        executor.shutdown()


# ----------------------------------------------------------------------------- continuous batching


@pytest.fixture(scope="module")
def text_pipeline(transformer_fixture):
    from vla_foundry.pipelines import load_pipeline

    return load_pipeline(transformer_fixture)


def generation(pipeline, max_new_tokens: int, seed: int = 0):
    return lambda: pipeline.start_completion(prompt_token_ids=[[1, 2, 3]], seed=seed,
                                             sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0))


def test_generations_decode_together_and_plain_jobs_run_between_steps(executor, text_pipeline):
    batcher = text_pipeline.continuous_batcher(4)
    release = blocked(executor)
    longest = text_pipeline.model.max_seq_len - 3  # the prompt is 3 tokens
    long_one = executor.submit_continuous(batcher, generation(text_pipeline, longest))
    short_one = executor.submit_continuous(batcher, generation(text_pipeline, 5, seed=1))
    plain = executor.submit(lambda: batcher.active)  # e.g. an evaluation
    release.set()
    assert plain.result(timeout=30).value is True  # it ran between decode steps, not after the generations
    assert short_one.result(timeout=30).batch_size == 2  # it decoded alongside the long one
    solo = text_pipeline.complete(prompt_token_ids=[[1, 2, 3]], seed=0,
                                  sampling=SamplingParams(max_new_tokens=longest, temperature=1.0))
    assert long_one.result(timeout=60).value.completions[0].token_ids == solo.completions[0].token_ids


def test_a_generation_whose_client_left_in_the_queue_never_starts(executor, text_pipeline):
    batcher = text_pipeline.continuous_batcher(4)
    started = []
    release = blocked(executor)
    gone = executor.submit_continuous(batcher, lambda: started.append(1))
    assert gone.cancel()
    kept = executor.submit_continuous(batcher, generation(text_pipeline, 3))
    release.set()
    assert kept.result(timeout=30).value.completions and not started


def test_a_refused_generation_fails_alone_and_retiring_waits_for_the_running_ones(text_pipeline):
    from vla_foundry.errors import InvalidInputError

    executor = ModelExecutor("text", max_queue=8)
    batcher = text_pipeline.continuous_batcher(4)
    running = executor.submit_continuous(batcher, generation(text_pipeline, 20))

    def refused():
        raise InvalidInputError("bad prompt", field="prompt")

    bad = executor.submit_continuous(batcher, refused)
    done = executor.retire()
    with pytest.raises(InvalidInputError):
        bad.result(timeout=30)
    assert done.result(timeout=60) is None and running.done() and running.result().value.completions


def test_a_generation_past_its_deadline_before_it_starts_gets_deadline_exceeded(text_pipeline):
    """Whether the deadline passes in the queue or while waiting in the batcher for the one slot (the batcher's
    side is tested in tests/vla_foundry/test_continuous_batching.py), it ends unrun with DeadlineExceeded."""
    from service.executor import DeadlineExceeded

    executor = ModelExecutor("text", max_queue=8)
    try:
        batcher = text_pipeline.continuous_batcher(1)  # one slot: the second generation waits for it
        longest = text_pipeline.model.max_seq_len - 3
        running = executor.submit_continuous(batcher, generation(text_pipeline, longest))
        waiting = executor.submit_continuous(batcher, generation(text_pipeline, 5, seed=1),
                                             deadline=time.perf_counter() + 0.001)
        with pytest.raises(DeadlineExceeded):
            waiting.result(timeout=30)
        assert running.result(timeout=60).value.completions  # the running one is untouched
        assert not batcher.active and batcher.num_slots == 1
    finally:
        executor.shutdown()


def test_a_request_whose_client_left_gives_its_place_back_at_once():
    """A queued request cancelled by its client (asyncio.wrap_future cancels the future so) no longer counts in the
    queue's bound or the expected wait, before the model thread reaches it; and it is counted out only once."""
    executor = ModelExecutor("test", max_queue=2)
    try:
        executor.call_seconds[1] = 1.0
        release = blocked(executor)
        gone = [executor.submit(lambda: None) for _ in range(2)]
        assert executor.expected_wait_s(False) > 2.0  # the running call's rest and two calls
        assert all(future.cancel() for future in gone)
        assert (executor.depth, executor.batched_depth) == (0, 0)
        assert executor.expected_wait_s(False) <= 1.0  # what is left of the running call only
        live = executor.submit(lambda: "live")  # (refused, QueueFull, while the two counted)
        release.set()
        assert live.result(timeout=10).value == "live"
        # The model thread has passed the two cancelled jobs: still nothing counted twice, and the bound is intact.
        assert (executor.depth, executor.batched_depth) == (0, 0)
        release = blocked(executor)
        queued = [executor.submit(lambda: None) for _ in range(2)]
        with pytest.raises(QueueFull):
            executor.submit(lambda: None)
        release.set()
        assert all(future.result(timeout=10).value is None for future in queued)
    finally:
        executor.shutdown()


def test_batch_wait_ends_in_time_for_a_requests_deadline():
    """A lone request on an idle model is not held for more requests past its deadline (it would get 504)."""
    executor = ModelExecutor("test", max_queue=8, max_batch_size=4, batch_wait_ms=3000)
    try:
        started = time.perf_counter()
        future = executor.submit_batched(Recorder(), "k", 1, deadline=started + 0.3)
        assert future.result(timeout=10).value == "done 1"
        assert time.perf_counter() - started < 2.0  # it did not wait out the 3 s either
    finally:
        executor.shutdown()


def test_a_batch_wait_that_wakes_late_does_not_make_its_request_late(monkeypatch):
    """The wait for more requests ends before the request's deadline, but on a busy host the model thread wakes
    late (here: 50 ms late, by a negative margin): the request was due when the model took it, and runs, awaited on
    its future or as the server awaits it (before, it got 504 "the deadline passed 5 ms before the model was free"
    on an idle model)."""
    import service.executor

    monkeypatch.setattr(service.executor, "GATHER_MARGIN_S", -0.05)
    executor = ModelExecutor("test", max_queue=8, max_batch_size=4, batch_wait_ms=3000)
    try:
        future = executor.submit_batched(Recorder(), "k", 1, deadline=time.perf_counter() + 0.3)
        assert future.result(timeout=10).value == "done 1"
        # as the server awaits it: its deadline's timer finds it gathered (running), not queued, and waits for it
        answer = asyncio.run(executor.run_batched(Recorder(), "k", 2, deadline=time.perf_counter() + 0.3))
        assert answer.value == "done 2"
    finally:
        executor.shutdown()


def test_items_of_a_failed_batch_past_their_deadline_are_not_run_again():
    """When a batched call fails, its items run again one by one, each only if it is still due: the failed call
    (and the items run before it) may have taken it past its deadline."""
    executor = ModelExecutor("test", max_queue=8, max_batch_size=4)
    calls = []

    def slow(items):
        calls.append(list(items))
        time.sleep(0.6)
        if len(items) > 1:
            raise RuntimeError("the batched call failed")
        return [f"done {items[0]}"]

    try:
        release = blocked(executor)
        ok = executor.submit_batched(slow, "k", "a")
        late = executor.submit_batched(slow, "k", "b", deadline=time.perf_counter() + 0.5)
        release.set()
        assert ok.result(timeout=10).value == "done a"
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=10)
        assert calls == [["a", "b"], ["a"]]
    finally:
        executor.shutdown()


def test_a_plain_job_runs_between_steps_even_behind_generations_that_cannot_join_yet(text_pipeline):
    """With one slot (and a waiting room of one), two of four generations are held back until slots free; an
    evaluation queued behind them still runs before the next decode step, not after the generations ahead of it."""
    executor = ModelExecutor("text", max_queue=16)
    try:
        batcher = text_pipeline.continuous_batcher(1)
        release = blocked(executor)
        longest = text_pipeline.model.max_seq_len - 3
        generations = [executor.submit_continuous(batcher, generation(text_pipeline, longest, seed=i))
                       for i in range(4)]
        plain = executor.submit(lambda: [g.done() for g in generations])
        release.set()
        assert plain.result(timeout=60).value == [False] * 4
        assert all(g.result(timeout=120).value.completions for g in generations)
    finally:
        executor.shutdown()


def test_a_fault_of_the_model_threads_own_code_fails_the_request_in_hand_and_the_thread_serves_on(executor):
    """A model call's failure is its request's (above); a fault in the thread's own loop (here, once, where it
    gathers a batch) fails the request it was handling, and the thread serves the next. Before, the thread died:
    that request and every later one of the deployment waited for ever."""
    fn, gather, faults = Recorder(), executor._gather, []

    def faulty_once(first):
        if not faults:
            faults.append(first)
            raise RuntimeError("a fault of the loop")
        return gather(first)

    executor._gather = faulty_once
    with pytest.raises(RuntimeError, match="a fault of the loop"):
        executor.submit_batched(fn, "k", 1).result(10)
    assert executor.submit_batched(fn, "k", 2).result(10).value == "done 2"
    assert fn.calls == [[2]] and executor.depth == 0  # (the failed one no longer counts as waiting)


def test_a_fault_in_the_middle_of_a_gathering_fails_the_jobs_taken_and_loses_none_held_back(executor):
    """A fault of the loop while it gathers a batch (here, while it takes the third job) fails the jobs that
    gathering had taken (the first, and the one it was taking) and nothing else: a job of another function that
    the gathering had passed over and held back still runs, and so does the next. Before, the job being taken and
    the ones held back were in neither the queue nor the loop's hands: their requests waited for ever."""
    fn, other, take = Recorder(), Recorder(), executor._take
    taken = []

    def faulty_take(job):
        taken.append(job)
        if len(taken) == 2:  # (the first job is taken by _dispatch, the second here: it faults)
            raise RuntimeError("a fault of the loop")
        return take(job)

    release = blocked(executor)
    executor._take = faulty_take
    first = executor.submit_batched(fn, "k", 1)
    passed_over = executor.submit_batched(other, "k", 2)
    faulted = executor.submit_batched(fn, "k", 3)
    release.set()
    for future in (first, faulted):
        with pytest.raises(RuntimeError, match="a fault of the loop"):
            future.result(10)
    executor._take = take
    assert passed_over.result(10).value == "done 2"
    assert executor.submit_batched(fn, "k", 4).result(10).value == "done 4"
    assert fn.calls == [[4]] and other.calls == [[2]]
    assert executor.depth == 0 and executor.batched_depth == 0


def test_a_fault_of_a_turn_between_decode_steps_fails_its_own_job_and_the_running_generation_decodes_on(
        text_pipeline):
    """Between decode steps the model thread joins queued generations and runs one other job. A fault of its own
    code there (here, once each: while handing a generation to its batcher, and while gathering a batch) fails the
    job in hand, and nothing else: the generation already decoding ends as it would alone, the jobs passed over
    still run, and so do later ones. Before, the fault left the decode loop: the running generation was never
    stepped again, and the jobs the loop had taken from the queue were lost."""
    executor = ModelExecutor("text", max_queue=16, max_batch_size=2)
    try:
        batcher = text_pipeline.continuous_batcher(4)
        submit, gather = batcher.submit, executor._gather
        fn = Recorder()

        def submit_faulting_once(generation, *args, **kwargs):
            batcher.submit = submit
            raise RuntimeError("a fault of the join")

        def gather_faulting_once(first):
            executor._gather = gather
            raise RuntimeError("a fault of the gathering")

        release = blocked(executor)
        running = executor.submit_continuous(batcher, generation(text_pipeline, 40, seed=1))
        release.set()
        while not batcher.active:
            time.sleep(0.001)
        release = threading.Event()
        plain = executor.submit(lambda: release.wait(10))  # (holds the thread between two steps while the rest queue)
        while executor.depth:
            time.sleep(0.001)
        batcher.submit, executor._gather = submit_faulting_once, gather_faulting_once
        passed_over = executor.submit(lambda: "passed over")
        faulted_join = executor.submit_continuous(batcher, generation(text_pipeline, 8, seed=2))
        faulted_gathering = executor.submit_batched(fn, "k", 1)
        after = executor.submit_batched(fn, "k", 2)
        release.set()
        assert plain.result(10).value is True
        with pytest.raises(RuntimeError, match="a fault of the join"):
            faulted_join.result(60)
        with pytest.raises(RuntimeError, match="a fault of the gathering"):
            faulted_gathering.result(60)
        assert passed_over.result(60).value == "passed over"
        assert after.result(60).value == "done 2"
        solo = text_pipeline.complete(prompt_token_ids=[[1, 2, 3]], seed=1,
                                      sampling=SamplingParams(max_new_tokens=40, temperature=1.0))
        assert running.result(120).value.completions[0].token_ids == solo.completions[0].token_ids
        assert executor.depth == 0
    finally:
        executor.shutdown()


def test_a_request_cancelled_while_its_call_runs_keeps_its_pixels_claimed_until_the_call_ends():
    """A client that leaves cancels its request, but a call already running goes on with the request's decoded
    images: their pixels stay counted (they were given back at once, so requests in flight could hold more than
    VLA_MAX_PIXELS_IN_FLIGHT). A request cancelled while queued gives them back at once (its call never runs)."""
    import asyncio

    from service.images import PixelBudget

    budget = PixelBudget(per_request=1000, in_flight=10_000)
    executor = ModelExecutor("test", max_queue=8, max_batch_size=1)
    started, release = threading.Event(), threading.Event()

    async def request(work):
        with budget.lease() as lease:
            lease.claim(400, "image")
            await executor.run(work)

    async def scenario():
        running = asyncio.ensure_future(request(lambda: (started.set(), release.wait(10))))
        while not started.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(request(lambda: None))
        await asyncio.sleep(0.05)
        assert budget.used == 800
        for task in (running, queued):
            task.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        assert budget.used == 400  # the running call's images; the queued one's were given back
        release.set()
        for _ in range(200):
            if budget.used == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.used == 0

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        executor.shutdown()
