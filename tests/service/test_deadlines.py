"""Deadlines: a request still waiting at its deadline gets 504 and never runs; admission refuses (503) what
could not start in time; a malformed X-Request-Timeout is refused."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import pytest

from service import DeploymentSpec
from tests.service.test_openai import chat_checkpoint  # noqa: F401  (a fixture: a model that talks at length)
from service.deadlines import RefusalPacer
from service.errors import ApiError
from service.executor import DeadlineExceeded, ModelExecutor
from tests.factories import PREDICT_REQUESTS
from tests.service.conftest import serving

TEXT = {"model": "tiny", **PREDICT_REQUESTS["transformer"]}


@contextmanager
def busy(executor: ModelExecutor, queued: int = 0):
    """The model thread held by a job until the block ends (plus ``queued`` more jobs waiting behind it)."""
    release = threading.Event()
    jobs = [executor.submit(release.wait) for _ in range(1 + queued)]
    time.sleep(0.05)  # the first has started
    try:
        yield
    finally:
        release.set()
        for job in jobs:
            job.result(timeout=10)


def test_the_executor_drops_expired_jobs_unrun():
    executor = ModelExecutor("t", max_queue=8, max_batch_size=4)
    calls = []
    try:
        with busy(executor):
            late = executor.submit(calls.append, "late", deadline=time.perf_counter() + 0.01)
            batched = [executor.submit_batched(lambda items: [calls.extend(items) or i for i in items], "k", name,
                                               deadline=time.perf_counter() + (0.01 if name == "b-late" else 60))
                       for name in ("b-late", "b-ok")]
            time.sleep(0.1)
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            late.result(timeout=10)
        with pytest.raises(DeadlineExceeded):
            batched[0].result(timeout=10)
        assert batched[1].result(timeout=10).batch_size == 1  # the expired one never joined the call
        assert calls == ["b-ok"]
    finally:
        executor.shutdown()


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    specs = [DeploymentSpec(name="tiny", checkpoint=str(tiny_checkpoints["transformer"])),
             DeploymentSpec(name="tiny-default", checkpoint=str(tiny_checkpoints["transformer"]),
                            request_timeout_s=0.05),
             DeploymentSpec(name="tiny-capped", checkpoint=str(tiny_checkpoints["transformer"]), max_queue_ms=100)]
    with serving(*specs, shed_pacing_s=0) as c:  # refusals at once: these tests time them
        yield c


def model_calls(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'vla_model_run_seconds_count{{deployment="{name}"}}'):
            return float(line.split()[-1])
    return 0.0


def deployment(client, name: str):
    return client.app.state.manager.get(name)


def test_a_request_past_its_deadline_gets_504_and_never_runs(client):
    before = model_calls(client, "tiny")
    with busy(deployment(client, "tiny").executor):
        response_box = []
        thread = threading.Thread(target=lambda: response_box.append(client.post(
            "/predict/transformer", json=TEXT, headers={"x-request-timeout": "0.1", "x-request-id": "late-1"})))
        thread.start()
        time.sleep(0.3)  # past the deadline while the model thread is still held
    thread.join(timeout=30)
    (response,) = response_box
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "timeout" and "deadline" in error["message"] and error["request_id"] == "late-1"
    assert model_calls(client, "tiny") == before
    assert client.post("/predict/transformer", json=TEXT, headers={"x-request-timeout": "30"}).status_code == 200
    assert model_calls(client, "tiny") == before + 1


def test_a_queued_request_gets_its_504_at_its_deadline_not_when_the_model_is_free(client):
    """The model thread is held (a long call) past the request's deadline: the 504 comes at the deadline, and the
    request is dropped from the queue unrun (before, it came only once the model thread was free)."""
    from tests.factories import EVALUATE_REQUESTS

    before = model_calls(client, "tiny")
    box: list = []
    executor = deployment(client, "tiny").executor
    with busy(executor):
        measured, executor.call_seconds = executor.call_seconds, {}  # admitted: no wait is foreseen (the held call
        # is longer than any measured before, as the long call that holds up a deployment is)
        thread = threading.Thread(target=lambda: box.append(client.post(
            "/evaluate/transformer", json={"model": "tiny", **EVALUATE_REQUESTS["transformer"]},
            headers={"x-request-timeout": "0.2"})))
        started = time.perf_counter()
        thread.start()
        thread.join(timeout=10)  # the model thread is still held all this time
        answered_while_held = not thread.is_alive()
        took = time.perf_counter() - started
        executor.call_seconds = measured
    thread.join(timeout=30)
    assert answered_while_held, "no answer while the model thread was held"
    assert box[0].status_code == 504 and box[0].json()["error"]["type"] == "timeout", box[0].text
    assert took < 5
    assert executor.depth == 0  # its place in the queue given back
    assert model_calls(client, "tiny") == before


def test_a_deployment_default_deadline_applies(client):
    body = {**TEXT, "model": "tiny-default"}
    before = model_calls(client, "tiny-default")
    with busy(deployment(client, "tiny-default").executor):
        result = []
        thread = threading.Thread(target=lambda: result.append(client.post("/predict/transformer", json=body)))
        thread.start()
        time.sleep(0.3)
    thread.join(timeout=30)
    assert result[0].status_code == 504 and model_calls(client, "tiny-default") == before
    assert client.post("/predict/transformer", json=body).status_code == 200  # idle: it runs at once


def test_admission_refuses_what_could_not_start_in_time(client):
    for name, headers in (("tiny", {"x-request-timeout": "1"}), ("tiny-capped", {})):
        executor = deployment(client, name).executor
        with busy(executor, queued=1):
            measured = dict(executor.call_seconds)
            executor.call_seconds = {1: 5.0}  # as if each call took 5 s: the running one's rest + one waiting
            started = time.perf_counter()
            response = client.post("/predict/transformer", json={**TEXT, "model": name}, headers=headers)
            assert time.perf_counter() - started < 1.0  # refused at once, not after waiting
            executor.call_seconds = measured
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "10" and response.json()["error"]["type"] == "overloaded"


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "99999"])
def test_a_malformed_timeout_is_refused(client, value):
    response = client.post("/predict/transformer", json=TEXT, headers={"x-request-timeout": value})
    assert response.status_code == 400 and response.json()["error"]["field"] == "X-Request-Timeout"


@pytest.mark.parametrize("value, shown", [("soon", "got 'soon'"), ("2 s", "got '2 s'"), ("0", "got 0"),
                                          ("3600.0000001", "got 3600.0000001")])
def test_a_malformed_timeout_is_quoted_as_the_text_sent(value, shown):
    """The header's text, not a bytes repr (``got b'soon'``)."""
    from fastapi.testclient import TestClient
    from starlette.responses import PlainTextResponse

    from service.deadlines import Deadlines

    plain = TestClient(Deadlines(PlainTextResponse("never reached")))  # (no lifespan: a bare response app)
    response = plain.get("/", headers={"x-request-timeout": value})
    error = response.json()["error"]
    assert response.status_code == 400 and error["field"] == "X-Request-Timeout"
    assert error["message"].endswith(shown) and "b'" not in error["message"], error


