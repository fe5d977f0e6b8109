"""``VLA_MODEL_PROCESS``: a policy's model calls in a child process (``service/model_process.py``).

The child must give every request exactly what the in-thread deployment gives it (the fixture's actions,
seeds, batches, sessions, evaluations, refusals with their field), and its life must follow the server's:
it starts with the deployment, ends with it, and a child that dies is restarted with the same weights (a bounded
number of times, then its deployment fails out loud).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service import DeploymentSpec
from service.model_process import ModelProcess, ModelProcessExited
from tests.factories import EVALUATE_REQUESTS, PREDICT_REQUESTS, policy_observation
from tests.service.conftest import serving
from tests.service.live_server import live_server_process
from tests.service.test_contract import members
from tests.service.test_action_api import FIXTURE, fixture_requests
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.interfaces import ActionServing


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(
            f"/proc/{pid}").exists() else "X"
        if state == "Z":  # exited, not yet reaped by its parent
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    checkpoint = str(tiny_checkpoints["diffusion_policy"])
    specs = [DeploymentSpec(name="in-thread", checkpoint=checkpoint, model_process=False),
             DeploymentSpec(name="in-process", checkpoint=checkpoint, model_process=True)]
    with serving(*specs, max_batch_size=8) as c:
        yield c


def predict(client, body: dict, model: str) -> httpx.Response:
    return client.post("/predict/diffusion_policy", json={**body, "model": model})


def test_models_names_the_child_and_it_is_the_servers_child(client):
    info = client.get("/models/in-process").json()
    assert info["status"] == "ready" and info["model_process"]["alive"] is True
    pid = info["model_process"]["pid"]
    assert pid != os.getpid() and parent_of(pid) == os.getpid()
    assert client.get("/models/in-thread").json()["model_process"] is None
    assert info["io"] == client.get("/models/in-thread").json()["io"]  # (the child's io, its graphs included)


def test_same_request_same_chunk_as_the_in_thread_deployment(client):
    body = PREDICT_REQUESTS["diffusion_policy"]
    here, there = predict(client, body, "in-thread"), predict(client, body, "in-process")
    assert here.status_code == there.status_code == 200, there.text
    a, b = here.json(), there.json()
    assert a["action_chunk"] == b["action_chunk"] and a["actions"] == b["actions"] and a["seed"] == b["seed"] == 1
    assert b["checkpoint_step"] == a["checkpoint_step"] and b["timing_ms"]["batch_size"] == 1


def test_concurrent_robots_share_calls_in_the_child_and_each_gets_its_own_chunk(client):
    bodies = [{"observation": policy_observation(seed=i % 5), "seed": 300 + i, "num_inference_steps": 3}
              for i in range(24)]
    bodies[7] = {**bodies[7], "noise": [[0.0] * 3] * 2}  # refused on the model thread, before the child: alone
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda b: predict(client, b, "in-process"), bodies))
    alone = [predict(client, b, "in-thread") for b in bodies]
    assert [r.status_code for r in together] == [r.status_code for r in alone]
    assert together[7].status_code == 422 and together[7].json()["error"]["field"] == "noise"
    sizes = [r.json()["timing_ms"]["batch_size"] for i, r in enumerate(together) if i != 7]
    assert max(sizes) > 1, sizes
    for i, (mine, solo) in enumerate(zip(together, alone)):
        if i != 7:
            np.testing.assert_allclose(mine.json()["action_chunk"], solo.json()["action_chunk"], atol=1e-5)


def test_a_refusal_made_in_the_child_keeps_its_field(client):
    """Noise near float32's largest value passes the checks, then overflows inside the model: the child's
    InvalidInputError crosses the pipe with its field and fails that request alone (422)."""
    body = {**PREDICT_REQUESTS["diffusion_policy"], "noise": [[3e38] * 3] * 4}
    here, there = predict(client, body, "in-thread"), predict(client, body, "in-process")
    assert there.status_code == here.status_code == 422, there.text
    assert there.json()["error"]["field"] == here.json()["error"]["field"] == "observation"
    assert predict(client, PREDICT_REQUESTS["diffusion_policy"], "in-process").status_code == 200


def test_sessions_and_evaluations_run_in_the_child_as_in_the_thread(client):
    def episode(model: str) -> list[list]:
        chunks = []
        for step in range(3):
            observation = policy_observation(seed=step)
            observation["images"] = {cam: frames[-1] for cam, frames in observation["images"].items()}
            observation["lowdim"] = {"arm__pos": [0.1 * step, 0.2]}
            reply = predict(client, {"session_id": f"robot-{model}", "observation": observation, "seed": 9,
                                     "num_inference_steps": 3}, model)
            assert reply.status_code == 200, reply.text
            chunks.append(reply.json()["action_chunk"])
        return chunks

    assert episode("in-process") == episode("in-thread")
    evaluate = {**EVALUATE_REQUESTS["diffusion_policy"]}
    here = client.post("/evaluate/diffusion_policy", json={**evaluate, "model": "in-thread"})
    there = client.post("/evaluate/diffusion_policy", json={**evaluate, "model": "in-process"})
    assert here.status_code == there.status_code == 200, there.text
    assert here.json()["loss"] == there.json()["loss"] and here.json()["timesteps"] == there.json()["timesteps"]


def test_a_restarting_deployment_does_not_take_readiness_from_the_others(client):
    """A killed child is restarted while the server's other deployment keeps it ready; the restarted one answers
    as before."""
    child = client.get("/models/in-process").json()["model_process"]["pid"]
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while client.get("/models/in-process").json()["status"] == "ready" and time.monotonic() < deadline:
        time.sleep(0.01)
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["deployments"] == {"in-thread": "ready", "in-process": "loading"}
    assert predict(client, PREDICT_REQUESTS["diffusion_policy"], "in-process").status_code == 503
    deadline = time.monotonic() + 120
    while client.get("/models/in-process").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    info = client.get("/models/in-process").json()
    assert info["status"] == "ready" and info["model_process"]["restarts"] == 1
    assert info["model_process"]["pid"] != child
    body = PREDICT_REQUESTS["diffusion_policy"]
    here, there = predict(client, body, "in-thread"), predict(client, body, "in-process")
    assert there.status_code == 200 and there.json()["action_chunk"] == here.json()["action_chunk"]


def test_a_child_that_fails_to_load_raises_its_own_error(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  type: diffusion_policy\n")
    with pytest.raises(Exception) as caught:
        ModelProcess.start(None, {"path": tmp_path}, name="broken")
    assert not isinstance(caught.value, ModelProcessExited), caught.value  # the child's reason, not a bare exit
    assert str(caught.value)


def children() -> set[int]:
    """This process's child processes that are alive (exited ones not yet reaped count as gone)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def test_a_child_that_does_not_load_in_time_is_stopped(tiny_checkpoints):
    before = children()
    with pytest.raises(ModelProcessExited, match="did not load within 0.01 s"):
        ModelProcess.start(None, {"path": tiny_checkpoints["diffusion_policy"]}, name="slow", start_timeout_s=0.01)
    assert children() == before  # (killed and reaped)


