"""The real ``openpi-client`` (from PyPI, in a side environment) against a live server.

openpi-client pins numpy below 2, so it lives in its own venv (``tests/openpi/make_venv.py``,
run by ``make test`` and again here if needed); ``tests/openpi/peer.py`` runs there, importing
nothing of ours. The test skips only when that venv could not be built because the package
registry was unreachable.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from tests.openpi import make_venv
from tests.service.live_server import live_server
from tests.service.test_shared_sessions import redis_url  # noqa: F401  (a fixture: a Redis of this module's)

PEER = make_venv.HERE / "peer.py"


@pytest.fixture(scope="module")
def openpi_python() -> str:
    if make_venv.ensure() != 0:
        pytest.fail("the openpi-client side environment could not be built (see the pip output above)")
    reason = make_venv.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return str(make_venv.python_of(make_venv.DEFAULT_DIR))


def peer_against(openpi_python: str, serve_args: list[str], tmp_path, env=None) -> subprocess.CompletedProcess:
    with live_server(serve_args, tmp_path / "demo", env=env) as base:
        return subprocess.run([openpi_python, str(PEER), base], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_real_openpi_client_over_websocket_and_http(openpi_python, policy_fixture, tmp_path):
    run = peer_against(openpi_python, ["--checkpoint", f"{policy_fixture}=fixture-policy"], tmp_path)
    check_peer(run)


@pytest.mark.slow
def test_real_openpi_client_against_a_policy_in_a_model_process(openpi_python, policy_fixture, tmp_path):
    """The same client when the policy's model runs in a child process (VLA_MODEL_PROCESS): the websocket's and the
    HTTP session's steps cross to it alike."""
    run = peer_against(openpi_python, ["--checkpoint", f"{policy_fixture}=fixture-policy"], tmp_path,
                       env={"VLA_MODEL_PROCESS": "true"})
    check_peer(run)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (make test installs it from Debian)")
def test_real_openpi_client_against_two_replicas_behind_one_port(openpi_python, policy_fixture, redis_url,  # noqa: F811
                                                                   tmp_path):
    """The same client through `vla-foundry serve --replicas 2` (its websocket and its HTTP session, each request
    on whichever replica accepts the connection, the session in the shared store)."""
    run = peer_against(openpi_python, ["--checkpoint", f"{policy_fixture}=fixture-policy", "--replicas", "2",
                                       "--gpus", "none"], tmp_path, env={"VLA_SESSION_STORE": redis_url})
    check_peer(run)


def check_peer(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["actions_dtype"] == "float32" and seen["actions_shape"] == [seen["chunk_length"], seen["action_dim"]]
    assert {"cameras", "action_horizon", "session_id", "model"} <= set(seen["metadata_keys"])
    assert {"infer_ms", "prev_total_ms"} <= set(seen["server_timing"]) and seen["reset_step"] == 0
    assert seen["broker_rows"] == seen["action_horizon"] + 1 and seen["http_session"] == "openpi-http"
    np.testing.assert_allclose(seen["http_actions"], seen["ws_actions"], atol=1e-6)


def test_real_openpi_client_reports_a_refused_connection_with_the_server_s_reason(openpi_python, tiny_checkpoints,
                                                                                  tmp_path):
    """A connection the server refuses (here an unknown deployment) is refused before the upgrade, with the error
    as the HTTP reply: openpi-client raises that, status and body (before, the refusal came as a text frame after
    accepting, and the client, unpacking its first frame as msgpack, raised a bare TypeError)."""
    script = """
import sys
from openpi_client.websocket_client_policy import WebsocketClientPolicy
try:
    WebsocketClientPolicy(host=sys.argv[1])
except Exception as e:
    response = getattr(e, "response", None)
    print(type(e).__name__, getattr(response, "status_code", None), (getattr(response, "body", b"") or b"").decode())
"""
    with live_server(["--checkpoint", f"{tiny_checkpoints['diffusion_policy']}=policy"], tmp_path / "demo") as base:
        url = base.replace("http://", "ws://") + "/ws/diffusion_policy?model=nope"
        out = subprocess.run([openpi_python, "-c", script, url], capture_output=True, text=True, timeout=120)
        # Its default path, the server's root (given no path): a bare 403 before; now 404 naming the endpoint
        root = subprocess.run([openpi_python, "-c", script, base.replace("http://", "ws://")], capture_output=True,
                              text=True, timeout=120)
    assert "TypeError" not in out.stdout + out.stderr and out.stdout.startswith("InvalidStatus 404 "), out
    assert json.loads(out.stdout.split(" ", 2)[2])["error"]["field"] == "model"
    assert root.stdout.startswith("InvalidStatus 404 "), root
    assert "/ws/diffusion_policy" in json.loads(root.stdout.split(" ", 2)[2])["error"]["message"]