def test_loading_does_not_count_as_model_time():
    executor = ModelExecutor("t", max_queue=4)
    try:
        executor.submit_setup(lambda: time.sleep(0.2)).result(timeout=10)
        assert executor.call_seconds == {}  # a slow load must not make admission refuse the first requests
        executor.submit(time.sleep, 0.01).result(timeout=10)
        assert 0 < executor.call_seconds[1] < 0.2
    finally:
        executor.shutdown()


def _post_then_leave(app, body: bytes, leave_after_s: float, path: str = "/predict/transformer") -> list[dict]:
    """A raw ASGI request to ``path`` whose client disconnects ``leave_after_s`` after sending its body (what
    uvicorn tells the app when the TCP connection closes); the messages the app sent back."""
    async def scenario() -> list[dict]:
        inbox = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive():
            if inbox:
                return inbox.pop(0)
            await asyncio.sleep(leave_after_s)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(),
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("test", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "state": {}, "app": app}
        await asyncio.wait_for(app(scope, receive, send), 20)  # (an app that never gives up fails, not hangs)
        return sent

    return asyncio.run(scenario())


def test_a_queued_call_is_dropped_when_its_client_leaves(client):
    before = model_calls(client, "tiny")
    body = json.dumps(TEXT).encode()
    with busy(deployment(client, "tiny").executor):
        sent = _post_then_leave(client.app, body, leave_after_s=0.1)  # returns once the app gave up on it
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499  # logged; the client is gone
    time.sleep(0.2)  # the model thread is free again: a dropped job stays unrun
    assert model_calls(client, "tiny") == before
    metrics = client.get("/metrics").text
    assert 'vla_requests_abandoned_total{deployment="tiny"} 1.0' in metrics
    # a client that stays gets its answer as before
    assert client.post("/predict/transformer", json=TEXT).status_code == 200
    assert model_calls(client, "tiny") == before + 1


def test_a_queued_stream_is_dropped_when_its_client_leaves_before_its_first_token(client):
    """A streamed /v1 completion still queued when its client leaves never starts (not only once it streams)."""
    before = model_calls(client, "tiny")
    body = json.dumps({"model": "tiny", "prompt": "the quick", "max_tokens": 8, "stream": True}).encode()
    with busy(deployment(client, "tiny").executor):
        sent = _post_then_leave(client.app, body, leave_after_s=0.1, path="/v1/completions")
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499
    time.sleep(0.2)
    assert model_calls(client, "tiny") == before
    assert 'vla_requests_abandoned_total{deployment="tiny"} 2.0' in client.get("/metrics").text  # (one above)


