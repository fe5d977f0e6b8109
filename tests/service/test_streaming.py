"""A generation's deltas from the model thread to the event loop (service/streaming.py): every delta in order, what
arrived together handed over as one list (one write) with each row's deltas merged into one (one event), the
generation's error after its last delta, and a client that leaves cancelling the generation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.streaming import DeltaStream, GenerationCancelled, merge_rows


def generation(stream: DeltaStream, plan: list, gates: list[threading.Event], outcome=None, raised=None):
    """A worker-thread generation: ``plan`` lists the deltas of each burst; before each burst after the first it
    waits for its gate. Ends with ``outcome`` (raised when it is an exception); what ``on_text`` raised goes in
    ``raised``."""

    def run():
        for burst, texts in enumerate(plan):
            if burst:
                assert gates[burst - 1].wait(10)
            for text in texts:
                try:
                    stream.on_text(0, text, [len(text)], None)
                except GenerationCancelled as e:
                    (raised if raised is not None else []).append(e)
                    raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return asyncio.to_thread(run)


async def queued(stream: DeltaStream, count: int) -> None:
    """Until ``count`` items (deltas, or the end) wait in the stream's queue: the worker's deltas have crossed to
    the loop (their callbacks run on it)."""
    for _ in range(1000):
        if stream._queue.qsize() >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} items never reached the loop")


def test_deltas_that_arrive_together_come_as_one_merged_delta_in_order():
    async def main():
        stream = DeltaStream()
        gates = [threading.Event(), threading.Event()]
        await stream.start(generation(stream, [["a"], ["b", "c", "d"], ["e"]], gates, outcome="done"))
        lists = []
        async for deltas in stream.batches():
            lists.append([text for _, text, _, _ in deltas])
            if len(lists) <= len(gates):
                gates[len(lists) - 1].set()
                await queued(stream, 3 if len(lists) == 1 else 2)  # the next burst (and the end) whole, first
        return lists, stream.result()

    lists, result = asyncio.run(main())
    assert lists == [["a"], ["bcd"], ["e"]]
    assert result == "done"


def test_the_generations_error_follows_its_last_delta():
    async def main():
        stream = DeltaStream()
        await stream.start(generation(stream, [["a", "b"]], [], outcome=ValueError("no room")))
        seen = []
        with pytest.raises(ValueError, match="no room"):
            async for deltas in stream.batches():
                seen.extend(text for _, text, _, _ in deltas)
        return seen

    assert "".join(asyncio.run(main())) == "ab"


def test_an_error_before_the_first_delta_is_raised_by_start():
    async def main():
        stream = DeltaStream()
        with pytest.raises(ValueError, match="queue is full"):
            await stream.start(generation(stream, [[]], [], outcome=ValueError("queue is full")))

    asyncio.run(main())


def test_a_client_that_leaves_cancels_the_generation_at_its_next_delta():
    async def main():
        stream = DeltaStream()
        gate, raised = threading.Event(), []
        await stream.start(generation(stream, [["a"], ["b"]], [gate], outcome="never", raised=raised))
        deltas = stream.batches()
        assert [text for _, text, _, _ in await deltas.__anext__()] == ["a"]
        await deltas.aclose()  # the client went away
        assert stream.cancelled.is_set()
        gate.set()  # the worker's next delta raises
        for _ in range(1000):
            if raised:
                break
            await asyncio.sleep(0.005)
        return stream.task, raised

    task, raised = asyncio.run(main())
    assert task.cancelled()
    assert len(raised) == 1  # the worker stopped at "b"


def test_a_client_that_leaves_before_the_first_delta_cancels_the_queued_generation():
    async def main():
        stream = DeltaStream()
        queued_job: asyncio.Future = asyncio.get_running_loop().create_future()  # a generation still in the queue
        starting = asyncio.ensure_future(stream.start(queued_job))
        await asyncio.sleep(0.01)
        starting.cancel()  # the handler is cancelled: its client went away
        with pytest.raises(asyncio.CancelledError):
            await starting
        return queued_job, stream

    queued_job, stream = asyncio.run(main())
    assert queued_job.cancelled()  # dropped unrun
    assert stream.cancelled.is_set()


def test_merging_keeps_each_rows_text_ids_and_finish_in_the_order_rows_first_appear():
    deltas = [(1, "Hel", [5], None), (0, None, [7], None), (1, "lo", [6], None), (0, "x", [8], None),
              (1, None, [9], "stop"), (2, None, [3], None)]
    assert merge_rows(deltas) == [(1, "Hello", [5, 6, 9], "stop"), (0, "x", [7, 8], None), (2, None, [3], None)]
    assert merge_rows([(0, "a", [1], None)]) == [(0, "a", [1], None)]