def test_the_child_loads_the_servers_weights_file_and_a_restart_loads_it_again(tiny_checkpoints, tmp_path):
    """The child loads the file the server's copy loaded, even when a newer checkpoint lands before it starts (or
    before a restart); a killed child is reported once, and ``restart`` serves the same chunks from a new one."""
    import shutil
    import threading

    import torch

    from vla_foundry.pipelines.action import PolicyRequest
    from vla_foundry.robotics.observations import RawObservation

    experiment = tmp_path / "policy"
    shutil.copytree(tiny_checkpoints["diffusion_policy"], experiment)
    local = load_pipeline(experiment)
    payload = torch.load(experiment / "checkpoints" / "checkpoint_1.pt", weights_only=True)
    torch.save({**payload, "checkpoint_num": 2, "global_step": 222}, experiment / "checkpoints" / "checkpoint_2.pt")
    exits: list[str] = []
    exited = threading.Event()
    process = ModelProcess.start(local, {"path": experiment}, name="pinned",
                                 on_exit=lambda message: (exits.append(message), exited.set()))
    r = local.robot_io
    sample = RawObservation({n: np.zeros((8, 8, 3), np.uint8) for n in r.image_names},
                            {f: np.zeros((r.past_steps + 1, r.field_dims[f]), np.float32)
                             for f in r.proprioception_fields}, "pick")
    try:
        (before,) = process.predict_each([PolicyRequest(sample, seed=5)])
        assert before.checkpoint_step == local.checkpoint_step != 222
        assert process.cuda_memory_allocated is None  # (no CUDA here: nothing to report)
        first = process.pid
        os.kill(first, signal.SIGKILL)
        assert exited.wait(10) and len(exits) == 1 and "killed by signal 9" in exits[0] and not process.alive
        with pytest.raises(ModelProcessExited, match="killed by signal 9") as gone:
            process.predict_each([PolicyRequest(sample, seed=5)])
        # (a 503 with Retry-After, as while it restarts: before, the calls it held got 503 with none)
        assert gone.value.status == 503 and gone.value.retry_after == 5
        process.restart()
        with pytest.raises(ModelProcessExited, match="restarting"):  # (calls queued before the death: not yet)
            process.predict_each([PolicyRequest(sample, seed=5)])
        process.serving()
        (after,) = process.predict_each([PolicyRequest(sample, seed=5)])
        assert process.alive and process.pid != first and wait_gone(first) and exits == [exits[0]]
        assert after.checkpoint_step == before.checkpoint_step
        np.testing.assert_array_equal(after.action_chunk, before.action_chunk)
    finally:
        process.close()


