"""What a newcomer sees when ``vla-foundry serve`` starts and stops: the banner once the port is bound (the real one
for port 0), one line naming the fix when the port is taken, fatal launch errors before any warning, no uvicorn
deprecation warning, and a second Ctrl-C that ends the process at once without a traceback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from service.cli import serve_command
from tests.service.live_server import free_port

REPO = Path(__file__).resolve().parents[2]
BANNER = re.compile(r"VLA Foundry Serve on http://127\.0\.0\.1:(\d+)/")


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without its server settings (a VLA_* variable here would add a warning to the output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLA_") and k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "HF_HUB_OFFLINE": "1", "VLA_DEMO_DIR": str(tmp_path / "demo"), **extra}


def wait_for_text(log, pattern: str, proc: subprocess.Popen, timeout: float = 30.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        log.seek(0)
        text = log.read()
        found = re.search(pattern, text)
        if found:
            return found
        assert proc.poll() is None, f"the process exited ({proc.returncode}): {text[-3000:]}"
        assert time.monotonic() < deadline, f"{pattern!r} not seen after {timeout:.0f} s: {text[-3000:]}"
        time.sleep(0.1)


@contextmanager
def running(command: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, object]]:
    """``command`` with its output in a file (a pipe nobody reads could block it); killed if still running after."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            yield proc, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_with_port_0_the_banner_names_the_port_the_system_chose_once_it_listens(transformer_fixture, tmp_path):
    """The banner comes once uvicorn has bound, naming the port the system chose for ``--port 0``; no uvicorn
    deprecation warning (the websockets implementation it recommends is used)."""
    command = [*serve_command(), "serve", "--checkpoint", f"{transformer_fixture}=lm", "--host", "127.0.0.1",
               "--port", "0", "--device", "cpu"]
    with running(command, serve_env(tmp_path)) as (proc, log):
        port = int(wait_for_text(log, BANNER.pattern, proc).group(1))
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=10).status_code == 200  # listening already
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        log.seek(0)
        text = log.read()
    assert f"curl http://127.0.0.1:{port}/models" in text
    assert "DeprecationWarning" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("replicas", [[], ["--replicas", "2"]], ids=["one server", "replicas"])
