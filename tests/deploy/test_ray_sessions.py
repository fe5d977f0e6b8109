"""Robot sessions on Ray Serve with a shared store (``VLA_SESSION_STORE``): two replicas of the policy behind Serve's
proxy, which routes without regard to sessions; eight robots in step mode; one replica killed mid-episode (Serve
starts another). Every robot's steps continue with its history: the actions of the same seeded episode on one
process. A cluster of its own (``tests/deploy/test_ray_serve.py``'s), on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.deploy.test_ray_serve import cluster, deploy  # noqa: F401  (cluster: the module's own Ray cluster)
from tests.service.conftest import serving
from tests.service.test_sessions import current
from tests.service.test_shared_sessions import redis_url  # noqa: F401  (a fixture: a Redis of this module's)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (make test installs it from Debian)")]

ROBOTS, STEPS, KILL_AFTER = range(8), 10, 4


def step(client: httpx.Client, session_id: str, k: int, attempts: int = 60) -> httpx.Response:
    """Step ``k``, sent again while the replica it reached is gone (Serve still routing to a killed one): a step
    that did not answer 200 was not kept."""
    for _ in range(attempts):
        reply = client.post(f"/sessions/{session_id}/step", json={"observation": current(k), "step": k})
        if reply.status_code == 200:
            return reply
        assert reply.status_code >= 500, reply.text  # a replica that is gone, never a refusal of the step
        time.sleep(0.5)
    raise AssertionError(f"step {k} of {session_id} never answered: {reply.status_code} {reply.text[:300]}")


def seeded(client, session_id: str, seed: int) -> None:
    step(client, session_id, 0)
    reply = client.post(f"/sessions/{session_id}/reset", json={"seed": seed})
    assert reply.status_code == 200, reply.text


def test_robots_keep_their_history_when_a_replica_dies(redis_url, cluster, tiny_checkpoints, tmp_path):  # noqa: F811
    """(Redis starts before the cluster, so the cluster does not count it as one of its processes.)"""
    import ray

    policy = {"name": "policy", "checkpoint": str(tiny_checkpoints["diffusion_policy"]), "open_loop_steps": 2}
    base = deploy(cluster, tmp_path, [policy], {"VLA_SESSION_STORE": redis_url, "VLA_MAX_BATCH_SIZE": "1"},
                  gpus_per_replica=1)  # a replica per (named) GPU of the cluster
    replicas: dict[int, set] = {}
    got: dict[int, list] = {i: [] for i in ROBOTS}
    victim_id = None
    with httpx.Client(base_url=base, timeout=60) as client:
        where = client.get("/models")  # every replica, with the GPU Ray gave it
        assert where.json()["replica"]["id"] == where.headers["x-serve-replica"]
        assert sorted((r["launcher"], r["gpus"]) for r in where.json()["replicas"]) == [("ray", "0"), ("ray", "1")]
        for i in ROBOTS:
            seeded(client, f"robot-{i}", 100 + i)
        for k in range(STEPS):
            if k == KILL_AFTER:  # a replica dies between two steps: no drain, no goodbye
                (victim,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                             if "SERVE_REPLICA" in a["name"]][:1]
                ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
                victim_id = victim["name"].rsplit("#", 1)[-1]  # SERVE_REPLICA::app#deployment#<replica id>
            for i in ROBOTS:
                reply = step(client, f"robot-{i}", k)
                replicas.setdefault(k, set()).add(reply.headers.get("x-serve-replica"))
                got[i].append(reply.json())
    # `serve run service.ray_serve:app num_replicas=per-gpu` builds before it connects: the builder connects to
    # RAY_ADDRESS itself and counts two replicas on each of the cluster's two GPUs.
    built = subprocess.run([sys.executable, "-c", "from service.ray_serve import app; print(app({'num_replicas': "
                            "'per-gpu', 'num_gpus': '0.5'})._bound_deployment.num_replicas)"],
                           env={**os.environ, "RAY_ADDRESS": cluster.gcs_address}, capture_output=True, text=True,
                           timeout=120)
    assert built.stdout.strip().splitlines()[-1:] == ["4"], built.stderr[-3000:]
    before = set().union(*(replicas[k] for k in range(KILL_AFTER)))
    after = set().union(*(replicas[k] for k in range(KILL_AFTER, STEPS)))
    assert len(before) == 2 and victim_id in before  # both replicas took robots' steps, the killed one too
    assert victim_id not in after  # and after the kill, the others took every step of every robot
    spec_fields = {key: value for key, value in policy.items() if key != "checkpoint"}
    from service import DeploymentSpec

    with serving(DeploymentSpec(checkpoint=policy["checkpoint"], **spec_fields)) as alone:  # one process, no store
        for i in ROBOTS:
            seeded(alone, f"robot-{i}", 100 + i)
            for k, mine in enumerate(got[i]):
                expected = alone.post(f"/sessions/robot-{i}/step", json={"observation": current(k), "step": k}).json()
                assert (mine["step"], mine["replanned"], mine["plan_step"]) == \
                    (expected["step"], expected["replanned"], expected["plan_step"]), (i, k)
                np.testing.assert_allclose(mine["action"], expected["action"], atol=1e-5, err_msg=f"{i} {k}")
    cluster.stop()
    assert not cluster.left_behind, f"processes left after shutdown (killed now): {cluster.left_behind}"