def test_the_child_logs_in_the_servers_format_naming_its_deployment(tiny_checkpoints, capfd):
    import json

    checkpoint = tiny_checkpoints["diffusion_policy"]
    process = ModelProcess.start(load_pipeline(checkpoint), {"path": checkpoint}, name="logged", log_format="json")
    try:
        with pytest.raises(RuntimeError, match="unknown model process operation"):  # (crossed as a RuntimeError)
            process._call("no_such_operation")
    finally:
        process.close()
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    failed = [line for line in lines if "no_such_operation" in line["message"]]
    assert failed and failed[0]["level"] == "ERROR" and failed[0]["deployment"] == "logged", lines
    assert failed[0]["model_process"] != os.getpid() and "Traceback" in failed[0]["exception"]
    assert failed[0]["logger"] == "service.model_process"


def test_closing_ends_the_child_and_a_closed_one_refuses(tiny_checkpoints):
    checkpoint = tiny_checkpoints["diffusion_policy"]
    process = ModelProcess.start(load_pipeline(checkpoint), {"path": checkpoint}, name="closing")
    pid = process.pid
    assert process.alive and parent_of(pid) == os.getpid()
    for name in members(ActionServing):  # it serves as a policy: every member a policy's interface declares
        assert getattr(process, name) is not None, name
    with pytest.raises(AttributeError, match="child process"):  # never the server's copy's model
        assert process.predict is None
    process.close()
    assert wait_gone(pid) and not process.alive
    with pytest.raises(ModelProcessExited):
        process.predict_each([])