def test_a_taken_port_is_one_line_naming_it_and_the_fix_without_a_banner(transformer_fixture, tmp_path, replicas):
    """An address already taken: one line naming the fix and exit 2, no banner (and, with replicas, no launch
    warnings)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([*serve_command(), "serve", "--checkpoint", f"{transformer_fixture}=lm", "--host",
                              "127.0.0.1", "--port", str(port), "--device", "cpu", *replicas],
                             env=serve_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if "cannot listen" in line]
    assert len(said) == 1 and f"cannot listen on 127.0.0.1:{port}: address already in use" in said[0], out.stderr
    assert "--port or VLA_PORT" in said[0]
    assert "VLA Foundry Serve" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "WARNING service " not in out.stderr, out.stderr  # (a launch's warnings: none before its fatal error)
    assert "replica 0 started" not in out.stderr, out.stderr


@pytest.mark.parametrize("case", ["per-gpu without GPUs", "cuda on a host without it"])
def test_a_launch_that_cannot_run_says_only_why(tmp_path, case):
    """Its fatal error comes alone and first: no launch warnings (a misspelt variable, no session store), no
    banner, no replica started."""
    if case == "cuda on a host without it":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has a CUDA device")
        args, expected = ["--replicas", "2", "--gpus", "0", "--device", "cuda"], "this host has no CUDA device"
    else:
        args, expected = ["--replicas", "per-gpu", "--gpus", "none"], "no GPU is visible"
    started = time.monotonic()
    out = subprocess.run([*serve_command(), "serve", "--checkpoint", str(tmp_path), "--port", "0", *args],
                         env=serve_env(tmp_path, VLA_MAX_QUEU="3"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("vla-foundry serve: ") and expected in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr  # one line: no warning, banner or replica before or after it
    assert time.monotonic() - started < 30


SLOW_CALLS = ("import asyncio, sys; import service.deployments as d; call = d.Deployment.call\n"
              "async def slow(self, c):\n    await asyncio.sleep(60)\n    return await call(self, c)\n"
              "d.Deployment.call = slow\nfrom service.cli import main; sys.exit(main(sys.argv[1:]))")


def test_a_second_ctrl_c_stops_at_once_in_one_line_without_a_traceback(transformer_fixture, tmp_path):
    """The first Ctrl-C drains (a request in flight may finish for VLA_DRAIN_TIMEOUT_S); a second one leaves at
    once (exit 130), saying so in one line, with no traceback and no drain-timeout warning."""
    port = free_port()
    command = [sys.executable, "-c", SLOW_CALLS, "serve", "--checkpoint", f"{transformer_fixture}=lm", "--host",
               "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with running(command, serve_env(tmp_path)) as (proc, log):
        wait_for_text(log, r"deployment lm \(transformer\) ready", proc, timeout=60)
        replies: list = []

        def in_flight() -> None:
            try:
                replies.append(httpx.post(f"http://127.0.0.1:{port}/predict/transformer", timeout=60,
                                          json={"prompt_token_ids": [1, 2, 3], "max_new_tokens": 2}))
            except httpx.HTTPError as e:
                replies.append(e)

        request = threading.Thread(target=in_flight)
        request.start()
        time.sleep(1.0)  # the request is in the server, held in its model call
        proc.send_signal(signal.SIGINT)
        wait_for_text(log, "Waiting for connections to close", proc)  # draining: the request holds it
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        code = proc.wait(timeout=30)
        left_after = time.monotonic() - signalled
        request.join(timeout=30)
        log.seek(0)
        text = log.read()
    assert code == 130, text[-3000:]
    assert left_after < 5, text[-3000:]
    assert text.count("second interrupt: stopping without finishing the requests in flight") == 1, text[-3000:]
    assert "Traceback" not in text and "VLA_DRAIN_TIMEOUT_S" not in text, text[-3000:]
    assert replies and not isinstance(replies[0], httpx.Response)  # the request was cut, not answered


LAUNCHER = textwrap.dedent("""
    import sys
    from service.launcher import Launcher, listening_socket
    sock = listening_socket("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    sys.exit(Launcher([sys.executable, sys.argv[1]], ["", ""], sock, 60.0).run())
""")


def test_a_second_ctrl_c_to_a_launcher_kills_its_draining_replicas_at_once(tmp_path):
    """The first Ctrl-C drains the replicas (up to VLA_DRAIN_TIMEOUT_S + 5 s); a second one kills them at once."""
    from tests.service.test_launcher import REPLICA

    (tmp_path / "replica.py").write_text(REPLICA)
    events = tmp_path / "events.log"
    events.touch()
    env = {**os.environ, "LOG": str(events), "DRAIN_S": "60"}  # stand-in replicas that drain for a minute
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "replica.py")], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        int(proc.stdout.readline())
        deadline = time.monotonic() + 20
        while not {"start 0", "start 1"} <= set(events.read_text().splitlines()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        while not {"term 0", "term 1"} <= set(events.read_text().splitlines()):  # both are draining
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        code = proc.wait(timeout=30)
        assert time.monotonic() - signalled < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert code == 130, err
    assert err.count("second interrupt: stopping without finishing the requests in flight: killing 2 replica(s)") == 1
    assert "Traceback" not in err and "did not drain in time" not in err, err
    assert "exit 0" not in events.read_text()  # killed during their drains


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:8000"), ("0.0.0.0", "http://127.0.0.1:8000"),
                                       ("::", "http://[::1]:8000"), ("::1", "http://[::1]:8000"),
                                       ("robot-server.lan", "http://robot-server.lan:8000")])
def test_the_banner_url_is_one_a_browser_on_this_host_opens(host, url):
    """``::`` listens on IPv6 only (uvicorn and the launcher set IPV6_V6ONLY): 127.0.0.1 would be refused."""
    from service.cli import base_url

    assert base_url(host, 8000) == url


def test_with_api_keys_the_banner_s_curl_lines_send_one_without_printing_it():
    """Its curl lines, run as printed, would get 401 on a server with keys: they send $VLA_API_KEY."""
    from service.cli import banner_lines
    from service.settings import Settings

    lines = banner_lines(Settings(api_keys="robot-secret-1"), 8000)
    curls = [line for line in lines if line.strip().startswith("curl ")]
    assert len(curls) == 3 and all('-H "Authorization: Bearer $VLA_API_KEY"' in line for line in curls)
    assert "robot-secret-1" not in "\n".join(lines) and "VLA_API_KEY" in lines[-1]
    assert not any("Authorization" in line for line in banner_lines(Settings(), 8000))
