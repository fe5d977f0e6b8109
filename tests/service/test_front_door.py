"""The front door's refusal lines (``front_door.RefusalLines``): at most so many access lines a second, the rest said
in one line when their second is over. (The door's refusals themselves are in test_deadlines.py.)"""

import asyncio
import logging

from service.front_door import RefusalLines


def test_refusals_past_the_rate_are_counted_and_said_in_one_line(caplog):
    async def scenario():
        lines = RefusalLines(per_s=20)
        with caplog.at_level(logging.INFO, logger="service.access"):
            given = [lines.take() for _ in range(25)]
            assert given == [True] * 20 + [False] * 5
            assert not [r for r in caplog.records if hasattr(r, "refusals_not_logged")]  # not yet: its second runs
            await asyncio.sleep(1.1)
            said = [r for r in caplog.records if hasattr(r, "refusals_not_logged")]
            assert [r.refusals_not_logged for r in said] == [5]
            assert "VLA_LOG_REFUSALS_PER_S=20" in said[0].getMessage()
            assert lines.take()  # a new second: lines again
            await asyncio.sleep(1.1)
            assert len([r for r in caplog.records if hasattr(r, "refusals_not_logged")]) == 1  # nothing more to say

    asyncio.run(scenario())


def test_a_count_whose_timer_died_with_its_loop_is_said_by_the_next_loop(caplog):
    """The app served in one event loop, then another (a test client, a bench): the count the first loop's timer
    would have said is said when the next loop's first refusal starts a new second, and counting goes on."""
    import time

    lines = RefusalLines(per_s=1)

    async def burst(n):
        return [lines.take() for _ in range(n)]

    with caplog.at_level(logging.INFO, logger="service.access"):
        assert asyncio.run(burst(4)) == [True, False, False, False]  # its loop ends before the timer fires
        time.sleep(1.05)
        assert asyncio.run(burst(2)) == [True, False]
    said = [r.refusals_not_logged for r in caplog.records if hasattr(r, "refusals_not_logged")]
    assert said == [3] and lines.unlogged == 1


def test_no_lines_at_all_leaves_only_the_counts(caplog):
    async def scenario():
        lines = RefusalLines(per_s=0)
        with caplog.at_level(logging.INFO, logger="service.access"):
            assert not any(lines.take() for _ in range(3))
            await asyncio.sleep(1.1)
        assert [r.refusals_not_logged for r in caplog.records if hasattr(r, "refusals_not_logged")] == [3]

    asyncio.run(scenario())


def test_the_server_logs_its_first_refusals_each_second_and_counts_them_all(tiny_checkpoints, monkeypatch, caplog):
    import json
    import time

    from service import DeploymentSpec
    from tests.factories import PREDICT_REQUESTS
    from tests.service.conftest import serving

    body = json.dumps(PREDICT_REQUESTS["diffusion_policy"]).encode()
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), max_queue_ms=50)
    with serving(spec, shed_pacing_s=0, log_refusals_per_s=2) as client:
        policy = client.app.state.manager.deployments["policy"]
        assert client.post("/predict/diffusion_policy", content=body).status_code == 200
        monkeypatch.setattr(policy.executor, "expected_wait_s", lambda batchable=True, own_pending=None: 2.4)
        with caplog.at_level(logging.INFO, logger="service.access"):
            statuses = [client.post("/predict/diffusion_policy", content=body).status_code for _ in range(5)]
            time.sleep(1.2)
            client.get("/health/live")  # (the test client's loop runs the timer that says the count)
        assert statuses == [503] * 5
        lines = [r for r in caplog.records if r.name == "service.access" and getattr(r, "status", None) == 503]
        said = [r.refusals_not_logged for r in caplog.records if hasattr(r, "refusals_not_logged")]
        assert len(lines) == 2 and sum(said) == 3, (len(lines), said)
        assert 'vla_requests_shed_total{deployment="policy",stage="body"} 5.0' in client.get("/metrics").text


def test_the_door_acts_only_on_the_exact_predict_and_evaluate_paths():
    """``/predict/<type>/`` (a trailing slash) is not a route of the app (404): the door refused it as the type's
    route under overload (503) instead of leaving it to the app."""
    from types import SimpleNamespace

    from service.front_door import FrontDoor

    policy = SimpleNamespace(model_type="diffusion_policy")
    manager = SimpleNamespace(deployments={"policy": policy}, resolve=lambda model_type, name: policy)
    door = FrontDoor(None, manager, metrics=None)
    assert door._deployment_for("/predict/diffusion_policy") is policy
    assert door._deployment_for("/evaluate/diffusion_policy") is policy
    for path in ("/predict/diffusion_policy/", "/predict/diffusion_policy//", "/predict/", "/predict",
                 "/predict/diffusion_policy/x", "//predict/diffusion_policy", "/sessions/diffusion_policy"):
        assert door._deployment_for(path) is None, path
