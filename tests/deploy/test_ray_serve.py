"""Scale-out on Ray Serve: two CPU replicas of the app on a Ray cluster this module starts and stops.

The cluster runs on 127.0.0.1 only (Ray's node IP forced to loopback, no dashboard, the Serve
proxy on a free loopback port) with a token that lives in the environment (nothing written to
~/.ray). The application is deployed the documented way: ``serve run`` on a copy of
``deploy/ray/serve_config.yaml`` with two fixed CPU replicas. The last test stops the cluster
and checks that every process it started is gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import msgpack
import pytest
import yaml

from tests.factories import build_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "deploy" / "ray" / "serve_config.yaml"
REPLICAS = 2
DEPLOY_TIMEOUT_S = 120


# ---------------------------------------------------------------- processes and sockets, from /proc


def _stat(pid: int):
    """(state, ppid, start time) of ``pid``, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> dict[int, int]:
    """Every live process below ``root``: pid → start time (to tell a reused pid apart)."""
    table = {pid: s for pid in _all_pids() if (s := _stat(pid)) is not None}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (state, ppid, start) in table.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = start
                frontier.append(pid)
    return found


def alive(pid: int, start: int) -> bool:
    s = _stat(pid)
    return s is not None and s[2] == start and s[0] != "Z"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening(pids) -> list[tuple[int, str, str, int]]:
    """(pid, process, ip, port) of every TCP socket in LISTEN held by ``pids``."""
    listeners = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # LISTEN
                address, port = cols[1].split(":")
                listeners[cols[9]] = (_hex_ip(address), int(port, 16))
    found = []
    for pid in pids:
        for inode in _socket_inodes(pid) & listeners.keys():
            found.append((pid, _cmdline(pid)[:60], *listeners[inode]))
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the cluster


class LocalCluster:
    """A one-node Ray cluster on loopback, owned by this test module."""

    def __init__(self, ray, temp_dir: Path):
        self.ray, self.temp_dir = ray, temp_dir
        self.processes: dict[int, int] = {}  # pid → start time of everything the cluster started
        self.left_behind: list[str] = []
        self.stopped = False
        self._before = descendants(os.getpid())
        # GPUs in name only (this host has none): a replica given one sees CUDA_VISIBLE_DEVICES and runs on the CPU.
        context = ray.init(address="local", num_cpus=REPLICAS, num_gpus=REPLICAS, include_dashboard=False,
                           _node_ip_address="127.0.0.1", _temp_dir=str(temp_dir), object_store_memory=80 << 20,
                           log_to_driver=False, configure_logging=False)
        self.gcs_address = context.address_info["gcs_address"]
        self.node_ip = context.address_info["node_ip_address"]

    def record_processes(self) -> None:
        now = descendants(os.getpid())
        self.processes.update({pid: start for pid, start in now.items() if self._before.get(pid) != start})

    def stop(self) -> None:
        """Serve, then Ray; every recorded process must be gone (stragglers are killed and reported)."""
        if self.stopped:
            return
        self.stopped = True
        self.record_processes()
        from ray import serve

        try:
            serve.shutdown()
        finally:
            self.ray.shutdown()
        deadline = time.monotonic() + 30
        while any(alive(p, s) for p, s in self.processes.items()) and time.monotonic() < deadline:
            time.sleep(0.2)
        marker = str(self.temp_dir)
        strays = {p: s for p, s in self.processes.items() if alive(p, s)}
        strays.update({pid: s[2] for pid in _all_pids() if marker in _cmdline(pid) and (s := _stat(pid))
                       and s[0] != "Z"})
        for pid, start in strays.items():
            self.left_behind.append(f"{pid}: {_cmdline(pid)[:120]}")
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """Starts the cluster with the environment that keeps it on loopback; restores the environment after."""
    env = {
        # Ray resolves a node IP of 127.0.0.1 to the host's routable address unless this is off: with it, the
        # GCS, raylet, object manager, agents and workers bind 127.0.0.1.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # in the environment: no ~/.ray/auth_token written
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    saved, saved_flag = {k: os.environ.get(k) for k in env}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)  # the cluster's processes inherit it
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported ray
    # A short root: Ray's unix socket paths must stay under 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="vla-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    local = None
    try:
        _reload_ray_auth_config()  # Ray caches RAY_AUTH_MODE and the token when first used in this process
        local = LocalCluster(ray, temp_dir)
        yield local
    finally:
        if local is not None:
            local.stop()
        else:
            ray.shutdown()  # whatever a failed start left
        shutil.rmtree(temp_dir, ignore_errors=True)
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_ray_auth_config()