def test_a_body_timeout_is_a_deadline_too(client):
    before = model_calls(client, "tiny")
    # Admission would refuse it at once (503) when the slow calls of the tests above (the model held by ``busy``)
    # make the expected wait longer than its timeout; this test is about the timeout passing in the queue.
    deployment(client, "tiny").executor.call_seconds.clear()
    with busy(deployment(client, "tiny").executor):
        response_box = []
        thread = threading.Thread(target=lambda: response_box.append(client.post(
            "/predict/transformer", json={**TEXT, "timeout_s": 0.1})))
        thread.start()
        time.sleep(0.3)
    thread.join(timeout=30)
    (response,) = response_box
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout", response.text
    assert model_calls(client, "tiny") == before
    bad = client.post("/predict/transformer", json={**TEXT, "timeout_s": -1})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "timeout_s"


def test_a_robot_chunk_past_its_valid_until_is_never_computed(tiny_checkpoints):
    """An observation whose chunk would only start after its own valid_until (timestamp + n_action_steps control
    periods) is dropped unrun: the robot could not use it."""
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), control_period_s=0.05)
    body = {**PREDICT_REQUESTS["diffusion_policy"], "seed": 0}
    with serving(spec) as c:
        n = c.get("/models/policy").json()["io"]["n_action_steps"]
        before = model_calls(c, "policy")
        with busy(deployment(c, "policy").executor):
            box = []
            thread = threading.Thread(target=lambda: box.append(c.post(
                "/predict/diffusion_policy", json={**body, "timestamp": time.time()})))
            thread.start()
            time.sleep(n * 0.05 + 0.3)  # past the chunk's valid_until while the model is held
        thread.join(timeout=30)
        assert box[0].status_code == 504, box[0].text
        assert model_calls(c, "policy") == before
        fresh = c.post("/predict/diffusion_policy", json={**body, "timestamp": time.time()})
        assert fresh.status_code == 200 and fresh.json()["valid_until"] > time.time() - 1


