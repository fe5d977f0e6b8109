"""API keys (``service.auth``): every route but the health probes and the docs needs one once keys are set.

In process: each route the app has, HTTP and websocket, refused without a valid key; both
header schemes accepted; the refusal in the one error shape, before the body is read. On a
real server: the robot clients' ``api_key`` over HTTP and the websocket.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import yaml
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.testclient import WebSocketDenialResponse

from service import DeploymentSpec, Settings
from service.auth import PUBLIC_PATHS, ApiKeys, read_keys
from tests.factories import POLICY_CAMERAS
from tests.service.conftest import serving
from tests.service.live_server import live_server
from vla_foundry_client import HttpPolicyClient, PolicyServerError, WebsocketPolicyClient

KEYS = "key-one,key-two"


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    with serving(DeploymentSpec(name="tiny-transformer", checkpoint=str(tiny_checkpoints["transformer"])),
                 api_keys=KEYS) as c:
        yield c


def _routes(items):
    """(kind, method, path) of every route, path parameters filled in."""
    for route in items:
        if hasattr(route, "original_router"):  # an included router (health, models, the OpenAI API)
            yield from _routes(route.original_router.routes)
            continue
        path = route.path.replace("{model_type}", "transformer").replace("{session_id}", "robot-1")
        path = path.replace("{name}", "tiny-transformer")
        if isinstance(route, APIWebSocketRoute):
            yield "websocket", "GET", path
        elif isinstance(route, APIRoute) or hasattr(route, "methods"):
            for method in sorted(route.methods or []):
                if method != "HEAD":
                    yield "http", method, path


def test_every_route_but_the_probes_and_docs_needs_a_key(client):
    checked = 0
    for kind, method, path in _routes(client.app.routes):
        if path in PUBLIC_PATHS:
            continue
        checked += 1
        if kind == "websocket":
            with pytest.raises(WebSocketDenialResponse) as info:
                with client.websocket_connect(path):
                    pass
            assert info.value.status_code == 401, path
            assert info.value.json()["error"]["type"] == "unauthorized"
            continue
        response = client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["type"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert checked > 20  # predict/evaluate per type, sessions, the websocket, /models, the OpenAI routes


def test_the_probes_and_docs_need_none(client):
    for path in ("/health/live", "/health/ready", "/healthz", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path


def test_the_openapi_document_says_which_operations_take_a_key(client, tiny_checkpoints):
    """A bearer scheme, and on each operation the security its route asks for: Swagger UI at /docs then offers its
    Authorize button and sends the key (without, "Try it out" got 401 everywhere). A server without keys says none."""
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "An API key of VLA_API_KEYS, as `Authorization: Bearer "
                                                           "<key>`."}
    checked = set()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method != "get" or "{" in path:
                continue
            refused = client.get(path).status_code == 401
            assert operation["security"] == ([{"apiKey": []}] if refused else []), path
            checked.add(refused)
    assert checked == {True, False}
    with serving(DeploymentSpec(name="tiny-transformer", checkpoint=str(tiny_checkpoints["transformer"]))) as open_:
        spec = open_.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert not any("security" in op for ops in spec["paths"].values() for op in ops.values() if isinstance(op, dict))


@pytest.mark.parametrize("header", ["Api-Key key-one", "Bearer key-two", "bearer key-one", "API-KEY  key-two "])
def test_either_scheme_with_a_configured_key_is_let_through(client, header):
    response = client.post("/predict/transformer", json={"prompt": "hi", "max_new_tokens": 2},
                           headers={"Authorization": header})
    assert response.status_code == 200, response.text
    assert client.get("/models", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("header,message", [
    (None, "requires an API key"), ("Api-Key wrong-key", "not valid"), ("Bearer key-one-and-more", "not valid"),
    ("Basic a2V5LW9uZQ==", "unsupported Authorization header"), ("Api-Key", "unsupported Authorization header"),
    ("key-one", "unsupported Authorization header"), ("sk-bare-key x", "unsupported Authorization header")])
def test_a_missing_or_wrong_key_is_refused_without_echoing_it(client, header, message):
    headers = {} if header is None else {"Authorization": header}
    response = client.get("/models", headers=headers)
    assert response.status_code == 401
    assert message in response.json()["error"]["message"]
    for secret in ("wrong-key", "key-one", "a2V5LW9uZQ", "sk-bare-key"):  # a bare key is not quoted back either
        assert secret not in response.text


def test_the_refusal_comes_before_the_body_is_read(client):
    """Bytes that are not msgpack would get 400 from the body decoder; without a key they get 401, in the
    format the client accepts."""
    response = client.post("/predict/transformer", content=b"\xc1 not msgpack",
                           headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    assert response.status_code == 401
    assert msgpack.unpackb(response.content)["error"]["type"] == "unauthorized"


def test_keys_from_the_variable_and_a_secrets_file(tmp_path, monkeypatch):
    secrets = tmp_path / "keys"
    secrets.write_text("# robots\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("VLA_API_KEYS", " env-key , ,other ")
    monkeypatch.setenv("VLA_API_KEYS_FILE", str(secrets))
    settings = Settings()
    assert settings.api_key_list() == ["env-key", "other", "file-key-1", "file-key-2"]
    assert "env-key" not in repr(settings)  # a secret: never printed with the settings
    assert ApiKeys(settings.api_key_list()).refusal("Bearer file-key-2") is None


def test_a_missing_file_or_a_malformed_key_stops_the_start(tmp_path):
    with pytest.raises(ValueError, match="api_keys_file .*: No such file"):
        Settings(api_keys_file=tmp_path / "missing")
    empty = tmp_path / "empty-secret"  # an empty secret mounted, or one of comments only: the server would be open
    for text in ("", "\n  \n", "# keys go here\n"):
        empty.write_text(text)
        with pytest.raises(ValueError, match="api_keys_file .* holds no key"):
            Settings(api_keys_file=empty)
        with pytest.raises(ValueError, match="api_keys_file .* holds no key"):  # (beside keys of the variable)
            Settings(api_keys="robot-1", api_keys_file=empty)
    for bad in ("good,bad\tkey", "clé"):  # a header is latin-1 on the wire: keys are ASCII tokens
        with pytest.raises(ValueError, match="whitespace, a control or a non-ASCII character"):
            read_keys(bad, None)
    assert read_keys(None, None) == []  # no keys: no authentication
    assert Settings(api_keys=["yaml-1", "yaml-2"]).api_key_list() == ["yaml-1", "yaml-2"]  # a YAML list


def test_the_open_paths_stay_open_under_a_root_path():
    """Behind a proxy or Ray's route_prefix the scope's path carries the prefix; the probes stay open, and
    a route that merely ends like one does not."""
    import asyncio

    from service.auth import ApiKeyMiddleware

    async def call(path: str, root_path: str) -> int:
        statuses = []

        async def app(scope, receive, send):
            statuses.append(200)

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": []}
        await ApiKeyMiddleware(app, ApiKeys(["k"]))(scope, receive, send)
        return statuses[0]

    assert asyncio.run(call("/api/health/live", "/api")) == 200
    assert asyncio.run(call("/api/models", "/api")) == 401
    assert asyncio.run(call("/x/health/live", "/api")) == 401


def test_the_robot_clients_send_their_key(tiny_checkpoints, tmp_path):
    """A real server with keys from a secrets file named in the deployment YAML."""
    secrets = tmp_path / "api-keys"
    secrets.write_text("robot-key\n")
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"api_keys_file": str(secrets), "deployments": [
        {"name": "tiny-policy", "checkpoint": str(tiny_checkpoints["diffusion_policy"]), "num_inference_steps": 2}]}))
    rng = np.random.default_rng(0)
    observation = {"images": {c: rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for c in POLICY_CAMERAS},
                   "lowdim": {"arm__pos": np.array([0.1, 0.2], np.float32)},
                   "language_instruction": "pick up the red block"}
    with live_server(["--config", str(config)], tmp_path / "demo") as base:
        with HttpPolicyClient(base, session_id="robot-1", api_key="robot-key") as robot:
            assert robot.infer(observation)["action_chunk"].shape[1] == 3
        with HttpPolicyClient(base, api_key="not-the-key") as robot, pytest.raises(PolicyServerError) as info:
            robot.metadata()
        assert (info.value.status, info.value.type) == (401, "unauthorized")

        with WebsocketPolicyClient(base, api_key="robot-key") as robot:
            assert robot.metadata["cameras"] == list(POLICY_CAMERAS)
            assert robot.infer(observation)["actions"].shape[1] == 3
        with pytest.raises(PolicyServerError) as info:
            WebsocketPolicyClient(base, api_key="not-the-key")
        assert (info.value.status, info.value.type) == (401, "unauthorized")
        assert "not valid" in info.value.message


def test_a_server_open_to_the_network_without_keys_says_so(caplog):
    from service import create_app

    with caplog.at_level("WARNING", logger="service"):
        create_app(Settings(deployments=[], device="cpu", host="0.0.0.0"))
    assert "without API keys" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="service"):
        create_app(Settings(deployments=[], device="cpu", host="0.0.0.0", api_keys="k"))
        create_app(Settings(deployments=[], device="cpu"))
    assert "without API keys" not in caplog.text
