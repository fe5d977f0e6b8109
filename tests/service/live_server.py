"""Start `vla-foundry serve` in a subprocess on a free loopback port and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Iterator

import httpx

from service.cli import serve_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(serve_args: list[str], demo_dir: Path, timeout: float = 120,
                env: Optional[dict[str, str]] = None, log_path: Optional[Path] = None) -> Iterator[str]:
    """`vla-foundry serve` on a free loopback port: yields the base URL once ``/health/ready`` says 200;
    stops the server with SIGINT after. ``env``: settings (``VLA_*``) over this process's environment;
    ``log_path``: where its output goes (kept; default a temporary file)."""
    with live_server_process(serve_args, demo_dir, timeout, env, log_path) as (base, _):
        yield base


@contextmanager
def live_server_process(serve_args: list[str], demo_dir: Path, timeout: float = 120,
                        env: Optional[dict[str, str]] = None, log_path: Optional[Path] = None
                        ) -> Iterator[tuple[str, subprocess.Popen]]:
    """``live_server``, yielding the server's process too (its pid is the server's)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_DEMO_DIR": str(demo_dir), **(env or {})}
    command = serve_command() + ["serve", *serve_args, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with server_process(command, env, port, timeout, log_path) as served:
        yield served


@contextmanager
def server_process(command: list[str], env: dict[str, str], port: int, timeout: float = 120,
                   log_path: Optional[Path] = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Runs ``command`` (a server for 127.0.0.1:``port``); yields (base URL, process) once ``/health/ready``
    says 200, then stops it with SIGINT (SIGKILL after 20 s)."""
    # The log goes to a file: a pipe nobody reads would block the server once it fills.
    log = open(log_path, "w+") if log_path is not None else tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"the server exited: {log.read()[-4000:]}")
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"not ready after {timeout:.0f} s: {log.read()[-4000:]}")
                time.sleep(0.2)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