def test_an_overloaded_deployment_refuses_before_the_body_is_read(tiny_checkpoints, monkeypatch):
    """The type names one deployment: its 503 comes before the body is read (nor parsed, nor its images decoded),
    so shedding load costs the server little more than the headers."""
    from tests.factories import PREDICT_REQUESTS as BODIES

    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]),
                                max_queue_ms=50)) as client:
        policy = deployment(client, "policy")
        body = json.dumps(BODIES["diffusion_policy"]).encode()
        assert client.post("/predict/diffusion_policy", content=body).status_code == 200
        monkeypatch.setattr(policy.executor, "expected_wait_s",
                            lambda batchable=True, own_pending=None: 2.4)  # 2.4 s queued
        reads: list[dict] = []
        sent: list[dict] = []

        async def receive():
            reads.append({})
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/predict/diffusion_policy", "raw_path": b"",
                 "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                                                    (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http", "http_version": "1.1"}
        asyncio.run(client.app(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == 503 and (b"retry-after", b"3") in start["headers"]
        reply = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        assert reply["error"]["type"] == "overloaded" and "max_queue_ms" in reply["error"]["message"]
        assert reads == []  # the body was never read
        assert 'vla_http_requests_total{method="POST",route="/predict/diffusion_policy",status="503"} 1.0' in \
            client.get("/metrics").text  # counted under its route, as a refusal after the body would be
        monkeypatch.undo()
        assert client.post("/predict/diffusion_policy", content=body).status_code == 200


def test_the_front_door_refusal_is_the_apps_own(tiny_checkpoints, monkeypatch, caplog):
    """A refusal at the front door (before FastAPI and the middleware run) is what the app would answer: the
    request's id in X-Request-ID, the error body and the access line, msgpack to a client that prefers it; the
    X-Request-Timeout deadline counts; and what the door cannot vouch for goes on into the app: a request without
    a valid key gets its 401, a malformed X-Request-Timeout its 400, both with their bodies unread here."""
    import msgpack

    from service.request_ids import RequestIdFilter
    from tests.factories import PREDICT_REQUESTS as BODIES

    body = json.dumps(BODIES["diffusion_policy"]).encode()
    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"])),
                 api_keys="k1", shed_pacing_s=0) as client:
        policy = deployment(client, "policy")
        key = {"Authorization": "Bearer k1"}
        assert client.post("/predict/diffusion_policy", content=body, headers=key).status_code == 200
        monkeypatch.setattr(policy.executor, "expected_wait_s", lambda batchable=True, own_pending=None: 2.4)
        # no max_queue_ms: only a deadline shorter than the expected wait is refused
        assert client.post("/predict/diffusion_policy", content=body, headers=key).status_code == 200
        caplog.handler.addFilter(RequestIdFilter())  # (as the server's handlers: the id on each record)
        with caplog.at_level("INFO", logger="service.access"):
            refused = client.post("/predict/diffusion_policy", content=body,
                                  headers={**key, "X-Request-Timeout": "1", "X-Request-ID": "robot-7.step-3",
                                           "Accept": "application/msgpack"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert refused.headers["x-request-id"] == "robot-7.step-3"
        error = msgpack.unpackb(refused.content)["error"]
        assert error["type"] == "overloaded" and "past its deadline" in error["message"]
        assert error["request_id"] == "robot-7.step-3"
        line = next(r for r in caplog.records if r.name == "service.access" and r.status == 503)
        assert line.request_id == "robot-7.step-3" and line.route == "/predict/diffusion_policy"
        assert client.post("/predict/diffusion_policy", content=body,
                           headers={"X-Request-Timeout": "1"}).status_code == 401
        malformed = client.post("/predict/diffusion_policy", content=body, headers={**key, "X-Request-Timeout": "x"})
        assert malformed.status_code == 400 and "X-Request-Timeout" in malformed.json()["error"]["message"]
        assert 'vla_requests_shed_total{deployment="policy",stage="body"} 1.0' in \
            client.get("/metrics", headers=key).text


def test_a_request_admitted_from_its_headers_counts_as_waiting_from_its_body_until_it_queues(tiny_checkpoints,
                                                                                              monkeypatch):
    """A burst at an empty queue: the first request, admitted from its headers, counts as waiting once its body is
    all here and until it queues, so the next (whose expected wait is then one call, over max_queue_ms) is refused
    before its own body is read, not after it was parsed and decoded; the first still runs (its own reservation does
    not count against it). While the first's body is still on its way it counts for nothing: a client that sends
    its body slowly cannot fill the queue's expected wait. Without the reservation the second was admitted too."""
    from tests.factories import PREDICT_REQUESTS as BODIES

    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]),
                                max_queue_ms=500, max_batch_size=1), shed_pacing_s=0) as client:
        policy = deployment(client, "policy")
        body = json.dumps(BODIES["diffusion_policy"]).encode()
        assert client.post("/predict/diffusion_policy", content=body).status_code == 200
        monkeypatch.setattr(policy.executor, "call_s", lambda batch_size: 1.0)  # a call takes 1 s, by its record
        real_call, at_call, go_on = policy.call, asyncio.Event(), asyncio.Event()

        async def held_call(call):  # the first, parsed and decoded, held on its way into the queue
            at_call.set()
            await go_on.wait()
            return await real_call(call)

        monkeypatch.setattr(policy, "call", held_call)

        def scope() -> dict:
            return {"type": "http", "method": "POST", "path": "/predict/diffusion_policy", "raw_path": b"",
                    "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                    "scheme": "http", "http_version": "1.1",
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

        async def burst() -> tuple[list[dict], list[dict], list[int]]:
            first_reads, first_sent, second_sent = [], [], []
            body_arrives = asyncio.Event()

            async def first_receive():
                first_reads.append(len(first_reads))
                if len(first_reads) > 1:  # (read again while it runs: the client stays until its reply)
                    await asyncio.Event().wait()
                await body_arrives.wait()
                return {"type": "http.request", "body": body, "more_body": False}

            async def never_read():
                raise AssertionError("the refused request's body was read")

            async def collect(box, message):
                box.append(message)

            first = asyncio.ensure_future(client.app(scope(), first_receive, lambda m: collect(first_sent, m)))
            while not first_reads:  # admitted from its headers, its body on its way
                await asyncio.sleep(0.01)
            counted = [policy.executor.pending[True]]
            body_arrives.set()
            await at_call.wait()
            counted.append(policy.executor.pending[True])
            await client.app(scope(), never_read, lambda m: collect(second_sent, m))
            go_on.set()
            await first
            return first_sent, second_sent, [*counted, policy.executor.pending[True]]

        first_sent, second_sent, counted = asyncio.run(burst())
        status = {name: next(m["status"] for m in sent if m["type"] == "http.response.start")
                  for name, sent in (("first", first_sent), ("second", second_sent))}
        assert status == {"first": 200, "second": 503}
        reply = json.loads(b"".join(m.get("body", b"") for m in second_sent if m["type"] == "http.response.body"))
        assert "expects a wait of 1000 ms" in reply["error"]["message"]
        assert counted == [0, 1, 0]  # nothing while its body came, one until it queued, nothing after


def test_a_reservation_counts_once_from_hold_to_release_under_its_latest_kind():
    from service.deadlines import Reservation

    pending = {True: 0, False: 0}
    later = Reservation(pending, True, held=False)
    assert pending == {True: 0, False: 0} and later.counted_in(pending) is None
    later.hold()
    later.hold()
    assert pending == {True: 1, False: 0} and later.counted_in(pending) is True
    later.counted_as(False)  # the route it reached is not batched
    assert pending == {True: 0, False: 1} and later.counted_in(pending) is False
    later.release()
    later.release()
    later.hold()  # released is final
    assert pending == {True: 0, False: 0} and later.counted_in(pending) is None
    never = Reservation(pending, True, held=False)
    never.release()  # a request that ended before its body was all here
    never.hold()
    assert pending == {True: 0, False: 0}


def test_the_expected_wait_counts_batches_not_requests():
    """Batchable requests ahead wait in full batches: 16 queued behind a running batch of 8 with batches of 8
    are two batch calls, and a new one joins the third; a plain request waits a call each; requests still
    decoding (pending) count as waiting."""
    executor = ModelExecutor("t", max_queue=64, max_batch_size=8)
    try:
        executor.call_seconds = {1: 0.010, 8: 0.040}
        executor.depth, executor.batched_depth = 16, 16
        assert executor.expected_wait_s() == pytest.approx(2 * 0.040)
        assert executor.expected_wait_s(batchable=False) == pytest.approx(2 * 0.040)
        executor.depth, executor.batched_depth = 18, 16  # two plain ones too
        assert executor.expected_wait_s() == pytest.approx(2 * 0.010 + 2 * 0.040)
        executor.pending[True] = 7  # 23 batchable: two full batches ahead, the new one joins the third
        assert executor.expected_wait_s() == pytest.approx(2 * 0.010 + 2 * 0.040)
        executor.pending[True] = 8
        assert executor.expected_wait_s() == pytest.approx(2 * 0.010 + 3 * 0.040)
        executor._running = (time.perf_counter(), 8)  # a batch of 8 just started: all of it is left
        assert executor.expected_wait_s() == pytest.approx(2 * 0.010 + 4 * 0.040, abs=0.005)
        assert executor.call_s(4) == 0.040 and executor.call_s(16) == pytest.approx(0.080)  # nearest, scaled up
        # what max_queue_calls counts in: a size as measured, else the largest measured below it, never scaled
        assert executor.measured_call(8) == (8, 0.040) and executor.measured_call(4) == (1, 0.010)
        assert executor.measured_call(16) == (8, 0.040)
        executor.call_seconds = {}
        assert executor.measured_call(8) is None
    finally:
        executor.depth = executor.batched_depth = 0
        executor.pending = {True: 0, False: 0}
        executor._running = None
        executor.shutdown()


class _Record(dict):
    """An executor's record of its calls that its own calls do not change: the test sets what it has measured."""

    def __setitem__(self, size, seconds):
        pass


@pytest.mark.parametrize("max_queue_ms", [None, 300.0])
def test_max_queue_calls_bounds_the_wait_in_the_deployments_own_calls(tiny_checkpoints, monkeypatch, max_queue_ms):
    """``max_queue_calls: 0.5`` admits a request whose expected wait is at most half of the deployment's recent call
    of its kind (a full batch for a batchable request, here of 2; a lone call for a plain one), whatever that call
    takes on this hardware. Before any call was measured there is nothing to bound by; before a full batch has run,
    the largest call measured stands for it (not a guess of twice a lone call). With max_queue_ms too, the lesser
    bound holds, and the refusal names the setting that refused it."""
    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), max_queue_calls=0.5,
                          max_queue_ms=max_queue_ms, max_batch_size=2)
    with serving(spec, shed_pacing_s=0) as client:
        policy = deployment(client, "policy")
        wait, record = [0.4], _Record()
        monkeypatch.setattr(policy.executor, "expected_wait_s", lambda batchable=True, own_pending=None: wait[0])
        monkeypatch.setattr(policy.executor, "call_seconds", record)

        def reply():
            return client.post("/predict/diffusion_policy", json=PREDICT_REQUESTS["diffusion_policy"])

        # none measured: no bound from max_queue_calls (max_queue_ms alone, 300 ms, refuses 400 ms)
        assert reply().status_code == (200 if max_queue_ms is None else 503)
        dict.__setitem__(record, 1, 0.5)  # lone calls only: the call of 1 stands for the batch (a 250 ms bound)
        refused = reply()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "max_queue_calls of 0.5 (250.0 ms: its recent call of 1 took 500.0 ms)" in \
            refused.json()["error"]["message"]
        dict.__setitem__(record, 2, 1.0)  # a full batch measured: 1 s, a 500 ms bound
        assert reply().status_code == (200 if max_queue_ms is None else 503)
        wait[0] = 0.6
        message = reply().json()["error"]["message"]
        expected = "max_queue_calls of 0.5 (500.0 ms: its recent call of 2 took 1000.0 ms)" if max_queue_ms is None \
            else "max_queue_ms of 300"
        assert expected in message, message
        assert policy.queue_bound(batchable=False)[0] == 250.0  # a plain request: in lone calls (250 < 300 ms)
        wait[0] = 0.4
        dict.__setitem__(record, 2, 0.2)  # faster calls, a shorter bound (100 ms)
        refused = reply()
        assert refused.status_code == 503 and "(100.0 ms: its recent call of 2" in refused.json()["error"]["message"]
        wait[0] = 0.09
        assert reply().status_code == 200


