"""Graceful drain on a live server: SIGTERM lets the request in flight finish and exits 0; a request longer
than VLA_DRAIN_TIMEOUT_S does not hold the process past it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from tests.factories import tiny_model, tiny_stable_diffusion_params
from service.cli import serve_command
from tests.service.live_server import free_port, server_process
from vla_foundry.checkpoint import save_experiment
from vla_foundry.params.diffusion import NoiseSchedulerParams

SLOW = {"num_images": 4, "seed": 1}  # an unconditional tiny UNet over many DDPM steps


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """The tiny image model with T = 1000, so a request can take seconds."""
    path = tmp_path_factory.mktemp("slow-sd")
    save_experiment(tiny_model(tiny_stable_diffusion_params(noise_scheduler=NoiseSchedulerParams(num_timesteps=1000))),
                    path)
    return path


def serve(checkpoint, tmp_path, drain_s: float, log_path=None):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_DEMO_DIR": str(tmp_path / "demo"),
           "VLA_DRAIN_TIMEOUT_S": str(drain_s)}
    command = serve_command() + ["serve", "--checkpoint", f"{checkpoint}=tiny", "--host", "127.0.0.1", "--port",
                                 str(port), "--device", "cpu"]
    return server_process(command, env, port, log_path=log_path)


def timed_post(base: str, steps: int, out: list) -> None:
    started = time.perf_counter()
    try:
        response = httpx.post(f"{base}/predict/stable_diffusion", json={**SLOW, "num_inference_steps": steps},
                              timeout=120)
        out.append((response.status_code, time.perf_counter() - started, response))
    except httpx.HTTPError as e:
        out.append((type(e).__name__, time.perf_counter() - started))


def request_in_flight(base: str, steps: int) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=timed_post, args=(base, steps, out))
    thread.start()
    time.sleep(0.5)  # the request is running on the model thread
    return thread, out


def test_sigterm_finishes_the_request_in_flight_and_exits_0(slow_checkpoint, tmp_path):
    with serve(slow_checkpoint, tmp_path, drain_s=120) as (base, proc):
        alone: list = []
        timed_post(base, 400, alone)  # how long the slow request takes here
        assert alone[0][0] == 200, alone
        assert alone[0][1] > 0.6  # long enough to be in flight when the signal comes
        thread, out = request_in_flight(base, 400)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # no new connection is taken once draining
            refused = httpx.get(f"{base}/health/ready", timeout=2).status_code
        except httpx.TransportError:
            refused = "refused"
        thread.join(timeout=120)
        assert out[0][0] == 200, out  # finished, not cut
        assert proc.wait(timeout=60) == 0
    assert refused == "refused"


def test_a_request_longer_than_the_drain_timeout_does_not_hold_the_process(slow_checkpoint, tmp_path):
    log = tmp_path / "server.log"
    with serve(slow_checkpoint, tmp_path, drain_s=1, log_path=log) as (base, proc):
        thread, out = request_in_flight(base, 1000)
        signalled = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        exited_after = time.perf_counter() - signalled
        thread.join(timeout=60)
    assert code == 0 and exited_after < 1 + 4, exited_after  # the drain timeout, then at most the thread joins
    # cut off, and told so in the error shape with its request id (not uvicorn's plain 500 and a logged traceback)
    assert out and out[0][0] == 503, out
    response = out[0][2]
    error = response.json()["error"]
    assert error["type"] == "unavailable" and "VLA_DRAIN_TIMEOUT_S" in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Exception in ASGI application" not in log.read_text()


def test_a_stream_cut_by_the_drain_timeout_ends_with_an_error_event_and_done(tiny_tokenizer, tmp_path):
    """A /v1 stream still running when the drain timeout is over: its last event says why (503 in the error shape)
    and ``[DONE]`` follows, and the chunked body ends, as the stream's other errors end it (before, it was cut
    without a word, uvicorn logged an error, and the process exited about two seconds late: the shutdown waited for
    a generation that its stream, blocked meanwhile, could not stop)."""
    from tests.factories import tiny_transformer_params

    checkpoint = tmp_path / "long-text"
    save_experiment(tiny_model(tiny_transformer_params(vocab_size=len(tiny_tokenizer), max_seq_len=4096,
                                                       hidden_dim=256, n_layers=6, n_heads=4)),
                    checkpoint, tokenizer=tiny_tokenizer)
    log = tmp_path / "server.log"
    events: list = []
    ended: dict = {}

    def stream(base: str) -> None:
        try:
            with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
                    "prompt": "the", "max_tokens": 1024, "temperature": 0, "stream": True}) as reply:
                events.extend(line for line in reply.iter_lines() if line)
            ended["how"] = "whole"
        except httpx.HTTPError as e:
            ended["how"] = f"{type(e).__name__}: {e}"
        ended["at"] = time.perf_counter()

    with serve(checkpoint, tmp_path, drain_s=1, log_path=log) as (base, proc):
        client = threading.Thread(target=stream, args=(base,))
        client.start()
        deadline = time.monotonic() + 30
        while len(events) < 3:  # the stream is under way
            assert time.monotonic() < deadline and client.is_alive(), (ended, events[-2:])
            time.sleep(0.02)
        signalled = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        exited_after = time.perf_counter() - signalled
        client.join(timeout=30)
    assert code == 0 and ended["how"] == "whole", ended
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "unavailable" and "VLA_DRAIN_TIMEOUT_S" in error["message"], error
    assert ended["at"] - signalled < 1 + 1.5, ended["at"] - signalled
    assert exited_after < 1 + 2.5, exited_after
    assert "ASGI callable returned without completing response" not in log.read_text()


def test_sigterm_says_goodbye_to_robot_websockets_with_1001(tiny_checkpoints, tmp_path):
    """A robot connected over the websocket gets its reply in flight, then a close 1001 (going away) with the
    reason, not a cut connection; the process exits 0."""
    import msgpack
    from websockets.exceptions import ConnectionClosed

    from tests.service.test_robot_ws import flat_observation, infer, open_ws

    with serve(tiny_checkpoints["diffusion_policy"], tmp_path, drain_s=30) as (base, proc):
        url = base.replace("http://", "ws://") + "/ws/diffusion_policy"
        with open_ws(url) as ws:
            msgpack.unpackb(ws.recv(timeout=30))  # the metadata frame
            assert "actions" in infer(ws, {**flat_observation(1), "seed": 1})
            proc.send_signal(signal.SIGTERM)
            goodbye = ws.recv(timeout=30)
            assert "shutting down" in goodbye
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1001
        assert proc.wait(timeout=30) == 0


def test_ctrl_c_drains_and_exits_0_without_a_traceback(tiny_checkpoints, tmp_path):
    log = tmp_path / "server.log"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_DEMO_DIR": str(tmp_path / "demo")}
    command = serve_command() + ["serve", "--checkpoint", f"{tiny_checkpoints['transformer']}=tiny", "--host",
                                 "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with server_process(command, env, port, log_path=log) as (base, proc):
        assert httpx.post(f"{base}/predict/transformer", json={"prompt": "the", "max_new_tokens": 2}).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert "Traceback" not in log.read_text()


def test_a_frame_that_meets_the_drain_is_answered_or_refused_never_dropped(tiny_checkpoints, monkeypatch):
    """A robot's frame is being computed when the drain begins, and its next frame is already on its way: the
    first is answered, then the goodbye (1001) comes in place of the second's reply, saying that it was not acted
    on, and the second is indeed not acted on (the session planned once: a robot sending it again elsewhere never
    gets it planned twice). Without the fix the second was planned after the goodbye, its reply lost."""
    import msgpack

    from service import DeploymentSpec
    from tests.service.conftest import serving
    from tests.service.test_robot_ws import flat_observation

    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    with serving(spec) as client:
        pipeline = client.app.state.manager.get("policy").pipeline
        computing, release = threading.Event(), threading.Event()
        predict_each = pipeline.predict_each

        def held(requests, **kwargs):  # the first frame's model call waits until the drain has begun
            computing.set()
            assert release.wait(30)
            return predict_each(requests, **kwargs)

        monkeypatch.setattr(pipeline, "predict_each", held)
        with client.websocket_connect("/ws/diffusion_policy?session_id=leaving") as ws:
            ws.receive_bytes()  # the metadata
            ws.send_bytes(msgpack.packb({**flat_observation(0), "seed": 1}, use_bin_type=True))
            assert computing.wait(30)
            ws.send_bytes(msgpack.packb({**flat_observation(1), "seed": 2}, use_bin_type=True))  # meets the drain
            drained = client.portal.start_task_soon(client.app.state.robot_sockets.close_all, 30)
            release.set()
            messages = [ws.receive()]
            while messages[-1]["type"] != "websocket.close":
                messages.append(ws.receive())
            drained.result(30)
        entry = client.app.state.sessions.get("leaving")
        assert [m["type"] for m in messages] == ["websocket.send", "websocket.send", "websocket.close"], messages
        assert msgpack.unpackb(messages[0]["bytes"])["step"] == 0  # the frame in flight: answered
        assert "shutting down" in messages[1]["text"] and "not acted on" in messages[1]["text"]
        assert messages[2]["code"] == 1001
        assert entry.policy.plans == 1 and entry.policy.history.last_step == 0  # the second frame changed nothing


def test_a_frame_that_arrives_as_the_drain_begins_is_refused_by_the_goodbye(tiny_checkpoints):
    """A robot waiting between frames sends one just as the drain begins (the frame is in the server's hands in
    the same event-loop turn): the connection was committed to leave, so the frame is not acted on, and the
    goodbye before the close 1001 says so (a robot sends it again to the replica it reconnects to)."""
    import msgpack

    from service import DeploymentSpec
    from tests.service.conftest import serving
    from tests.service.test_robot_ws import flat_observation

    spec = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))
    with serving(spec) as client:
        sockets = client.app.state.robot_sockets
        with client.websocket_connect("/ws/diffusion_policy?session_id=crossing") as ws:
            ws.receive_bytes()  # the metadata
            ws.send_bytes(msgpack.packb({**flat_observation(0), "seed": 1}, use_bin_type=True))
            assert msgpack.unpackb(ws.receive_bytes())["step"] == 0
            frame = {"type": "websocket.receive", "bytes": msgpack.packb(flat_observation(1), use_bin_type=True)}

            async def frame_meets_the_drain() -> None:
                ws._receive_tx.send_nowait(frame)  # the server's receive has it before the drain yields
                await sockets.close_all(30)

            client.portal.call(frame_meets_the_drain)
            goodbye = ws.receive()
            closed = ws.receive()
        assert "not acted on" in goodbye["text"] and closed == {"type": "websocket.close", "code": 1001, "reason": ""}
        policy = client.app.state.sessions.get("crossing").policy
        assert policy.plans == 1 and policy.history.last_step == 0  # the frame changed nothing


def test_a_server_that_fails_to_start_does_not_claim_a_drain(tmp_path):
    """Its port is taken while a deployment still loads: nothing was served, so nothing was drained, and the log
    says the loads were left behind, not that a model call outlived VLA_DRAIN_TIMEOUT_S."""
    # The load begins before the port is bound (the start waits for it: on a busy host the bind could fail before
    # the model thread took the load, and then no load was left behind to name), then takes 30 s.
    slow_load = textwrap.dedent("""
        import sys, threading, time
        import service.deployments as d
        begun, start_loading = threading.Event(), d.Deployment.start_loading
        d.Deployment._load = lambda self: (begun.set(), time.sleep(30))
        d.Deployment.start_loading = lambda self: (start_loading(self), begun.wait(20))[0]
        from service.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_DEMO_DIR": str(tmp_path / "demo")}
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", slow_load, "serve", "--checkpoint", f"{tmp_path}=slow", "--host",
                              "127.0.0.1", "--port", str(port), "--device", "cpu"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert out.returncode != 0 and time.monotonic() - started < 25, out.stderr  # it left without the load
    assert "address already in use" in out.stderr
    assert "the server did not start: exiting without waiting for slow to finish loading" in out.stderr
    assert "VLA_DRAIN_TIMEOUT_S" not in out.stderr and "drain" not in out.stderr.lower(), out.stderr


