"""Light requests yield to the models (service/light_requests.py): the bucket's arithmetic on a fake clock,
which requests the middleware paces and when, and the server's wiring (setting, metric, executor state)."""

from __future__ import annotations

import asyncio

import pytest

from service import DeploymentSpec, Settings, create_app
from service.executor import ModelExecutor
from service.light_requests import MAX_WAIT_S, LightRequestPacer, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_lets_a_burst_through_then_spaces_takers_by_one_over_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=3, max_wait_s=MAX_WAIT_S, clock=clock)
    assert [bucket.delay() for _ in range(3)] == [0, 0, 0]  # the saved burst
    waits = [bucket.delay() for _ in range(3)]  # then each waits one more tenth of a second than the last
    assert waits == pytest.approx([0.1, 0.2, 0.3])
    clock.now += 1.0  # a second refills ten tokens, but no more than the burst is saved
    assert [bucket.delay() for _ in range(3)] == [0, 0, 0]
    assert bucket.delay() == pytest.approx(0.1)


def test_no_wait_exceeds_the_cap_however_deep_the_flood():
    bucket = TokenBucket(rate=10, burst=1, max_wait_s=0.5, clock=FakeClock())
    waits = [bucket.delay() for _ in range(100)]
    assert max(waits) == pytest.approx(0.5)
    assert waits[:7] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5])


def run_pacer(pacer: LightRequestPacer, method: str, kind: str = "http") -> list:
    """One request through the pacer; the delays it slept (asyncio.sleep recorded, not slept)."""
    slept = []

    async def main():
        original = asyncio.sleep

        async def record(seconds):
            slept.append(seconds)
            await original(0)

        asyncio.sleep = record
        try:
            await pacer({"type": kind, "method": method, "path": "/health/live", "headers": []}, None, None)
        finally:
            asyncio.sleep = original

    asyncio.run(main())
    return slept


def make_pacer(rate: float, at_work: bool, delays: list) -> tuple[LightRequestPacer, list]:
    served = []

    async def app(scope, receive, send):
        served.append(scope["method"])

    return LightRequestPacer(app, rate=rate, models_at_work=lambda window: at_work, on_delay=delays.append), served


def test_gets_are_paced_only_while_a_model_is_at_work():
    delays: list = []
    busy, served = make_pacer(rate=10, at_work=True, delays=delays)
    slept = [run_pacer(busy, "GET") for _ in range(4)]  # burst of one (a tenth of a second's worth), then paced
    assert slept[0] == [] and all(s and s[0] > 0 for s in slept[1:])
    assert served == ["GET"] * 4 and len(delays) == 3  # every request is still served; each hold is reported

    idle, served = make_pacer(rate=10, at_work=False, delays=delays)
    assert all(run_pacer(idle, "GET") == [] for _ in range(20)) and len(served) == 20


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_model_work_and_changes_are_never_paced(method):
    pacer, served = make_pacer(rate=1, at_work=True, delays=[])
    assert all(run_pacer(pacer, method) == [] for _ in range(5)) and served == [method] * 5


def test_websockets_and_a_zero_rate_are_never_paced():
    pacer, _ = make_pacer(rate=1, at_work=True, delays=[])
    assert all(run_pacer(pacer, "GET", kind="websocket") == [] for _ in range(5))
    off, served = make_pacer(rate=0, at_work=True, delays=[])
    assert all(run_pacer(off, "GET") == [] for _ in range(50)) and len(served) == 50


def test_an_executor_is_at_work_while_it_runs_or_queues_and_for_a_window_after():
    executor = ModelExecutor("x", max_queue=4)
    try:
        assert not executor.at_work(1.0)  # never ran anything
        executor.submit(lambda: None).result(timeout=5)
        assert executor.at_work(60.0) and not executor.at_work(0.0)
    finally:
        executor.shutdown()


def test_the_server_wires_the_setting_and_the_metric():
    from fastapi.testclient import TestClient

    app = create_app(Settings(deployments=[DeploymentSpec(name="none", checkpoint="/nonexistent")],
                              light_requests_per_s=123))
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        text = client.get("/metrics").text
        assert "vla_light_request_delay_seconds_count 0.0" in text  # declared, nothing held (no model at work)
        pacer = app.middleware_stack
        while pacer is not None and not isinstance(pacer, LightRequestPacer):
            pacer = getattr(pacer, "app", None)
        assert pacer is not None and pacer.bucket.rate == 123