@pytest.mark.parametrize("deadline", [None, "header", "deployment"])
def test_an_overload_refusal_is_held_back(tiny_checkpoints, monkeypatch, deadline):
    """With VLA_SHED_PACING_S, a 503 overloaded is sent after between half of it and all of it (a client that
    retries at once retries about once per period), or at the request's deadline when that is sooner (its
    X-Request-Timeout, or the deployment's request_timeout_s); its Retry-After is what is left of the wait."""
    pacing, timeout = 0.6, None if deadline is None else "0.15"
    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), max_queue_ms=50,
                                request_timeout_s=0.15 if deadline == "deployment" else None),
                 shed_pacing_s=pacing) as client:
        monkeypatch.setattr(deployment(client, "policy").executor, "expected_wait_s",
                            lambda batchable=True, own_pending=None: 2.4)
        headers = {"x-request-timeout": timeout} if deadline == "header" else {}
        started = time.perf_counter()
        response = client.post("/predict/diffusion_policy", json=PREDICT_REQUESTS["diffusion_policy"],
                               headers=headers)
        held = time.perf_counter() - started
    assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded"
    assert response.headers["retry-after"] == "3"
    if timeout is None:
        assert pacing / 2 <= held
    else:  # the refusal comes by the deadline (the 503 says the wait is past it)
        assert 0.1 <= held < pacing / 2 + 0.5 and "deadline" in response.json()["error"]["message"]


