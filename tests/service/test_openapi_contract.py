"""/openapi.json documents what the middleware reads and adds, which FastAPI cannot see from the endpoints: the
``X-Request-ID`` request and reply headers, ``X-Request-Timeout`` on the operations that act on it, ``Retry-After``
on the replies that carry it, msgpack request bodies beside JSON, and a typed ``GET /sessions`` reply. Each is
checked in the schema, then once against the live server."""

from __future__ import annotations

import re

import msgpack
import pytest

from service import DeploymentSpec
from service.codecs import MSGPACK_TYPES
from service.deadlines import MAX_TIMEOUT_S
from service.request_ids import MAX_LENGTH, PATTERN, request_id_of
from service.routes.sessions import SessionList
from vla_foundry.models.registry import list_registered_models, model_modality
from tests.factories import POLICY_CAMERAS, PREDICT_REQUESTS, png_data_url
from tests.service.conftest import serving

TEXT = {"model": "tiny", **PREDICT_REQUESTS["transformer"]}
ERROR_STATUSES = ("400", "401", "404", "409", "413", "415", "422", "500", "503", "504")


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    specs = [DeploymentSpec(name="tiny", checkpoint=str(tiny_checkpoints["transformer"])),
             DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))]
    with serving(*specs, shed_pacing_s=0) as c:  # overload refusals at once
        yield c


@pytest.fixture(scope="module")
def spec(client) -> dict:
    return client.get("/openapi.json").json()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def header(operation: dict, name: str):
    return next((p for p in operation.get("parameters", ()) if p["in"] == "header" and p["name"] == name), None)


def carries_request_id(label: str) -> bool:
    """Every operation but ``GET /health/live``, which the probe answers before the request-id middleware
    (``service/probes.py``): its reply has no X-Request-ID."""
    return label != "GET /health/live"


def step_body(i: int = 0) -> dict:
    return {"model": "policy", "step": i, "observation": {
        "images": {cam: png_data_url(10 * i + k) for k, cam in enumerate(POLICY_CAMERAS)},
        "lowdim": {"arm__pos": [0.1 * i, -0.2 * i]}, "language_instruction": "pick up the red block"}}


# ----------------------------------------------------------------------------- X-Request-ID


def test_request_ids_are_documented_on_every_operation_and_reply(spec):
    documented = [label for label, _ in operations(spec) if carries_request_id(label)]
    assert len(documented) >= 20 and {"GET /models", "GET /health/ready", "GET /metrics"} <= set(documented)
    for label, operation in operations(spec):
        for status in ERROR_STATUSES:  # every error reply, whichever route (errors.ERROR_RESPONSES)
            assert operation["responses"][status]["headers"]["X-Request-ID"]["required"] is True, (label, status)
        if not carries_request_id(label):
            continue
        parameter = header(operation, "X-Request-ID")
        assert parameter is not None and parameter["required"] is False, label
        assert parameter["schema"] == {"type": "string", "minLength": 1, "maxLength": MAX_LENGTH, "pattern": PATTERN}
        reply = operation["responses"]["200"]["headers"]["X-Request-ID"]
        assert reply["required"] is True and reply["schema"]["pattern"] == PATTERN, label


@pytest.mark.parametrize("value", ["robot-7:step.42", "a", "x" * 128, "A_Z.0:9-", "x" * 129, "a b", "", "é",
                                   "id\twith\ttabs", "semi;colon", "slash/"])
def test_the_documented_pattern_is_what_the_server_echoes(value):
    """What the pattern admits is exactly what ``request_ids`` echoes; anything else is replaced by a new id, which
    matches the pattern too."""
    echoed = request_id_of({"headers": [(b"x-request-id", value.encode("utf-8"))]})
    assert (echoed == value) == bool(re.fullmatch(PATTERN, value)), value
    assert re.fullmatch(PATTERN, echoed) and len(echoed) <= MAX_LENGTH


