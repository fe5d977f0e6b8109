"""``unless_client_leaves`` on its own: a result reaches the request in as few turns of the event loop as asyncio
allows, a client that leaves gets its work cancelled (499), and a disconnect that comes after the result changes
nothing. (The live paths, a queued call and a queued stream dropped, are in test_deadlines.py.)"""

import asyncio
from types import SimpleNamespace

import pytest

from service.disconnects import CLIENT_CLOSED, unless_client_leaves
from service.errors import ApiError


class FakeRequest:
    """What ``unless_client_leaves`` reads of a request: ``receive`` (the disconnect, when ``leave`` is set) and the
    app's abandoned-requests counter."""

    def __init__(self):
        self.leave = asyncio.Event()
        self.abandoned = 0
        counter = SimpleNamespace(inc=self._count)
        metrics = SimpleNamespace(abandoned=SimpleNamespace(labels=lambda deployment: counter))
        self.app = SimpleNamespace(state=SimpleNamespace(metrics=metrics))

    def _count(self):
        self.abandoned += 1

    async def receive(self):
        await self.leave.wait()
        return {"type": "http.disconnect"}


def test_a_result_reaches_the_request_as_soon_as_a_plain_await_would():
    """The work is awaited in the request's own task: once the work's future is resolved, the request resumes within
    the same turn of the loop as this test's own next step (``turns`` still 0), as a plain ``await`` would. Awaited
    as a task of its own under ``asyncio.wait``, it resumed two turns later (2), each turn a whole pass over the
    loop's ready I/O when the server is busy."""

    async def scenario():
        request = FakeRequest()
        future = asyncio.get_running_loop().create_future()
        resumed_after = []

        async def work():
            return await future

        async def handler():
            value = await unless_client_leaves(request, work(), "policy")
            resumed_after.append(turns)
            return value

        turns = 0
        task = asyncio.ensure_future(handler())
        for _ in range(3):  # the handler is now waiting
            await asyncio.sleep(0)
        future.set_result("chunk")
        while not task.done():
            await asyncio.sleep(0)
            turns += 1
        assert task.result() == "chunk" and request.abandoned == 0
        return resumed_after[0]

    assert asyncio.run(scenario()) == 0


def test_a_client_that_leaves_cancels_its_work_and_gets_a_499():
    async def scenario():
        request = FakeRequest()
        cancelled = asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        task = asyncio.ensure_future(unless_client_leaves(request, work(), "policy"))
        await asyncio.sleep(0.01)
        request.leave.set()
        with pytest.raises(ApiError) as raised:
            await task
        assert raised.value.status == CLIENT_CLOSED
        assert cancelled.is_set() and request.abandoned == 1
        if hasattr(task, "cancelling"):  # (Python 3.11+ counts cancellations)
            assert task.cancelling() == 0  # the request's own cancellation was answered, not left pending

    asyncio.run(scenario())


def test_a_disconnect_after_the_result_changes_nothing():
    """The result is in and the handler goes on (encoding, say) when the client's disconnect arrives: the handler
    is not cancelled, and nothing is counted as abandoned."""

    async def scenario():
        request = FakeRequest()

        async def work():
            return "chunk"

        async def handler():
            value = await unless_client_leaves(request, work(), "policy")
            request.leave.set()  # the client goes right after
            for _ in range(5):
                await asyncio.sleep(0)  # the disconnect's callbacks run meanwhile
            return value

        assert await handler() == "chunk"
        assert request.abandoned == 0

    asyncio.run(scenario())


def test_a_request_cancelled_by_the_server_stays_cancelled():
    async def scenario():
        request = FakeRequest()
        started = asyncio.Event()

        async def work():
            started.set()
            await asyncio.sleep(30)

        task = asyncio.ensure_future(unless_client_leaves(request, work(), "policy"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert request.abandoned == 0

    asyncio.run(scenario())