def test_a_refusal_with_a_short_wait_is_held_about_that_long(tiny_checkpoints, monkeypatch):
    """With VLA_SHED_RETRIES_PER_S, an overload refusal whose expected wait is 20 ms comes after 10-20 ms (and the
    time to answer), not after half of VLA_SHED_PACING_S: sooner there is no room, later the model may wait for
    the retries."""
    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), max_queue_ms=5),
                 shed_pacing_s=2.0, shed_retries_per_s=500) as client:
        monkeypatch.setattr(deployment(client, "policy").executor, "expected_wait_s",
                            lambda batchable=True, own_pending=None: 0.02)
        started = time.perf_counter()
        response = client.post("/predict/diffusion_policy", json=PREDICT_REQUESTS["diffusion_policy"])
        held = time.perf_counter() - started
    assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded"
    assert response.headers["retry-after"] == "1"
    assert 0.01 <= held < 0.5, held


def test_a_refusal_after_the_body_is_held_by_the_same_pacer(tiny_checkpoints, monkeypatch):
    """Admitted at the front door, refused when it queues (the app's error handler): held for its short wait too,
    by the pacer the door uses (one count of the refusals held)."""
    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), max_queue_ms=5),
                 shed_pacing_s=2.0, shed_retries_per_s=500) as client:
        waits = iter([0.0])  # the door's look: no wait; every later one: 20 ms
        monkeypatch.setattr(deployment(client, "policy").executor, "expected_wait_s",
                            lambda batchable=True, own_pending=None: next(waits, 0.02))
        pacer = client.app.state.refusal_pacer
        held_meanwhile = []
        real_hold = pacer.hold

        async def counting_hold(exc):
            held_meanwhile.append(exc.wait_s)
            return await real_hold(exc)

        monkeypatch.setattr(pacer, "hold", counting_hold)
        started = time.perf_counter()
        response = client.post("/predict/diffusion_policy", json=PREDICT_REQUESTS["diffusion_policy"])
        held = time.perf_counter() - started
    assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded"
    assert held_meanwhile == [0.02] and held < 0.5, (held_meanwhile, held)


def test_a_held_refusal_that_is_cancelled_or_past_its_deadline_is_no_longer_counted():
    async def scenario() -> None:
        pacer = RefusalPacer(pacing_s=5.0, retries_per_s=100)
        overloaded = ApiError(503, "busy", retry_after=3, type="overloaded", wait_s=2.0)
        task = asyncio.ensure_future(pacer.hold(overloaded))
        await asyncio.sleep(0.05)
        assert pacer.held == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pacer.held == 0
        late = ApiError(503, "busy", retry_after=3, type="overloaded", wait_s=2.0, deadline=time.perf_counter() - 1)
        assert await asyncio.wait_for(pacer.hold(late), 1.0) == 3  # at once: its deadline has passed
        assert pacer.held == 0

    asyncio.run(scenario())