def test_fixture_actions_from_a_model_process_on_a_live_server_and_a_killed_child_is_restarted_then_fails(tmp_path):
    """The acceptance path through the real CLI with the production sampling (traced graphs): the fixture's
    observation gives the fixture's actions from the child. The child is killed: the deployment refuses requests
    (503 with Retry-After, readiness 503) while a new child loads, then serves the fixture's actions again from
    it. Killed again, past VLA_MODEL_PROCESS_RESTARTS, the deployment fails (503 naming it, /models says the
    signal and the limit), and SIGTERM still ends the server with 0."""
    env = {"VLA_MODEL_PROCESS": "true", "VLA_TRACED_SAMPLING": "true", "VLA_MAX_BATCH_SIZE": "2",
           "VLA_MODEL_PROCESS_RESTARTS": "1"}
    serve = ["--checkpoint", f"{FIXTURE}=fixture-policy"]

    def fixture_actions(client: httpx.Client) -> None:
        for body, expected in fixture_requests():
            response = client.post("/predict/diffusion_policy", json=body)
            assert response.status_code == 200, response.text
            for field, values in expected.items():
                np.testing.assert_allclose(np.array(response.json()["actions"][field]), values, atol=1e-5)

    def killed(client: httpx.Client, child: int) -> dict:
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while client.get("/models/fixture-policy").json()["status"] == "ready" and time.monotonic() < deadline:
            time.sleep(0.01)
        return client.get("/models/fixture-policy").json()

    with live_server_process(serve, tmp_path / "demo", env=env) as (base, server):
        with httpx.Client(base_url=base, timeout=60) as client:
            info = client.get("/models/fixture-policy").json()
            assert info["io"]["sampling_graphs"] == "traced"
            child = info["model_process"]["pid"]
            assert parent_of(child) == server.pid and info["model_process"]["restarts"] == 0
            fixture_actions(client)

            info = killed(client, child)
            assert info["status"] == "loading" and "restarting the model process" in info["stage"], info
            refused = client.post("/predict/diffusion_policy", json=fixture_requests()[0][0])
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5", refused.text
            assert "restarting its model process" in refused.json()["error"]["message"]
            assert "killed by signal 9" in refused.json()["error"]["message"]
            assert client.get("/health/ready").status_code == 503  # (its only deployment)
            deadline = time.monotonic() + 120
            while client.get("/models/fixture-policy").json()["status"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.05)
            info = client.get("/models/fixture-policy").json()
            assert info["status"] == "ready" and info["model_process"]["restarts"] == 1, info
            assert "killed by signal 9" in info["model_process"]["last_exit"]
            restarted = info["model_process"]["pid"]
            assert restarted != child and parent_of(restarted) == server.pid and wait_gone(child)
            assert info["io"]["sampling_graphs"] == "traced" and client.get("/health/ready").status_code == 200
            fixture_actions(client)
            metrics = client.get("/metrics").text
            assert 'vla_model_process_restarts_total{deployment="fixture-policy"} 1.0' in metrics

            info = killed(client, restarted)  # a second death within 10 minutes: past the one restart allowed
            assert info["status"] == "failed" and "killed by signal 9" in info["error"], info
            assert "VLA_MODEL_PROCESS_RESTARTS" in info["error"] and info["model_process"]["alive"] is False
            assert client.get("/health/ready").status_code == 503
            refused = client.post("/predict/diffusion_policy", json=fixture_requests()[0][0])
            assert refused.status_code == 503 and "stopped serving" in refused.json()["error"]["message"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def test_the_child_ends_with_the_server(tiny_checkpoints, tmp_path):
    """A server killed outright (no drain, no close) leaves no model process behind: the child sees its pipe
    close and exits."""
    env = {"VLA_MODEL_PROCESS": "true"}
    checkpoint = tiny_checkpoints["diffusion_policy"]
    with live_server_process(["--checkpoint", f"{checkpoint}=policy"], tmp_path / "demo", env=env) as (base, server):
        child = httpx.get(base + "/models/policy").json()["model_process"]["pid"]
        server.kill()
        server.wait()
        assert wait_gone(child), subprocess.run(["ps", "-o", "pid,ppid,stat,cmd", "-p", str(child)],
                                                capture_output=True, text=True).stdout


def test_a_reload_under_load_swaps_the_child_and_fails_no_request(tiny_checkpoints, tmp_path):
    """Live model control with model processes: the new checkpoint's child loads beside the serving one, takes
    over with no failed request, and the old child ends."""
    import shutil
    import threading

    import torch

    old, new = tmp_path / "policy-a", tmp_path / "policy-b"
    shutil.copytree(tiny_checkpoints["diffusion_policy"], old)
    shutil.copytree(old, new)
    payload = torch.load(new / "checkpoints" / "checkpoint_1.pt", weights_only=True)
    torch.save({**payload, "checkpoint_num": 2, "global_step": 222}, new / "checkpoints" / "checkpoint_2.pt")
    admin = {"Authorization": "Bearer admin-key"}
    body = {**PREDICT_REQUESTS["diffusion_policy"], "model": "policy"}
    with serving(DeploymentSpec(name="policy", checkpoint=str(old)), model_process=True, admin_keys="admin-key",
                 checkpoint_roots=str(tmp_path)) as client:
        first_child = client.get("/models/policy").json()["model_process"]["pid"]
        steps, failures, stop = [], [], threading.Event()

        def robot() -> None:
            while not stop.is_set():
                reply = client.post("/predict/diffusion_policy", json=body)
                (steps.append(reply.json()["checkpoint_step"]) if reply.status_code == 200
                 else failures.append(reply.text))

        robots = [threading.Thread(target=robot) for _ in range(3)]
        for thread in robots:
            thread.start()
        try:
            reloaded = client.post("/admin/deployments/policy/reload", json={"checkpoint": str(new)}, headers=admin)
            assert reloaded.status_code == 200, reloaded.text
            seen, deadline = len(steps), time.monotonic() + 60
            while len(steps) < seen + 6 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            for thread in robots:
                thread.join()
        info = client.get("/models/policy").json()
        assert failures == [] and steps[-1] == 222 and info["checkpoint"]["step"] == 222
        assert info["model_process"]["alive"] and info["model_process"]["pid"] != first_child
        assert wait_gone(first_child)


@pytest.mark.parametrize("shared_memory", [True, False], ids=["arena", "socket"])
def test_the_channel_carries_frames_and_a_message_that_cannot_be_encoded_sends_nothing(shared_memory):
    import socket
    import threading

    from service.model_process import Arena, Channel
    from vla_foundry.errors import InvalidInputError
    from vla_foundry.pipelines.action import PolicyRequest
    from vla_foundry.robotics.observations import RawObservation

    ours, theirs = socket.socketpair()
    arena = Arena.create() if shared_memory else None
    sender = Channel(ours, send_arena=arena)
    receiver = Channel(theirs, receive_arena=Arena(os.dup(arena.fd)) if arena is not None else None)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)  # over the in-band size: out of band
    message = {"frames": [big, big[1]], "small": np.arange(5, dtype=np.float32), "strided": big[:, ::2, ::3],
               "error": InvalidInputError("bad", field="observation.images.front"), "text": "pick",
               "request": PolicyRequest(RawObservation({"front": big[0]}, {"arm": np.zeros((2, 2), np.float32)},
                                                       "pick"), seed=3), "other": KeyError("x")}
    with pytest.raises(TypeError):  # (only arrays, the policy's dataclasses and errors cross besides msgpack's own)
        sender.send({"not encodable": lambda: None})
    thread = threading.Thread(target=sender.send, args=(message,))
    thread.start()
    assert receiver.poll(5.0)
    got = receiver.recv()
    thread.join()
    assert np.array_equal(got["frames"][0], big) and np.array_equal(got["frames"][1], big[1])
    assert np.array_equal(got["strided"], big[:, ::2, ::3]) and got["small"].dtype == np.float32
    assert got["error"].field == "observation.images.front" and got["text"] == "pick"
    request = got["request"]  # the policy's dataclasses come back as themselves; other errors as RuntimeError
    assert isinstance(request, PolicyRequest) and isinstance(request.sample, RawObservation) and request.seed == 3
    assert np.array_equal(request.sample.images["front"], big[0]) and request.sample.lowdim["arm"].shape == (2, 2)
    assert type(got["other"]) is RuntimeError and "KeyError" in str(got["other"])
    before = int(big[0, 0, 0, 0])
    got["frames"][0][0, 0, 0, 0] = (before + 1) % 256  # its own, writable buffer, not a view of the sender's frame
    assert big[0, 0, 0, 0] == before
    assert not receiver.poll(0.05)  # nothing left over: the failed send wrote nothing
    if shared_memory:  # a larger message grows the arena; the receiver maps the new size, old views stay valid
        bigger = {"frames": [rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)]}
        thread = threading.Thread(target=sender.send, args=(bigger,))
        thread.start()
        again = receiver.recv()
        thread.join()
        assert np.array_equal(again["frames"][0], bigger["frames"][0]) and arena.size >= bigger["frames"][0].nbytes
    sender.close()
    with pytest.raises(EOFError):
        receiver.recv()
    receiver.close()