def test_a_reload_still_loading_at_the_exit_is_named_and_not_waited_for(tiny_checkpoints, tmp_path):
    """SIGTERM while an admin reload loads (a load takes as long as it takes): the server exits 0 soon after its
    drain, without waiting for the load, and its last line names the reload left loading (before, it said a model
    call outlived the drain, which none did: the event loop's end had cancelled the reload's task and freed its
    name before the line was written)."""
    import shutil

    root = tmp_path / "allowed"
    shutil.copytree(tiny_checkpoints["diffusion_policy"], root / "policy-a")
    shutil.copytree(tiny_checkpoints["diffusion_policy"], root / "policy-b")
    begun = tmp_path / "reload-began"
    slow_reload = textwrap.dedent(f"""
        import pathlib, sys, time
        import service.deployments as d
        load = d.Deployment._load
        def slow(self):
            if "policy-b" in str(self.spec.checkpoint):
                pathlib.Path({str(begun)!r}).touch()
                time.sleep(30)
            return load(self)
        d.Deployment._load = slow
        from service.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_DEMO_DIR": str(tmp_path / "demo"), "VLA_DRAIN_TIMEOUT_S": "1",
           "VLA_ADMIN_KEYS": "admin", "VLA_CHECKPOINT_ROOTS": str(root)}
    command = [sys.executable, "-c", slow_reload, "serve", "--checkpoint", f"{root / 'policy-a'}=policy", "--host",
               "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with server_process(command, env, port, log_path=log) as (base, proc):
        reload = threading.Thread(target=lambda: httpx.post(
            f"{base}/admin/deployments/policy/reload", json={"checkpoint": str(root / "policy-b")},
            headers={"Authorization": "Bearer admin"}, timeout=60), daemon=True)
        reload.start()
        deadline = time.monotonic() + 30
        while not begun.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert begun.exists(), log.read_text()[-2000:]
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        exited_after = time.monotonic() - signalled
    text = log.read_text()
    assert code == 0 and exited_after < 1 + 10, (exited_after, text[-2000:])  # (not the 30 s load)
    assert "exiting without waiting for the reload of policy to finish loading" in text, text[-2000:]
    assert "model call" not in text, text[-2000:]


def test_a_model_call_that_outlived_the_drain_is_a_warning_even_beside_a_load():
    import logging

    from service.cli import _leaving_with_model_threads

    level, message = _leaving_with_model_threads(True, ["big"], ["policy"])
    assert level == logging.WARNING and "model call of policy still running" in message and "big" in message
    assert _leaving_with_model_threads(True, ["big"], [])[0] == logging.INFO  # only a load left behind
    assert _leaving_with_model_threads(False, ["big"], ["policy"])[0] == logging.INFO  # never started: no drain


def test_a_robot_connecting_while_the_server_drains_is_refused_before_the_upgrade(tiny_checkpoints):
    """(The listening socket is closed at once; a connection accepted just before is refused as the upgrade's HTTP
    reply, 503 with Retry-After, telling the robot to connect to another replica.)"""
    from starlette.testclient import WebSocketDenialResponse

    from service import DeploymentSpec
    from tests.service.conftest import serving

    with serving(DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]))) as client:
        client.app.state.robot_sockets.draining = True
        try:
            with pytest.raises(WebSocketDenialResponse) as refused:
                with client.websocket_connect("/ws/diffusion_policy"):
                    pass
        finally:
            client.app.state.robot_sockets.draining = False
    assert refused.value.status_code == 503 and refused.value.headers["retry-after"] == "1"
    error = refused.value.json()["error"]
    assert error["type"] == "unavailable" and "another replica" in error["message"]