def test_many_refusals_held_at_once_are_held_long_enough_to_come_back_at_the_set_rate():
    """The period is the longer of the refusing wait and the held refusals ÷ VLA_SHED_RETRIES_PER_S, at most
    VLA_SHED_PACING_S (whole for a refusal of unknown wait, or with a rate of 0)."""
    pacer = RefusalPacer(pacing_s=1.0, retries_per_s=100)
    assert pacer.period(None) == 1.0
    for held, wait_s, period in ((1, 0.02, 0.02), (50, 0.02, 0.5), (50, 0.7, 0.7), (500, 0.02, 1.0)):
        pacer.held = held
        assert pacer.period(wait_s) == pytest.approx(period), (held, wait_s)
    assert RefusalPacer(1.0, 0).period(0.02) == 1.0

    async def forty_at_once() -> list[float]:
        """40 refusals with a wait of 10 ms, held together: the k-th held is held for k/200 to k/100 s."""
        pacer = RefusalPacer(pacing_s=1.0, retries_per_s=100)

        async def one() -> float:
            started = time.perf_counter()
            assert await pacer.hold(ApiError(503, "busy", retry_after=1, type="overloaded", wait_s=0.01)) == 1
            return time.perf_counter() - started

        held = await asyncio.gather(*(one() for _ in range(40)))
        assert pacer.held == 0
        return sorted(held)

    held = asyncio.run(forty_at_once())
    assert held[0] < 0.05 and 0.2 <= held[-1] < 0.6, held
    not_overload = ApiError(503, "loading", retry_after=5, type="not_ready", wait_s=0.01)
    assert asyncio.run(RefusalPacer(1.0, 100).hold(not_overload)) == 5  # not held


def test_a_generation_is_refused_when_its_wait_for_a_slot_exceeds_max_queue_ms(chat_checkpoint):  # noqa: F811
    """A continuously batching deployment with one slot, taken by a long stream: a new generation would wait until
    that one could end, over its max_queue_ms, so it is refused at once (503 with Retry-After)."""
    spec = DeploymentSpec(name="chat", checkpoint=str(chat_checkpoint), max_queue_ms=5, max_batch_size=1)
    with serving(spec, continuous_batching=True) as client:
        long = {"model": "chat", "messages": [{"role": "user", "content": "shall i compare thee"}], "max_tokens": 900,
                "stream": True, "temperature": 0}  # greedy: over 100 tokens (test_openai.py)
        with client.stream("POST", "/v1/chat/completions", json=long) as stream:
            lines = stream.iter_lines()
            for _ in range(6):  # a few tokens in: the batcher has timed its steps
                next(line for line in lines if line.startswith("data:"))
            reply = client.post("/predict/transformer", json={"model": "chat", "prompt": "a", "max_new_tokens": 4})
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["type"] == "overloaded" and "max_queue_ms" in error["message"] and reply.headers["retry-after"]
        # the stream's client has left: once its slot is free, generations are admitted again
        deadline = time.monotonic() + 10
        while 'vla_generation_sequences{deployment="chat",state="running"} 0.0' not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the stream's sequence kept its slot after its client left"
            time.sleep(0.02)
        assert client.post("/predict/transformer", json={"model": "chat", "prompt": "a", "max_new_tokens": 4}
                           ).status_code == 200


def test_max_queue_calls_does_not_bound_a_wait_for_slots(chat_checkpoint, monkeypatch):  # noqa: F811
    """A continuous batcher's generation waits for slots, which no executor call measures: ``max_queue_calls``
    leaves it alone (it would have compared a slot's wait with, say, an evaluation's call), while a plain call of
    the same deployment with the same expected wait is refused by it."""
    spec = DeploymentSpec(name="chat", checkpoint=str(chat_checkpoint), max_queue_calls=0.1, max_batch_size=2)
    with serving(spec, continuous_batching=True) as client:
        chat = deployment(client, "chat")
        calls_ahead = [0.0]  # the executor's queue: empty while the generation comes (nothing to bound at the door)
        record = _Record({1: 1.0, 2: 1.0})  # its calls take 1 s: a 100 ms bound
        monkeypatch.setattr(chat.executor, "call_seconds", record)
        monkeypatch.setattr(chat.executor, "expected_wait_s", lambda batchable=True, own_pending=None: calls_ahead[0])
        monkeypatch.setattr(chat.batcher, "expected_wait_s", lambda rows=1: 0.5)  # 500 ms for a slot
        generated = client.post("/predict/transformer", json={"model": "chat", "prompt": "a", "max_new_tokens": 2})
        assert generated.status_code == 200, generated.text
        calls_ahead[0] = 0.5
        evaluated = client.post("/evaluate/transformer", json={"model": "chat", "texts": ["a b"]})
        assert evaluated.status_code == 503 and "max_queue_calls" in evaluated.json()["error"]["message"], \
            evaluated.text


