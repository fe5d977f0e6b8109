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