def _reload_ray_auth_config() -> None:
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def deploy(cluster: LocalCluster, root: Path, deployments: list[dict], env: Optional[dict[str, str]] = None,
           gpus_per_replica: float = 0) -> str:
    """The example Serve config, made CPU-sized (``REPLICAS`` replicas, ``env`` added to its ``VLA_*`` variables),
    serving ``deployments`` (a deployment YAML's entries), deployed with `serve run`; the proxy's base URL."""
    from ray import serve

    deploy_yaml = root / "deploy.yaml"
    deploy_yaml.write_text(yaml.safe_dump({"device": "auto", "deployments": deployments}))
    port = free_port()
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    application = config["applications"][0]
    application["args"] = {"config": str(deploy_yaml)}
    application["runtime_env"]["env_vars"].update(env or {})
    deployment = application["deployments"][0]
    for key in ("autoscaling_config", "max_ongoing_requests"):
        deployment.pop(key, None)
    deployment.update(num_replicas=REPLICAS, ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 0.5},
                      graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5)
    serve_config = root / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(config))

    script = Path(sys.executable).parent / "serve"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ray.serve.scripts"]
    result = subprocess.run([*command, "run", "--non-blocking", "--address", cluster.gcs_address, str(serve_config)],
                            capture_output=True, text=True, timeout=DEPLOY_TIMEOUT_S, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    name = application["name"]
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            break
        assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        assert time.monotonic() < deadline, f"the application did not start: {status}"
        time.sleep(0.25)
    cluster.record_processes()
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory, tiny_tokenizer):
    """A tiny transformer on two replicas; yields the proxy's base URL."""
    root = tmp_path_factory.mktemp("ray-serve")
    checkpoint = build_checkpoint("transformer", root / "tiny-transformer", tokenizer=tiny_tokenizer)
    yield deploy(cluster, root, [{"name": "tiny", "checkpoint": str(checkpoint)}])


def replicas_answering(client: httpx.Client, request, attempts: int = 60) -> dict[str, httpx.Response]:
    """One response per replica that answered, sending ``request`` until every replica has (or ``attempts``)."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(attempts):
        response = request(client)
        assert response.status_code == 200, response.text
        seen.setdefault(response.headers["x-serve-replica"], response)
        if len(seen) == REPLICAS:
            break
    return seen


# ---------------------------------------------------------------- the tests


def test_builder_arguments_from_the_command_line():
    """`serve run service.ray_serve:app key=value`: strings become the deployment's options; mistakes are named."""
    pytest.importorskip("ray")
    from service.ray_serve import DEPLOYMENT_NAME, app

    fixed = app({"num_replicas": "2", "num_gpus": "0", "num_cpus": "0.5"})._bound_deployment
    assert fixed.name == DEPLOYMENT_NAME and fixed.num_replicas == 2
    assert fixed.ray_actor_options == {"num_gpus": 0, "num_cpus": 0.5}
    scaled = app({"min_replicas": "1", "max_replicas": "3", "num_gpus": "1"})._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 2)
    with pytest.raises(ValueError, match="num_replicas=auto"):
        app({"num_replicas": 2, "max_replicas": 4})
    with pytest.raises(ValueError, match="Allowed keys: config"):
        app({"replicas": 2})
    with pytest.raises(ValueError, match="would give no replica a GPU"):
        app({"num_replicas": "per-gpu", "num_gpus": "0"})
    with pytest.raises(ValueError, match="num_replicas=per-gpu"):
        app({"num_replicas": "per-gpu", "max_replicas": 4})


def test_builder_refuses_cuda_without_gpus(tmp_path, tiny_tokenizer):
    pytest.importorskip("ray")
    from service.ray_serve import app

    deploy_yaml = tmp_path / "deploy.yaml"
    deploy_yaml.write_text("device: cuda\ndeployments: [{checkpoint: /nowhere}]\n")
    with pytest.raises(ValueError, match="replicas get no GPU"):
        app({"config": str(deploy_yaml), "num_gpus": 0})