@pytest.fixture
def started(monkeypatch) -> list:
    """The model processes started from now on, in order, each once it has loaded."""
    started = []
    start = ModelProcess.start.__func__

    def recording_start(cls, *args, **kwargs):
        process = start(cls, *args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(ModelProcess, "start", classmethod(recording_start))
    return started


def test_a_shutdown_while_the_model_process_loads_leaves_no_child_and_no_ready_deployment(tiny_checkpoints,
                                                                                           started):
    """The server shuts down while a deployment's child still loads: the load stops once the child has started
    (it fails, 'shut down while it loaded', and closes the child) instead of warming up and turning ready with a
    child nobody will close."""
    from service.deployments import FAILED, DeploymentManager
    from service.settings import Settings

    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), model_process=True)
    manager = DeploymentManager(Settings(deployments=[spec], device="cpu", gc_freeze=False))
    manager.start()
    deployment = manager.deployments["policy"]
    deadline = time.monotonic() + 60
    while deployment.stage != "starting the model process" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert deployment.stage == "starting the model process"
    manager.shutdown(timeout=0.1)  # (the load runs on: a child's start cannot be interrupted)
    deadline = time.monotonic() + 60
    while deployment.status not in (FAILED, "ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deployment.status == FAILED and "shut down while it loaded" in deployment.error
    (process,) = started
    assert wait_gone(process.pid)
    while deployment.model_process is not None and time.monotonic() < deadline:  # (dropped after it is closed)
        time.sleep(0.05)
    assert deployment.model_process is None


def test_closing_a_model_process_twice_closes_nothing_else(tiny_checkpoints):
    """A shutdown and a failing load may both close one child: the second close does nothing (closing the
    channel's descriptors again would close whatever has taken their numbers since)."""
    checkpoint = tiny_checkpoints["diffusion_policy"]
    process = ModelProcess.start(load_pipeline(checkpoint), {"path": checkpoint}, name="twice")
    process.close()
    others = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]  # (they take the numbers the close freed)
    try:
        process.close()
        for fd in others:
            os.fstat(fd)  # (raises for a descriptor closed under it)
    finally:
        for fd in others:
            os.close(fd)


