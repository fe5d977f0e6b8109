"""``GET /metrics``: Prometheus text that parses and moves as traffic flows."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service import DeploymentSpec
from tests.conftest import FIXTURES
from tests.factories import PREDICT_REQUESTS
from tests.service.conftest import serving
from tests.service.live_server import live_server


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) → value, from the exposition text (parsed by prometheus_client)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_traffic(tiny_checkpoints):
    specs = [DeploymentSpec(name=f"tiny-{t}", checkpoint=str(tiny_checkpoints[t]))
             for t in ("transformer", "diffusion_policy", "stable_diffusion")]
    with serving(*specs) as client:
        before = samples(client.get("/metrics").text)
        for model_type in ("transformer", "diffusion_policy", "stable_diffusion"):
            response = client.post(f"/predict/{model_type}", json={"model": f"tiny-{model_type}",
                                                                   **PREDICT_REQUESTS[model_type]})
            assert response.status_code == 200, response.text
        assert client.post("/predict/transformer", json={"model": "tiny-transformer", "bogus": 1}).status_code == 422
        client.delete("/sessions/none-such")  # a route with a parameter: labelled by its template
        client.get("/no/such/path")
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        after = samples(response.text)

    route = "/predict/diffusion_policy"
    assert value(after, "vla_http_requests_total", route=route, method="POST", status="200") == \
        value(before, "vla_http_requests_total", route=route, method="POST", status="200") + 1
    assert value(after, "vla_http_requests_total", route="/predict/transformer", method="POST", status="422") == 1
    assert value(after, "vla_http_requests_total", route="/sessions/{session_id}", method="DELETE", status="404") == 1
    assert value(after, "vla_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(after, "vla_http_request_duration_seconds_count", route=route) >= 1
    for name in ("tiny-transformer", "tiny-diffusion_policy", "tiny-stable_diffusion"):
        assert value(after, "vla_model_run_seconds_count", deployment=name) >= 1
        assert value(after, "vla_model_queue_seconds_count", deployment=name) >= 1
        assert value(after, "vla_deployment_state", deployment=name, state="ready") == 1
        assert value(after, "vla_deployment_state", deployment=name, state="loading") == 0
        assert value(after, "vla_deployment_load_seconds", deployment=name) > 0
        assert (("vla_queue_depth", (("deployment", name),)) in after)
    assert value(after, "vla_model_batch_size_bucket", deployment="tiny-diffusion_policy", le="1.0") >= 1
    assert value(after, "vla_tokens_generated_total", deployment="tiny-transformer") >= 1
    assert value(after, "vla_images_generated_total", deployment="tiny-stable_diffusion") >= 1
    assert value(after, "vla_robot_sessions") == 0 and value(after, "vla_websocket_connections") == 0


def test_metrics_need_a_key_unless_public(tiny_checkpoints):
    spec = DeploymentSpec(name="tiny-transformer", checkpoint=str(tiny_checkpoints["transformer"]))
    with serving(spec, api_keys="secret") as client:
        assert client.get("/metrics").status_code == 401
        parsed = samples(client.get("/metrics", headers={"authorization": "Bearer secret"}).text)
        # the refused scrape was counted (the metrics sit outside the key check), under its route, though the key
        # check refused it before routing; a path no route serves stays "unmatched"
        assert value(parsed, "vla_http_requests_total", route="/metrics", method="GET", status="401") == 1
        assert client.get("/sessions/abc/step").status_code == 401
        assert client.get("/no/such/route").status_code == 401
        parsed = samples(client.get("/metrics", headers={"authorization": "Bearer secret"}).text)
        assert value(parsed, "vla_http_requests_total", route="/sessions/{session_id}/step", method="GET",
                     status="401") == 1
        assert value(parsed, "vla_http_requests_total", route="unmatched", method="GET", status="401") == 1
    with serving(spec, api_keys="secret", metrics_public=True) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/models").status_code == 401


def test_a_live_server_is_scraped(tmp_path):
    policy = FIXTURES / "diffusion_policy_clip_basic"
    with live_server(["--checkpoint", f"{policy}=fixture-policy"], tmp_path / "demo") as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            first = samples(client.get("/metrics").text)
            assert value(first, "vla_deployment_state", deployment="fixture-policy", state="ready") == 1
            for _ in range(3):
                assert client.get("/models").status_code == 200
            second = samples(client.get("/metrics").text)
    assert value(second, "vla_http_requests_total", route="/models", method="GET", status="200") == \
        value(first, "vla_http_requests_total", route="/models", method="GET", status="200") + 3


def test_garbage_collections_are_timed_while_the_app_runs(tiny_checkpoints):
    import gc

    from service.metrics import GcPauses

    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"]))) as client:
        before = samples(client.get("/metrics").text)
        gc.collect()  # a full collection, in this process, which the app's hook times
        after = samples(client.get("/metrics").text)
        hook = client.app.state.metrics.gc_pauses
        assert isinstance(hook, GcPauses) and hook in gc.callbacks
        full = value(after, "vla_gc_pause_seconds_count", generation="2")
        assert full >= value(before, "vla_gc_pause_seconds_count", generation="2") + 1
        assert value(after, "vla_gc_pause_seconds_bucket", generation="2", le="+Inf") == full
        assert value(after, "vla_gc_pause_seconds_sum", generation="2") > 0
        buckets = [value(after, "vla_gc_pause_seconds_bucket", generation="2", le=le)
                   for le in ("0.0005", "0.001", "0.01", "0.1", "1.0", "+Inf")]
        assert buckets == sorted(buckets)  # cumulative
    assert hook not in gc.callbacks  # the hook leaves with the app (other tests' apps may have theirs)


def test_records_for_a_forgotten_deployment_bring_back_no_series_until_the_name_is_served_again():
    """``forget_deployment`` (an unloaded deployment, once it ran its last call) removes the name's series, and a
    record that comes later (its last stream's tokens) makes none again; a deployment served under the name again
    records as any does."""
    from service.metrics import Metrics

    class Manager:
        deployments: dict = {"lm": object()}

    metrics = Metrics()
    metrics.watch(Manager(), sessions=None)  # (the manager tells which names are served; nothing here is scraped)
    per_deployment = (metrics.queue_seconds, metrics.run_seconds, metrics.batch_size, metrics.tokens, metrics.images,
                      metrics.first_token_seconds, metrics.token_pace_seconds, metrics.abandoned, metrics.shed)

    def lm_samples() -> list:
        return [sample for metric in per_deployment for family in metric.collect() for sample in family.samples
                if sample.labels.get("deployment") == "lm"]

    metrics.tokens.labels("lm").inc(3)
    metrics.shed.labels("lm", "queue").inc()
    metrics.first_token_seconds.labels("lm").observe(0.1)
    assert lm_samples()  # served: its records count
    Manager.deployments = {}  # unloaded, then its series forgotten once its last call ran
    metrics.forget_deployment("lm")
    assert lm_samples() == []
    metrics.tokens.labels("lm").inc(5)  # late records: a stream's last tokens, its token pace, a reply's usage, ...
    metrics.token_pace_seconds.labels("lm").observe(0.01)
    metrics.observe_reply("lm", {"usage": {"completion_tokens": 7}, "images": [1]})
    metrics.observe_model_call("lm", 1.0, 2.0, 1)
    metrics.abandoned.labels("lm").inc()
    metrics.shed.labels("lm", "body").inc()
    assert lm_samples() == []
    Manager.deployments = {"lm": object()}  # loaded again under the same name
    metrics.tokens.labels("lm").inc(2)
    assert [s.value for s in lm_samples() if s.name == "vla_tokens_generated_total"] == [2]


def test_a_stream_that_outlives_its_deployments_unload_leaves_no_series_behind(tiny_checkpoints):
    """A deployment unloaded while it streams a completion finishes the stream; its series are removed once it has
    run its last call, and what the stream records after that (its tokens, its token pace) brings none back: a
    scrape after the stream's end has no series of it.

    The model thread is held at its second decode step until the unload, so the stream is running then, and the
    reply's records wait until the series have been forgotten (a busy event loop gets to them that late)."""
    import threading

    admin = {"Authorization": "Bearer admin-key"}
    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"])),
                 DeploymentSpec(name="other", checkpoint=str(tiny_checkpoints["transformer"])),
                 admin_keys="admin-key") as client:
        metrics = client.app.state.metrics
        batcher = client.app.state.manager.deployments["lm"].batcher
        assert batcher is not None  # (streams decode in the continuous batcher)
        steps, at_second_step, unloaded, forgotten, order = [0], threading.Event(), threading.Event(), \
            threading.Event(), []
        step, forget, observe_reply = batcher.step, metrics.forget_deployment, metrics.observe_reply

        def held_step():
            steps[0] += 1
            if steps[0] == 2:  # (the first step made the stream's first tokens)
                at_second_step.set()
                assert unloaded.wait(30)
            step()

        def forget_deployment(name):
            forget(name)
            order.append(f"forgot {name}")
            forgotten.set()

        def late_observe_reply(name, payload):
            if name == "lm":
                assert forgotten.wait(30)
                order.append("stream recorded")
            observe_reply(name, payload)

        batcher.step, metrics.forget_deployment, metrics.observe_reply = held_step, forget_deployment, \
            late_observe_reply
        assert client.post("/v1/completions", json={"model": "other", "prompt": "a", "max_tokens": 2}).status_code \
            == 200
        streamed: list = []
        stream = threading.Thread(target=lambda: streamed.append(client.post(
            "/v1/completions", json={"model": "lm", "prompt": "the robot", "max_tokens": 30, "seed": 0,
                                     "stream": True})))
        stream.start()
        assert at_second_step.wait(30)
        assert 'deployment="lm"' in client.get("/metrics").text  # (its first token's time, its model call)
        assert client.delete("/admin/deployments/lm", headers=admin).status_code == 200
        unloaded.set()
        stream.join(60)
        assert not stream.is_alive()
        response = streamed[0]
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
        assert '"finish_reason":' in response.text and order == ["forgot lm", "stream recorded"]
        scrape = client.get("/metrics").text
        assert 'deployment="lm"' not in scrape, [line for line in scrape.splitlines() if 'deployment="lm"' in line]
        assert value(samples(scrape), "vla_tokens_generated_total", deployment="other") == 2