def test_a_request_id_is_echoed_as_documented(client):
    ok = client.post("/predict/transformer", json=TEXT, headers={"X-Request-ID": "robot-7:step.42"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "robot-7:step.42"
    refused = client.post("/sessions/arm/reset", json={"seed": -1}, headers={"X-Request-ID": "r-422"})
    assert refused.status_code == 422 and refused.headers["x-request-id"] == "r-422"
    assert refused.json()["error"]["request_id"] == "r-422"
    replaced = client.get("/v1/models", headers={"X-Request-ID": "a b"})
    assert replaced.status_code == 200 and re.fullmatch(PATTERN, replaced.headers["x-request-id"])


# ----------------------------------------------------------------------------- X-Request-Timeout


HONOURED = {"POST /v1/completions", "POST /v1/chat/completions", "POST /sessions/{session_id}/step"}


def test_a_timeout_header_is_documented_exactly_where_it_is_honoured(spec):
    """The operations whose requests queue for a model (Deployment.admit and call read the deadline): every typed
    /predict and /evaluate, the /v1 generations and a session's step; not listings, resets or deletes."""
    documented = {label for label, operation in operations(spec) if header(operation, "X-Request-Timeout")}
    typed = {label for label, _ in operations(spec) if label.startswith(("POST /predict/", "POST /evaluate/"))}
    assert len(typed) >= 16 and documented == typed | HONOURED
    for label in documented:
        parameter = header(dict(operations(spec))[label], "X-Request-Timeout")
        assert parameter["required"] is False
        assert parameter["schema"] == {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S}


def test_the_timeout_header_is_honoured_and_its_bounds_enforced(client, monkeypatch):
    """In bounds, it sets the deadline: a wait longer than it is refused at once (503, with the Retry-After
    documented on 503s), where the same request without it runs. Out of bounds, it is refused (400)."""
    executor = client.app.state.manager.get("tiny").executor
    for value in ("0", "-1", str(MAX_TIMEOUT_S * 2), "nan", "soon"):
        response = client.post("/predict/transformer", json=TEXT, headers={"X-Request-Timeout": value})
        assert response.status_code == 400 and response.json()["error"]["field"] == "X-Request-Timeout", value
    assert client.post("/predict/transformer", json=TEXT,
                       headers={"X-Request-Timeout": f"{MAX_TIMEOUT_S:g}"}).status_code == 200
    monkeypatch.setattr(executor, "expected_wait_s",
                        lambda batchable=True, own_pending=None: 2.4)  # 2.4 s of work queued
    refused = client.post("/predict/transformer", json=TEXT, headers={"X-Request-Timeout": "1"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded", refused.text
    assert refused.headers["retry-after"] == "3" and refused.headers["x-request-id"]
    assert client.post("/predict/transformer", json=TEXT).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/sessions/{session}/step"])
def test_the_timeout_header_is_honoured_on_the_other_operations_that_document_it(client, monkeypatch, path):
    """As on /predict: a generation (continuous batching's wait) and a robot session's step (the policy's queue)
    whose expected wait is longer than the header's deadline are refused at once; without it they run."""
    if path == "/v1/completions":
        deployment = client.app.state.manager.get("tiny")
        body = {"model": "tiny", "prompt": "the robot", "max_tokens": 2}
        waits = [(deployment.executor, "expected_wait_s")]
        if deployment.batcher is not None:
            waits.append((deployment.batcher, "expected_wait_s"))
    else:
        path, body = path.format(session="timeout-probe"), step_body()
        waits = [(client.app.state.manager.get("policy").executor, "expected_wait_s")]
    assert client.post(path, json=body, headers={"X-Request-Timeout": "1"}).status_code == 200
    for owner, name in waits:
        monkeypatch.setattr(owner, name, lambda *args, **kwargs: 2.4)
    refused = client.post(path, json={**body, **({"step": 1} if "step" in body else {})},
                          headers={"X-Request-Timeout": "1"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3", refused.text
    assert client.post(path, json={**body, **({"step": 1} if "step" in body else {})}).status_code == 200


# ----------------------------------------------------------------------------- Retry-After


def test_retry_after_is_documented_where_it_is_sent(spec):
    """On every 503 (overloaded, loading, a drain cut short, /health/ready not ready: any route); on the 409 of the
    operations that store a robot session's step (a session_conflict's Retry-After: 0), and no other 409."""
    policies = {f"POST /predict/{t}" for t in list_registered_models() if model_modality(t) == "action"}
    conflict = {"POST /sessions/{session_id}/step", "POST /sessions/{session_id}/reset", *policies}
    assert policies
    for label, operation in operations(spec):
        retry_after = operation["responses"]["503"]["headers"]["Retry-After"]
        assert retry_after["required"] is False and retry_after["schema"] == {"type": "integer", "minimum": 0}
        on_conflict = operation["responses"]["409"]["headers"].get("Retry-After")
        assert (on_conflict is not None) == (label in conflict), label
        assert operation["responses"]["409"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}, label
        for status in set(operation["responses"]) - {"409", "503"}:
            assert "Retry-After" not in operation["responses"][status].get("headers", {}), (label, status)


# ----------------------------------------------------------------------------- msgpack bodies


def test_every_request_body_is_documented_in_msgpack_too(spec):
    with_body = 0
    for label, operation in operations(spec):
        if "requestBody" not in operation:
            continue
        with_body += 1
        content = operation["requestBody"]["content"]
        assert set(content) == {"application/json", *MSGPACK_TYPES}, label
        assert all(media["schema"] == content["application/json"]["schema"] for media in content.values()), label
        schema = content["application/json"]["schema"]
        refs = [schema.get("$ref")] + [b.get("$ref") for b in schema.get("anyOf", ())]
        assert any(r and r.removeprefix("#/components/schemas/") in spec["components"]["schemas"] for r in refs), label
    assert with_body >= 20


@pytest.mark.parametrize("media_type", MSGPACK_TYPES)
def test_a_msgpack_body_is_taken_where_documented(client, media_type):
    packed = {"content": None, "headers": {"Content-Type": media_type}}
    for path, body in (("/predict/transformer", TEXT), ("/v1/completions", {"model": "tiny", "prompt": "hi",
                                                                            "max_tokens": 2}),
                       (f"/sessions/mp-{media_type.split('/')[1]}/step", step_body()),
                       (f"/sessions/mp-{media_type.split('/')[1]}/reset", {"seed": 3})):
        packed["content"] = msgpack.packb(body, use_bin_type=True)
        response = client.post(path, **packed)
        assert response.status_code == 200, (path, response.text)


# ----------------------------------------------------------------------------- GET /sessions


def test_the_session_list_reply_is_typed(spec):
    reply = spec["paths"]["/sessions"]["get"]["responses"]["200"]
    assert reply["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SessionList"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["SessionList"]["required"]) == {"sessions", "max_sessions", "idle_timeout_s"}
    assert schemas["SessionList"]["properties"]["sessions"]["items"] == {"$ref": "#/components/schemas/SessionInfo"}


def test_the_session_list_matches_its_model(client):
    """What GET /sessions returns (unchanged) has exactly the documented fields and types."""
    assert client.post("/sessions/listed/step", json=step_body()).status_code == 200
    body = client.get("/sessions").json()
    listed = SessionList.model_validate(body)
    assert set(body) == set(SessionList.model_fields)
    row = next(row for row in body["sessions"] if row["session_id"] == "listed")
    assert set(row) == set(type(listed.sessions[0]).model_fields)
    assert row["model"] == "policy" and row["requests"] == 1 and row["last_step"] == 0