@pytest.mark.parametrize("model_process", [False, True], ids=["in_thread", "model_process"])
def test_a_generation_of_more_sequences_than_the_free_slots_is_refused_by_the_wait_for_all_of_them(
        chat_checkpoint, model_process):  # noqa: F811
    """Two slots, one taken by a long stream: a one-sequence generation joins at once, but one of two sequences
    (two prompts, or n=2 choices) waits until the stream could end, over its max_queue_ms: refused at once. In a
    model process the server estimates that wait from the slots the child reported. The refusals go out at once
    (no shed pacing): held for their pacing, the last ones came after the stream (about a second) had ended."""
    spec = DeploymentSpec(name="chat", checkpoint=str(chat_checkpoint), max_queue_ms=5, max_batch_size=2)
    with serving(spec, continuous_batching=True, model_process=model_process, shed_pacing_s=0) as client:
        long = {"model": "chat", "messages": [{"role": "user", "content": "shall i compare thee"}], "max_tokens": 900,
                "stream": True, "temperature": 0}
        with client.stream("POST", "/v1/chat/completions", json=long) as stream:
            lines = stream.iter_lines()
            for _ in range(6):  # a few tokens in: the batcher has timed its steps
                next(line for line in lines if line.startswith("data:"))
            one = client.post("/predict/transformer", json={"model": "chat", "prompt": "a", "max_new_tokens": 2})
            two = client.post("/predict/transformer", json={"model": "chat", "prompt": ["a", "b"],
                                                            "max_new_tokens": 2})
            choices = client.post("/v1/completions", json={"model": "chat", "prompt": "a", "max_tokens": 2, "n": 2})
            chat = client.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 2, "n": 2,
                                                             "messages": [{"role": "user", "content": "a"}]})
        assert one.status_code == 200, one.text
        for reply in (two, choices, chat):
            assert reply.status_code == 503, reply.text
            assert "max_queue_ms" in reply.json()["error"]["message"] and reply.headers["retry-after"]


def test_a_refusal_held_back_no_longer_counts_as_waiting(tiny_checkpoints, monkeypatch):
    """A request admitted from its headers and refused after its body was read (the wait grew meanwhile) gives back
    its reservation before its 503 is held back: while held, it does not lengthen the wait the next requests see."""
    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]),
                                max_queue_ms=500, max_batch_size=1), shed_pacing_s=1.0) as client:
        policy = client.app.state.manager.get("policy")
        body = json.dumps(PREDICT_REQUESTS["diffusion_policy"]).encode()
        assert client.post("/predict/diffusion_policy", content=body).status_code == 200
        real_wait = policy.executor.expected_wait_s
        waits = iter([0.0])  # the door sees an empty queue; when the body has been read, 2.4 s
        monkeypatch.setattr(policy.executor, "expected_wait_s",
                            lambda batchable=True, own_pending=None: next(waits, 2.4))
        scope = {"type": "http", "method": "POST", "path": "/predict/diffusion_policy", "raw_path": b"",
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "scheme": "http", "http_version": "1.1",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

        async def scenario():
            reads, sent = 0, []

            async def receive():
                nonlocal reads
                reads += 1
                if reads > 1:  # (no disconnect while the refusal is held)
                    await asyncio.Event().wait()
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message):
                sent.append(message)

            request = asyncio.ensure_future(client.app(scope, receive, send))
            await asyncio.sleep(0.3)  # refused after its body, its refusal held by the pacer (0.5-1 s)
            held = not request.done()
            counted = dict(policy.executor.pending)
            await request
            return held, counted, sent

        held, counted, sent = asyncio.run(scenario())
        assert next(m["status"] for m in sent if m["type"] == "http.response.start") == 503
        assert held
        assert counted == {True: 0, False: 0}
        assert real_wait(True) == 0.0


def test_a_request_without_its_key_gets_401_whatever_its_timeout_header_says(tiny_checkpoints):
    """The key is checked first: a caller without one learns nothing else (before, a malformed X-Request-Timeout
    got 400 ahead of the 401)."""
    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"])),
                 api_keys="key") as client:
        for timeout in ("soon", "-1", "1"):
            refused = client.get("/models", headers={"X-Request-Timeout": timeout})
            assert refused.status_code == 401, (timeout, refused.text)
        bad = client.get("/models", headers={"X-Request-Timeout": "soon", "Authorization": "Bearer key"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "X-Request-Timeout"