def test_a_scrape_while_the_admin_api_adds_a_deployment_is_served():
    """``/metrics`` runs on a worker thread while the admin API changes the deployments on the event loop: a scrape
    reads a copy of them (before, a deployment added while it read them made it fail, a 500)."""
    import types

    from service.metrics import _StateCollector

    deployments = {}

    class Deployment:  # one that the admin API's next add lands beside while the scrape reads it
        name, load_seconds, batcher, model_process = "policy", 1.0, None, None
        executor = types.SimpleNamespace(depth=0)

        @property
        def status(self):
            deployments.setdefault("added", types.SimpleNamespace(**{**vars(Deployment), "name": "added",
                                                                     "status": "loading"}))
            return "ready"

    deployments["policy"] = Deployment()
    collector = _StateCollector(types.SimpleNamespace(deployments=deployments),
                                types.SimpleNamespace(live=lambda: 0))
    families = {family.name: family for family in collector.collect()}
    assert [s.labels["deployment"] for s in families["vla_queue_depth"].samples] == ["policy"]


def test_a_refusal_before_routing_counts_under_the_route_of_its_path(tiny_checkpoints):
    """A 401 counts under the template of the route that serves its path, the routes of included routers
    (``/models``, ``/v1``) too (before, those counted as ``unmatched``)."""
    with serving(DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"])), api_keys="key") as client:
        for method, path in (("GET", "/models"), ("GET", "/models/lm"), ("POST", "/v1/completions"),
                             ("POST", "/predict/transformer")):
            assert client.request(method, path, json={}).status_code == 401
        parsed = samples(client.get("/metrics", headers={"authorization": "Bearer key"}).text)
    for method, route in (("GET", "/models"), ("GET", "/models/{name}"), ("POST", "/v1/completions"),
                          ("POST", "/predict/transformer")):
        assert value(parsed, "vla_http_requests_total", route=route, method=method, status="401") == 1, route


def test_a_client_that_leaves_while_it_sends_its_body_counts_as_499(tiny_checkpoints):
    """Nothing is answered to a client that disconnects mid-body; it counts (and is logged) as 499, as a client that
    leaves during its model call does, not as a 500 of the server's (which alerting would page on)."""
    import asyncio

    from service import Settings, create_app

    app = create_app(Settings(deployments=[DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"]))],
                              device="cpu"))
    messages = iter([{"type": "http.request", "body": b'{"prompt": "a', "more_body": True},
                     {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict/transformer", "raw_path": b"/predict/transformer", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"t"), (b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 1), "server": ("t", 80), "app": app}
    asyncio.run(app(scope, receive, send))
    assert sent == []
    parsed = samples(app.state.metrics.response().body.decode())
    route = dict(route="/predict/transformer", method="POST")
    assert value(parsed, "vla_http_requests_total", **route, status="499") == 1
    assert value(parsed, "vla_http_requests_total", **route, status="500") == 0


def test_a_light_request_held_by_the_pacer_is_timed_with_its_hold(tiny_checkpoints):
    """``vla_http_request_duration_seconds`` runs from a request's first byte: a GET the light-request pacer held
    while a model worked counts its hold (before, the timer started after it)."""
    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"])),
                 light_requests_per_s=2) as client:
        before = samples(client.get("/metrics").text)
        assert client.post("/predict/diffusion_policy", json={**PREDICT_REQUESTS["diffusion_policy"],
                                                              "seed": 1}).status_code == 200  # (a model at work)
        for _ in range(3):
            assert client.get("/models").status_code == 200
        after = samples(client.get("/metrics").text)
    held = value(after, "vla_light_request_delay_seconds_sum") - value(before, "vla_light_request_delay_seconds_sum")
    timed = (value(after, "vla_http_request_duration_seconds_sum", route="/models")
             - value(before, "vla_http_request_duration_seconds_sum", route="/models"))
    assert held > 0.3 and timed >= held, (held, timed)


def test_the_tokens_a_stream_sent_before_its_client_left_are_counted(tiny_checkpoints, tmp_path):
    """``vla_tokens_generated_total`` counts streams (README): one whose client leaves midway counts the tokens it
    was sent (before, only a stream that ended counted any)."""
    import time

    text = tiny_checkpoints["transformer"]
    with live_server(["--checkpoint", f"{text}=text"], tmp_path / "demo") as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            before = value(samples(client.get("/metrics").text), "vla_tokens_generated_total", deployment="text")
            events = 0
            with client.stream("POST", "/v1/completions", json={"model": "text", "prompt": "the", "max_tokens": 60,
                                                                 "temperature": 0, "stream": True}) as reply:
                for line in reply.iter_lines():
                    events += line.startswith("data: {")
                    if events == 3:
                        break  # the client leaves
            deadline = time.monotonic() + 10
            while True:
                after = value(samples(client.get("/metrics").text), "vla_tokens_generated_total", deployment="text")
                if after > before or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    assert after - before >= 3
