from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from service import DeploymentSpec, Settings, create_app


def wait_ready(client: TestClient, timeout: float = 60.0):
    """Until the server is ready and no deployment loads (one added through the admin API leaves it ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health/ready")
        body = response.json()
        if body.get("status") == "failed" or (
                response.status_code == 200 and "loading" not in body.get("deployments", {}).values()):
            return response
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout}s: {response.json()}")


@contextmanager
def serving(*specs: DeploymentSpec, **settings):
    settings.setdefault("device", "cpu")  # CPU tests stay on the CPU where a GPU is present
    app = create_app(Settings(deployments=list(specs), **settings))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(tiny_checkpoints, transformer_fixture):
    specs = [DeploymentSpec(name=f"tiny-{t}", checkpoint=str(p)) for t, p in tiny_checkpoints.items()]
    with serving(*specs, max_new_tokens=64, max_batch=4, max_body_bytes=64 * 1024) as c:
        yield c