def test_replica_app_starts_only_once_loaded(tmp_path, tiny_tokenizer):
    """What a replica runs, without a cluster: start-up waits for the loads; health follows readiness."""
    pytest.importorskip("ray")
    from fastapi.testclient import TestClient

    from service.ray_serve import check_health, replica_app
    from service.settings import DeploymentSpec, Settings

    checkpoint = build_checkpoint("transformer", tmp_path / "tiny", tokenizer=tiny_tokenizer)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config_model.yaml").write_text("type: transformer\n")  # no weights: fails to load
    settings = Settings.load(deployments=[DeploymentSpec(name="tiny", checkpoint=str(checkpoint)),
                                          DeploymentSpec(name="broken", checkpoint=str(broken))], shed_pacing_s=0)
    fastapi_app = replica_app(settings, num_gpus=0)
    with pytest.raises(RuntimeError, match="still loading: tiny, broken"):
        check_health(fastapi_app)
    with TestClient(fastapi_app) as client:  # entering runs the lifespan's start-up
        assert fastapi_app.state.manager.readiness()[1]["deployments"] == {"tiny": "ready", "broken": "failed"}
        check_health(fastapi_app)  # a failed deployment is reported, not a reason to restart the replica
        response = client.get("/models/tiny")
        assert response.json()["device"] == "cpu" and response.headers["x-serve-replica"] == "unknown"
        # a refusal at the front door (ahead of FastAPI's middleware) says which replica refused too
        tiny = fastapi_app.state.manager.get("tiny")
        tiny.executor.expected_wait_s = lambda batchable=True, own_pending=None: 2.4
        refused = client.post("/predict/transformer", json={"prompt": "hi"}, headers={"X-Request-Timeout": "1"})
        assert refused.status_code == 503 and refused.headers["x-serve-replica"] == "unknown", refused.text


def test_two_replicas_answer_models_and_predict(served):
    with httpx.Client(base_url=served, timeout=30) as client:
        models = replicas_answering(client, lambda c: c.get("/models"))
        assert len(models) == REPLICAS, f"only replicas {sorted(models)} answered /models"
        for response in models.values():  # each replica took traffic only once its checkpoint had loaded
            (deployment,) = response.json()["deployments"]
            assert deployment["name"] == "tiny" and deployment["status"] == "ready", deployment
            assert deployment["device"] == "cpu"
        body = {"prompt": ["the quick brown", "a robot"], "max_new_tokens": 4, "temperature": 0, "seed": 1}
        predictions = replicas_answering(client, lambda c: c.post("/predict/transformer", json=body))
        assert len(predictions) == REPLICAS, f"only replicas {sorted(predictions)} answered /predict/transformer"
        completions = [r.json()["completions"] for r in predictions.values()]
        assert all(len(c) == 2 and len(c[0]["token_ids"]) == 4 for c in completions)
        assert completions[0] == completions[1]  # the same weights and a greedy decode on either replica
        assert client.get("/health/ready").json()["status"] == "ready"


def test_msgpack_and_websocket_through_the_proxy(served):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    body = msgpack.packb({"prompt_token_ids": [[1, 2, 3]], "max_new_tokens": 2, "temperature": 0})
    response = httpx.post(served + "/predict/transformer", content=body, timeout=30,
                          headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/msgpack")
    assert len(msgpack.unpackb(response.content)["completions"][0]["token_ids"]) == 2
    # No policy is deployed: the robot websocket's upgrade is refused, through the proxy too, with the error as the
    # HTTP reply (404 in the error shape, naming the type).
    with pytest.raises(InvalidStatus) as refused:
        connect(served.replace("http://", "ws://") + "/ws/diffusion_policy", open_timeout=30)
    assert refused.value.response.status_code == 404
    assert "diffusion_policy" in json.loads(refused.value.response.body)["error"]["message"]


def test_only_loopback_listens(cluster, served):
    cluster.record_processes()
    assert cluster.node_ip == "127.0.0.1"
    sockets = listening([os.getpid(), *cluster.processes])  # this process is a Ray driver too
    assert any(port == int(served.rsplit(":", 1)[1]) for *_, port in sockets), sockets  # the Serve proxy
    exposed = [s for s in sockets if not is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_stopping_the_cluster_leaves_no_process(cluster, served):
    assert len(cluster.processes) >= 5  # gcs_server, raylet, the Serve controller, proxy and two replicas
    cluster.stop()
    assert not cluster.left_behind, f"processes left after shutdown (killed now): {cluster.left_behind}"