def test_a_child_that_cannot_start_leaves_nothing_open(tiny_checkpoints, monkeypatch):
    """Out of processes (fork's EAGAIN) or memory, ``Popen`` raises: the channel's sockets and its shared memory are
    closed with it, however often the server tries."""
    import service.model_process as model_process

    def no_room(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    def ours() -> list[str]:  # (sockets and the arenas' memory files this process holds)
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # (listdir's own descriptor, closed by now)
                pass
        return sorted(link for link in links if link.startswith("socket:") or "vla-model-process" in link)

    before = ours()
    monkeypatch.setattr(model_process.subprocess, "Popen", no_room)
    for _ in range(4):
        with pytest.raises(BlockingIOError):
            ModelProcess.start(None, {"path": tiny_checkpoints["diffusion_policy"]}, name="no-room")
    assert ours() == before


def test_a_child_whose_answer_cannot_be_read_is_stopped(tiny_checkpoints, monkeypatch):
    """A failure after the child started, other than its exit (here its load's answer cannot be decoded), stops the
    child and closes its channel, as a load that times out does."""
    from service.model_process import Channel

    def unreadable(self):
        raise ValueError("an unreadable answer")

    before = children()
    monkeypatch.setattr(Channel, "recv", unreadable)
    with pytest.raises(ValueError, match="unreadable answer"):
        ModelProcess.start(None, {"path": tiny_checkpoints["diffusion_policy"]}, name="unreadable")
    assert children() == before  # (killed and reaped)


@pytest.mark.parametrize("reported", ["while it warms up", "after it serves again"])
def test_a_restarted_child_that_dies_at_once_is_restarted_once_more(reported):
    """The new child dies as its restart warms it up. Its watcher reports the death either while the deployment
    still restarts (left to the restart, which acts on it once done) or only after the deployment serves again
    (its own to act on): one more restart either way. Before, when the report came late, the restart's own check
    of the child and the report both restarted it: a healthy child restarted for a death already dealt with."""
    from service.deployments import READY, Deployment
    from service.settings import Settings

    spec = DeploymentSpec(name="policy", checkpoint="/unused")
    deployment = Deployment(spec, Settings(deployments=[spec], device="cpu", gc_freeze=False))

    class Child:  # the deployment's side of a model process, its child dying at its first restart's warm-up
        alive, exit_message, pid, restarts = True, None, 100, 0

        def restart(self):
            self.restarts += 1
            self.alive, self.exit_message, self.pid = True, None, self.pid + 1

        def warmup(self, max_batch_size):
            pass

        def serving(self):
            if self.restarts == 1:
                self.alive, self.exit_message = False, f"the model process (pid {self.pid}) was killed by signal 9"
                if reported == "while it warms up":
                    deployment._model_process_exited(self.exit_message)

    child = deployment.model_process = Child()
    deployment.status = READY
    deployment._model_process_exited("the model process (pid 100) was killed by signal 9")
    if reported == "after it serves again":
        deployment._model_process_exited("the model process (pid 101) was killed by signal 9")
    assert child.restarts == 2 and len(deployment.recent_restarts()) == 2
    assert deployment.status == READY and child.alive


def test_a_shutdown_while_a_reload_loads_drops_the_reload_and_leaves_no_child(tiny_checkpoints, started,
                                                                               monkeypatch):
    """A reload's new deployment loads beside the serving one, outside the served set. A shutdown meanwhile stops
    its load too (its child closed once started) and the reload answers 503; the old deployment is not replaced.
    Before, the reload went on after the shutdown and swapped in a deployment whose child nobody would close."""
    import asyncio
    import threading

    from service.deployments import READY, Deployment, DeploymentManager
    from service.errors import ApiError
    from service.settings import Settings

    checkpoint = str(tiny_checkpoints["diffusion_policy"])
    manager = DeploymentManager(Settings(deployments=[DeploymentSpec(name="policy", checkpoint=checkpoint)],
                                         device="cpu", gc_freeze=False))
    manager.start()
    old = manager.deployments["policy"]
    deadline = time.monotonic() + 60
    while old.status != READY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert old.status == READY
    outcome = {}

    def reload() -> None:
        spec = DeploymentSpec(name="policy", checkpoint=checkpoint, model_process=True)
        try:
            outcome["new"] = asyncio.run(manager.reload("policy", spec))
        except ApiError as e:
            outcome["error"] = e

    loading = []
    start_loading = Deployment.start_loading
    monkeypatch.setattr(Deployment, "start_loading", lambda self: loading.append(self) or start_loading(self))
    thread = threading.Thread(target=reload)
    thread.start()
    while not (loading and loading[0].stage == "starting the model process") and time.monotonic() < deadline:
        time.sleep(0.005)
    manager.shutdown(timeout=0.1)
    thread.join(60)
    assert "error" in outcome and outcome["error"].status == 503, outcome
    assert manager.deployments["policy"] is old
    (process,) = started
    assert wait_gone(process.pid)


def test_a_child_exits_when_its_server_dies_during_a_call(tmp_path):
    """A call in flight reads nothing from the channel until it ends (one that hangs never does): the child must
    still end once its server is killed outright. Here a "server" starts a child as ``_spawn`` does (a session of
    its own) that arms ``exit_with_the_server`` and then runs a call that would take a minute."""
    import sys

    server = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'from service.model_process import exit_with_the_server; "
        "exit_with_the_server(every_s=0.1); print(\\'armed\\', flush=True); import time; time.sleep(60)'], "
        "start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n")], stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[2]))
    child = int(server.stdout.readline())
    try:
        assert server.stdout.readline().strip() == "armed"
        assert not wait_gone(child, timeout=0.5)  # alive while its server is
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert wait_gone(child, timeout=10), "the child still runs after its server was killed"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_deployments_close_at_once_at_shutdown(tiny_checkpoints, monkeypatch):
    """A model process whose call outlives the drain takes up to CLOSE_TIMEOUT_S to close; deployments closed one
    after the other held the exit that long per deployment (past the launcher's drain + 5 s, which then kills the
    replica). Here each close takes 1 s: three close together in about one."""
    from service.deployments import Deployment

    close = Deployment.close

    def slow_close(self) -> None:
        time.sleep(1.0)
        close(self)

    checkpoint = str(tiny_checkpoints["diffusion_policy"])
    specs = [DeploymentSpec(name=f"policy-{i}", checkpoint=checkpoint) for i in range(3)]
    with serving(*specs):
        monkeypatch.setattr(Deployment, "close", slow_close)
        started = time.monotonic()
    assert time.monotonic() - started < 2.5
