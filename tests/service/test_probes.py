"""``GET /health/live`` at the outermost layer (service/probes.py): the same answer as the route, for less."""

from __future__ import annotations

import asyncio

import msgpack
from fastapi.testclient import TestClient

from service import DeploymentSpec, Settings, create_app
from service.probes import LivenessProbe


def test_the_probe_answers_before_keys_and_routing():
    # a deployment that fails to load at once (no deployments at all would mean the demo pack)
    app = create_app(Settings(deployments=[DeploymentSpec(name="none", checkpoint="/nonexistent")],
                              api_keys="secret"))
    with TestClient(app) as client:
        response = client.get("/health/live")
        assert response.status_code == 200 and response.json() == {"status": "live"}
        assert response.headers["content-type"] == "application/json"
        head = client.head("/health/live")
        assert head.status_code == 200 and head.content == b""
        # msgpack is the route's to answer; still public
        packed = client.get("/health/live", headers={"accept": "application/msgpack"})
        assert packed.status_code == 200 and msgpack.unpackb(packed.content) == {"status": "live"}
        # as every route reads Accept (q-values): msgpack preferred through a wildcard, refused with q=0
        for accept, packs in (("application/*, application/json;q=0", True), ("application/msgpack;q=0", False),
                              ("*/*", False)):
            reply = client.get("/health/live", headers={"accept": accept})
            assert (reply.headers["content-type"] == "application/msgpack") is packs, accept
        assert client.post("/health/live").status_code == 405  # only GET and HEAD are probes
        assert client.get("/models").status_code == 401  # everything else still needs a key
        assert "/health/live" in client.get("/openapi.json", headers={"authorization": "Bearer secret"}).json()[
            "paths"]


def test_the_probe_sees_the_path_under_a_root_path():
    """Behind a proxy or Ray's route_prefix the path carries the prefix; the probe strips it as the routes do."""
    def call(path: str, root_path: str) -> list:
        sent, passed = [], []

        async def app(scope, receive, send):
            passed.append(scope["path"])

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": []}
        asyncio.run(LivenessProbe(app)(scope, receive, send))
        return [m.get("status") or m.get("body") for m in sent] if sent else passed

    assert call("/api/health/live", "/api") == [200, b'{"status":"live"}']
    assert call("/health/live", "") == [200, b'{"status":"live"}']
    assert call("/x/health/live", "/api") == ["/x/health/live"]  # not ours: on to the app
    assert call("/api/health/ready", "/api") == ["/api/health/ready"]
