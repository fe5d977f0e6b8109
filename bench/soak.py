"""The soak: a real server on the demo pack under mixed traffic for minutes; its memory must settle and nothing fail.

    .venv/bin/python bench/soak.py [--duration 300] [--clients 1] [--pause 0.05] [--json PATH]
    make soak ARGS="--duration 60"

Starts `vla-foundry serve` (this environment's) on a free loopback port with the demo pack (the default demo
folder, or --demo-dir), waits for `/health/ready`, then runs worker threads until --duration seconds have passed,
each with its own `httpx.Client` and a --pause between requests (so the 2-core dev VM is kept busy, not
overloaded). --clients N runs N of each:

- `robot-http`: `/predict/diffusion_policy` stateless in JSON and in msgpack (msgpack reply too), then an
  episode on a session: chunk mode (`/predict/diffusion_policy` with `session_id`), step mode
  (`/sessions/{id}/step`, JSON and msgpack), `/sessions/{id}/reset`, `GET /sessions`, `DELETE /sessions/{id}`;
- `robot-ws`: the `/ws/diffusion_policy` websocket (the robot client): a connection per episode, 8 observations
  and a reset on it, then closed (its session ends with it);
- `text`: `/predict/transformer` (short generations), `/evaluate/transformer`, `/v1/completions`,
  `/v1/chat/completions` plain and streamed (server-sent events read to `data: [DONE]`);
- `vision`: `/predict/vlm` (a caption of a drawn shape), `/v1/chat/completions` with an image (`vlm_hf`),
  `/predict/stable_diffusion` (4 steps, the demo's 16 px), `/evaluate/vlm`, `/evaluate/diffusion_policy`;
- `misc`: `/models`, `/metrics`, `/health/live`, `/v1/models`, and bad requests that must get their 4xx
  (malformed JSON 400, wrong content type 415, unknown type / deployment / route / session 404, invalid values
  422, a websocket text frame closed with 1008). Those count as expected, not as errors.

Errors: any status other than the one a request expects, a 200 whose body lacks what it must hold, or an
exception (timeouts included). The server's RSS (/proc/PID/status VmRSS), threads and open files are sampled every
--sample-every seconds. Warm-up is the first 20 % of the run (at least 30 s): the RSS at its end is the baseline;
growth = the last sample vs the baseline, and the largest sample of the last 20 % of the run vs the baseline.
Goals (issue 16): growth < 5 % (both) and 0 errors; exit 1 when one fails. Also printed: per route the count per
status and p50 / max latency, the server's CPU use, its live sessions and websockets at the end (both should be 0),
and the server log's ERROR and Traceback lines.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import msgpack
import numpy as np

from bench_support import free_port, serve_command, stop_group, wait_until_ready
from vla_foundry_client import PolicyServerError, WebsocketPolicyClient
from vla_foundry_client.arrays import pack, unpack

GOAL_GROWTH_PCT, GOAL_ERRORS = 5.0, 0
MSGPACK = "application/msgpack"
TIMEOUT_S = 60.0
WORKERS = ("robot-http", "robot-ws", "text", "vision", "misc")


# ----------------------------------------------------------------------------- bookkeeping


class Tally:
    """Requests per (route, status), latencies per route, errors (the first few with what went wrong)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.latency_ms: dict[str, list[float]] = defaultdict(list)
        self.expected_4xx = 0
        self.errors = 0
        self.first_errors: list[str] = []

    def record(self, route: str, status: Any, ms: float, error: Optional[str] = None, refused: bool = False) -> None:
        with self.lock:
            self.counts[route][str(status)] += 1
            self.latency_ms[route].append(ms)
            if refused:
                self.expected_4xx += 1
            if error is not None:
                self.errors += 1
                if len(self.first_errors) < 20:
                    self.first_errors.append(f"{time.strftime('%H:%M:%S')} {route} -> {status}: {error}"[:400])

    def total(self) -> int:
        with self.lock:
            return sum(sum(c.values()) for c in self.counts.values())


class Traffic:
    """One worker's requests, each timed and checked against the status it expects."""

    def __init__(self, base: str, tally: Tally, pio: dict, seed: int):
        self.base, self.tally, self.io = base, tally, pio
        self.rng = np.random.default_rng(seed)
        self.pyrng = random.Random(seed)
        self.http = httpx.Client(base_url=base, timeout=TIMEOUT_S)

    def close(self) -> None:
        self.http.close()

    def call(self, route: str, method: str, path: str, expect: int = 200, check: Optional[Callable] = None,
             **kwargs: Any) -> Optional[httpx.Response]:
        """One request; ``check(reply)`` (after the status matched) returns what is wrong with a reply, or None."""
        started = time.perf_counter()
        try:
            reply = self.http.request(method, path, **kwargs)
        except Exception as e:  # a timeout, a dropped connection: an error
            self.tally.record(route, f"exc:{type(e).__name__}", (time.perf_counter() - started) * 1000,
                              f"{type(e).__name__}: {e}")
            return None
        ms = (time.perf_counter() - started) * 1000
        problem = None
        if reply.status_code != expect:
            problem = f"expected {expect}: {reply.text[:200]}"
        elif check is not None:
            try:
                problem = check(reply)
            except Exception as e:
                problem = f"unreadable reply ({type(e).__name__}: {e}): {reply.text[:120]}"
        self.tally.record(route, reply.status_code, ms, problem, refused=problem is None and expect >= 400)
        return reply

    def timed(self, route: str, fn: Callable[[], Any], expect: str = "ok") -> Any:
        """A non-HTTP exchange (the websocket): its outcome is "ok" or the exception's name."""
        started = time.perf_counter()
        try:
            value, outcome, problem = fn(), "ok", None
        except PolicyServerError as e:
            value, outcome, problem = None, str(e.status), str(e)[:200]
        except Exception as e:
            value, outcome, problem = None, f"exc:{type(e).__name__}", f"{type(e).__name__}: {e}"
        self.tally.record(route, outcome, (time.perf_counter() - started) * 1000,
                          None if outcome == expect else f"expected {expect}: {problem}",
                          refused=outcome == expect != "ok")
        return value

    # ------------------------------------------------------------------ bodies

    def observation(self, stateless: bool = True) -> dict:
        """A random observation of the policy's io: a frame per camera and image index at the size it resizes to,
        [P+1][d] proprioception rows (stateless) or the current [d] row (a session), the instruction."""
        pio = self.io
        size = pio["image"].get("resize_to") or [pio["image"].get("model_size") or 32] * 2
        frames = len(pio["image_indices"])
        observation: dict[str, Any] = {
            "images": {cam: [self.rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(frames)]
                       for cam in pio["cameras"]},
            "lowdim": {p["field"]: self.rng.normal(0, 1, (p["steps"], p["dim"]) if stateless else (p["dim"],))
                       .astype(np.float32) for p in pio["proprioception"]}}
        if pio.get("uses_language"):
            observation["language_instruction"] = self.pyrng.choice(["go to the red target", "reach the blue one"])
        return observation

    def actions(self) -> dict:
        rows = self.io["action_steps"]
        return {a["field"]: self.rng.uniform(-1, 1, (rows, a["dim"])).astype(np.float32) for a in self.io["actions"]}

    @staticmethod
    def json_body(body: dict) -> dict:
        return {"content": json.dumps(pack(body, binary=False)), "headers": {"content-type": "application/json"}}

    @staticmethod
    def msgpack_body(body: dict) -> dict:
        return {"content": msgpack.packb(pack(body, binary=True)),
                "headers": {"content-type": MSGPACK, "accept": MSGPACK}}

    def shape_png(self) -> str:
        """A 32 px coloured shape (what the demo captioner was trained on), base64 PNG."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (32, 32), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        colour = self.pyrng.choice([(220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40)])
        x = self.pyrng.choice([2, 18])
        if self.pyrng.random() < 0.5:
            draw.ellipse((x, 10, x + 12, 22), fill=colour)
        else:
            draw.rectangle((x, 10, x + 12, 22), fill=colour)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()


# ----------------------------------------------------------------------------- checks of 200 replies


def has(*keys: str) -> Callable[[httpx.Response], Optional[str]]:
    def check(reply: httpx.Response) -> Optional[str]:
        body = reply.json()
        missing = [k for k in keys if k not in body]
        return f"reply lacks {missing}" if missing else None

    return check


def msgpack_has(*keys: str) -> Callable[[httpx.Response], Optional[str]]:
    def check(reply: httpx.Response) -> Optional[str]:
        if not reply.headers.get("content-type", "").startswith(MSGPACK):
            return f"content-type {reply.headers.get('content-type')!r}, not msgpack"
        body = unpack(msgpack.unpackb(reply.content, raw=False))
        missing = [k for k in keys if k not in body]
        return f"reply lacks {missing}" if missing else None

    return check


def error_shape(reply: httpx.Response) -> Optional[str]:
    error = reply.json().get("error")
    return None if isinstance(error, dict) and "type" in error and "message" in error else "not the error shape"


# ----------------------------------------------------------------------------- the workers


def robot_http(t: Traffic, n: int) -> None:
    """A stateless chunk in JSON and in msgpack, then a short session episode, the session then deleted."""
    dp = "/predict/diffusion_policy"
    chunk = has("action_chunk", "actions", "timing_ms")
    t.call("POST /predict/diffusion_policy (json)", "POST", dp, check=chunk,
           **t.json_body({"observation": t.observation(), "seed": n}))
    t.call("POST /predict/diffusion_policy (msgpack)", "POST", dp, check=msgpack_has("action_chunk", "actions"),
           **t.msgpack_body({"observation": t.observation(), "seed": n}))
    session = f"soak-{threading.get_ident()}-{n}"
    t.call("POST /sessions/{id}/reset (unknown+seed)", "POST", f"/sessions/{session}/reset", expect=404,
           check=error_shape, json={"seed": 1})
    for step in range(2):  # chunk mode: the server keeps the history
        t.call("POST /predict/diffusion_policy (session)", "POST", dp, check=chunk,
               **t.json_body({"observation": t.observation(stateless=False), "session_id": session, "step": step}))
    t.call("POST /sessions/{id}/reset", "POST", f"/sessions/{session}/reset", check=has("reset"), json={"seed": n})
    step_check = has("action", "replanned", "plan_step")
    for step in range(4):  # step mode: replans every open_loop_steps
        body = {"observation": t.observation(stateless=False), "step": step}
        if step % 2:
            t.call("POST /sessions/{id}/step (msgpack)", "POST", f"/sessions/{session}/step",
                   check=msgpack_has("action", "replanned"), **t.msgpack_body(body))
        else:
            t.call("POST /sessions/{id}/step (json)", "POST", f"/sessions/{session}/step", check=step_check,
                   **t.json_body(body))
    t.call("GET /sessions", "GET", "/sessions", check=has("sessions"))
    t.call("DELETE /sessions/{id}", "DELETE", f"/sessions/{session}", check=has("deleted"))


def robot_ws(t: Traffic, n: int) -> None:
    """An episode on the websocket: connect (metadata), 8 observations and a reset, close (the session ends)."""
    route = "WS /ws/diffusion_policy"
    client = t.timed(f"{route} connect", lambda: WebsocketPolicyClient(t.base, timeout=TIMEOUT_S))
    if client is None:
        return
    try:
        for step in range(8):
            if step == 4:
                t.timed(f"{route} reset", lambda: client.reset(seed=n))
            observation = t.observation(stateless=False)
            reply = t.timed(f"{route} observation", lambda o=observation, s=step: client.infer(o, step=s))
            if reply is None:
                return
    finally:
        client.close()


def text(t: Traffic, n: int) -> None:
    prompts = ["The robot", "Shall I compare thee", "Once upon a time", "Four score and seven"]
    prompt = prompts[n % len(prompts)]
    t.call("POST /predict/transformer", "POST", "/predict/transformer", check=has("completions"),
           json={"prompt": prompt, "max_new_tokens": 12, "seed": n})
    t.call("POST /evaluate/transformer", "POST", "/evaluate/transformer", check=has("loss", "perplexity"),
           json={"texts": [prompt + " and so on"]})
    t.call("POST /v1/completions", "POST", "/v1/completions", check=has("choices", "usage"),
           json={"model": "demo-transformer", "prompt": prompt, "max_tokens": 12, "seed": n})
    messages = [{"role": "user", "content": prompt}]
    t.call("POST /v1/chat/completions", "POST", "/v1/chat/completions", check=has("choices", "usage"),
           json={"model": "demo-transformer_hf", "messages": messages, "max_tokens": 8, "seed": n})
    chat_stream(t, {"model": "demo-transformer_hf", "messages": messages, "max_tokens": 12, "seed": n,
                    "stream": True, "stream_options": {"include_usage": True}})


def chat_stream(t: Traffic, body: dict) -> None:
    """A streamed chat read event by event; it must end with `data: [DONE]` after at least one chunk."""
    route = "POST /v1/chat/completions (stream)"
    started = time.perf_counter()
    try:
        with t.http.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = [line for line in reply.iter_lines() if line.startswith("data: ")]
            status = reply.status_code
    except Exception as e:
        t.tally.record(route, f"exc:{type(e).__name__}", (time.perf_counter() - started) * 1000,
                       f"{type(e).__name__}: {e}")
        return
    problem = None
    if status != 200:
        problem = f"expected 200: {events[:2]}"
    elif len(events) < 2 or events[-1] != "data: [DONE]":
        problem = f"the stream did not end with [DONE]: {events[-2:]}"
    else:
        try:
            for event in events[:-1]:
                json.loads(event[len("data: "):])
        except ValueError as e:
            problem = f"an event is not JSON: {e}"
    t.tally.record(route, status, (time.perf_counter() - started) * 1000, problem)


def vision(t: Traffic, n: int) -> None:
    image = t.shape_png()
    t.call("POST /predict/vlm", "POST", "/predict/vlm", check=has("captions"),
           json={"image": image, "temperature": 0, "max_new_tokens": 12})
    t.call("POST /v1/chat/completions (image, vlm_hf)", "POST", "/v1/chat/completions", check=has("choices"),
           json={"model": "demo-vlm_hf", "max_tokens": 6, "seed": n, "messages": [{"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
               {"type": "text", "text": "what is this?"}]}]})
    t.call("POST /predict/stable_diffusion", "POST", "/predict/stable_diffusion", check=has("images"),
           json={"prompt": t.pyrng.choice(["a red circle", "a blue square", "a yellow triangle"]),
                 "num_inference_steps": 4, "seed": n})
    t.call("POST /evaluate/vlm", "POST", "/evaluate/vlm", check=has("loss"),
           json={"image": image, "texts": ["a red circle on the left"], "seed": n})
    samples = [{"observation": t.observation(), "actions": t.actions()} for _ in range(2)]
    t.call("POST /evaluate/diffusion_policy", "POST", "/evaluate/diffusion_policy", check=has("loss"),
           **t.json_body({"samples": samples, "seed": n}))


def misc(t: Traffic, n: int) -> None:
    t.call("GET /health/live", "GET", "/health/live")
    t.call("GET /models", "GET", "/models", check=has("deployments"))
    t.call("GET /metrics", "GET", "/metrics",
           check=lambda r: None if "vla_http_requests_total" in r.text else "no vla_http_requests_total")
    t.call("GET /v1/models", "GET", "/v1/models", check=has("data"))
    bad = n % 9  # one refusal per round, in turn
    if bad == 0:
        t.call("bad: malformed JSON", "POST", "/predict/transformer", expect=400, check=error_shape,
               content=b'{"prompt": ', headers={"content-type": "application/json"})
    elif bad == 1:
        t.call("bad: content-type xml", "POST", "/predict/transformer", expect=415, check=error_shape,
               content=b"<prompt/>", headers={"content-type": "application/xml"})
    elif bad == 2:
        t.call("bad: unknown type", "POST", "/predict/no_such_type", expect=404, check=error_shape, json={})
    elif bad == 3:
        t.call("bad: unknown deployment", "POST", "/predict/transformer", expect=404, check=error_shape,
               json={"prompt": "x", "model": "no-such-model"})
    elif bad == 4:
        t.call("bad: max_new_tokens -1", "POST", "/predict/transformer", expect=422, check=error_shape,
               json={"prompt": "x", "max_new_tokens": -1})
    elif bad == 5:
        t.call("bad: not an image", "POST", "/predict/vlm", expect=422, check=error_shape,
               json={"image": base64.b64encode(b"not an image at all").decode()})
    elif bad == 6:
        body = {"observation": {**t.observation(), "lowdim": {p["field"]: [[1.0]] for p in t.io["proprioception"]}}}
        t.call("bad: policy lowdim shape", "POST", "/predict/diffusion_policy", expect=422, check=error_shape,
               **t.json_body(body))
    elif bad == 7:
        t.call("bad: unknown route", "GET", "/no/such/route", expect=404, check=error_shape)
        t.call("bad: chat logprobs", "POST", "/v1/chat/completions", expect=422, check=error_shape,
               json={"model": "demo-transformer_hf", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 4, "logprobs": True})
    else:
        t.call("bad: DELETE unknown session", "DELETE", "/sessions/no-such-session", expect=404, check=error_shape)
        ws_text_frame(t)


def ws_text_frame(t: Traffic) -> None:
    """A text frame on the robot websocket: the server answers with a text message and closes with 1008."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    def exchange() -> str:
        url = t.base.replace("http://", "ws://", 1) + "/ws/diffusion_policy"
        with connect(url, open_timeout=TIMEOUT_S, compression=None) as ws:
            if not isinstance(ws.recv(timeout=TIMEOUT_S), bytes):
                raise ValueError("the first frame is not the binary metadata")
            ws.send("not a msgpack frame")
            if not isinstance(ws.recv(timeout=TIMEOUT_S), str):
                raise ValueError("no text message before the close")
            try:
                ws.recv(timeout=TIMEOUT_S)
            except ConnectionClosed as e:
                return str(e.rcvd.code if e.rcvd is not None else 1006)
            raise ValueError("the server did not close the connection")

    started = time.perf_counter()
    try:
        outcome, problem = exchange(), None
    except Exception as e:
        outcome, problem = f"exc:{type(e).__name__}", f"{type(e).__name__}: {e}"
    if outcome != "1008":
        problem = problem or f"closed with {outcome}, not 1008"
    t.tally.record("bad: WS text frame (close code)", outcome, (time.perf_counter() - started) * 1000, problem,
                   refused=problem is None)


ROUNDS: dict[str, Callable[[Traffic, int], None]] = {"robot-http": robot_http, "robot-ws": robot_ws, "text": text,
                                                     "vision": vision, "misc": misc}


def worker(name: str, base: str, tally: Tally, io_: dict, seed: int, stop_at: float, pause: float) -> None:
    traffic = Traffic(base, tally, io_, seed)
    n = 0
    try:
        while time.monotonic() < stop_at:
            try:
                ROUNDS[name](traffic, n)
            except Exception as e:  # a bug of this script's: counted, and the worker goes on
                tally.record(f"{name} (client)", f"exc:{type(e).__name__}", 0.0, f"{type(e).__name__}: {e}")
            n += 1
            time.sleep(pause * (0.5 + traffic.pyrng.random()))
    finally:
        traffic.close()


# ----------------------------------------------------------------------------- the server and its memory


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (KiB) and Threads from /proc/PID/status, open files from /proc/PID/fd."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        out["fds"] = -1
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float, started: float):
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.every, self.started = pid, every, started
        self.samples: list[dict[str, float]] = []
        self.done = threading.Event()

    def sample(self) -> None:
        try:
            status = proc_status(self.pid)
        except OSError:
            return
        self.samples.append({"t": time.monotonic() - self.started, "rss_mib": status["VmRSS"] / 1024,
                             "hwm_mib": status.get("VmHWM", 0) / 1024, "threads": status.get("Threads", 0),
                             "fds": status["fds"]})

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()


def start_server(port: int, demo_dir: Optional[str], log) -> subprocess.Popen:
    command = serve_command() + ["serve", "--host", "127.0.0.1", "--port", str(port)]
    if demo_dir:
        command += ["--demo-dir", demo_dir]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> tuple[Optional[int], float]:
    """SIGTERM (the drain path of `docker stop`: the server exits 0), then bench_support's stop for anything left.
    Returns the exit code (None: it had to be killed) and the seconds it took."""
    started = time.monotonic()
    code: Optional[int] = None
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_group(proc)  # the process group: nothing left by now, unless the server hung
    return code, time.monotonic() - started


def policy_io(base: str) -> dict:
    deployments = httpx.get(f"{base}/models", timeout=30).json()["deployments"]
    policies = [d for d in deployments if d["type"] == "diffusion_policy"]
    if len(policies) != 1:
        raise SystemExit(f"expected one diffusion_policy deployment in the demo pack; got {len(policies)}")
    return policies[0]["io"]


def server_gauges(base: str) -> dict[str, float]:
    """The live robot sessions and websockets the server counts (both 0 once every client has left)."""
    out = {}
    text_ = httpx.get(f"{base}/metrics", timeout=30).text
    for line in text_.splitlines():
        for name in ("vla_robot_sessions", "vla_websocket_connections"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    out["sessions_listed"] = len(httpx.get(f"{base}/sessions", timeout=30).json()["sessions"])
    return out


def log_problems(log) -> list[str]:
    """The server log's ERROR / CRITICAL lines and tracebacks, each with the lines that follow it (up to the next
    timestamped log line)."""
    log.seek(0)
    blocks: list[str] = []
    current: Optional[list[str]] = None
    for line in log:
        line = line.rstrip()
        starts_entry = line[:4].isdigit() and line[4:5] == "-"  # "2026-12-03 14:11:33,162 INFO ..."
        if starts_entry:
            if current:
                blocks.append("\n".join(current))
            current = None
        if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
            if current is None:
                current = [line]
                continue
        if current is not None and len(current) < 40:
            current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


# ----------------------------------------------------------------------------- the run


def summarize(samples: list[dict], duration: float, warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup]
    if not after:
        raise SystemExit("no RSS sample after the warm-up: run longer or sample more often")
    baseline = after[0]["rss_mib"]
    last_part = [s for s in samples if s["t"] >= duration * 0.8] or after[-1:]
    end = samples[-1]["rss_mib"]
    max_last = max(s["rss_mib"] for s in last_part)
    # the trend after warm-up (least squares, MiB per minute): a leak shows as a steady slope
    slope = 0.0
    if len(after) >= 3:
        ts = np.array([s["t"] for s in after])
        ys = np.array([s["rss_mib"] for s in after])
        slope = float(np.polyfit(ts, ys, 1)[0] * 60)
    return {"rss_start_mib": samples[0]["rss_mib"], "rss_warmup_mib": baseline, "rss_end_mib": end,
            "rss_peak_mib": max(s["rss_mib"] for s in samples), "rss_max_last_part_mib": max_last,
            "growth_end_pct": (end - baseline) / baseline * 100,
            "growth_max_last_pct": (max_last - baseline) / baseline * 100,
            "slope_after_warmup_mib_per_min": slope, "vm_hwm_mib": samples[-1]["hwm_mib"],
            "threads_warmup": after[0]["threads"], "threads_end": samples[-1]["threads"],
            "fds_warmup": after[0]["fds"], "fds_end": samples[-1]["fds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic (default 300)")
    parser.add_argument("--clients", type=int, default=1, help="workers of each kind (default 1: 5 threads)")
    parser.add_argument("--pause", type=float, default=0.05, help="mean seconds between a worker's rounds")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--demo-dir", default=None, help="the demo pack's folder (default: the server's)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    warmup = max(30.0, 0.2 * args.duration)
    if args.duration <= warmup:
        parser.error(f"--duration must exceed the warm-up ({warmup:.0f} s)")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = start_server(port, args.demo_dir, log)
        try:
            ready_s = wait_until_ready(proc, base, "/health/ready", "the server", log, args.ready_timeout)
            io_ = policy_io(base)
            print(f"server pid {proc.pid} on {base}, ready after {ready_s:.1f} s; {args.duration:.0f} s of traffic "
                  f"({args.clients} x {', '.join(WORKERS)}), warm-up {warmup:.0f} s", flush=True)
            tally = Tally()
            started = time.monotonic()
            stop_at = started + args.duration
            sampler = Sampler(proc.pid, args.sample_every, started)
            sampler.sample()
            sampler.start()
            cpu_before = cpu_seconds(proc.pid)
            threads = [threading.Thread(target=worker, name=f"{name}-{i}", daemon=True,
                                        args=(name, base, tally, io_, 1000 * k + i, stop_at, args.pause))
                       for k, name in enumerate(WORKERS) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            next_report = started + 30
            while any(thread.is_alive() for thread in threads):
                time.sleep(1.0)
                if time.monotonic() >= next_report and sampler.samples:
                    s = sampler.samples[-1]
                    print(f"  {s['t']:5.0f} s: {tally.total()} requests, {tally.errors} errors, "
                          f"RSS {s['rss_mib']:.1f} MiB", flush=True)
                    next_report += 30
                if time.monotonic() > stop_at + 2 * TIMEOUT_S:
                    print("workers still busy long after the end; reporting without them", flush=True)
                    break
            elapsed = time.monotonic() - started
            cpu_pct = (cpu_seconds(proc.pid) - cpu_before) / elapsed * 100
            sampler.done.set()
            sampler.join()
            sampler.sample()  # the end
            gauges = server_gauges(base)
            figures = summarize(sampler.samples, args.duration, warmup)
        finally:
            exit_code, stop_s = stop_server(proc)
        problems = log_problems(log)

    report = {"duration_s": args.duration, "warmup_s": warmup, "elapsed_s": elapsed, "clients": args.clients,
              "pause_s": args.pause, "server_ready_s": ready_s, "server_cpu_pct": cpu_pct,
              "requests": tally.total(), "expected_4xx": tally.expected_4xx, "errors": tally.errors,
              "first_errors": tally.first_errors, **figures, "end_gauges": gauges,
              "server_exit_code": exit_code, "server_stop_s": stop_s,
              "server_log_problems": problems[:20], "server_log_problem_count": len(problems),
              "routes": {route: {"statuses": dict(counts), "p50_ms": statistics.median(tally.latency_ms[route]),
                                 "max_ms": max(tally.latency_ms[route])}
                         for route, counts in sorted(tally.counts.items())},
              "samples": sampler.samples}
    passed = print_report(report)
    report["passed"] = passed
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"figures written to {args.json}")
    return 0 if passed else 1


def print_report(r: dict) -> bool:
    print(f"\n{'route':<46} {'n':>6}  {'statuses':<22} {'p50 ms':>8} {'max ms':>8}")
    for route, row in r["routes"].items():
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(row["statuses"].items()))
        print(f"{route:<46} {sum(row['statuses'].values()):>6}  {statuses:<22} {row['p50_ms']:>8.1f} "
              f"{row['max_ms']:>8.1f}")
    print(f"\n{r['requests']} requests in {r['elapsed_s']:.0f} s ({r['requests'] / r['elapsed_s']:.1f}/s), "
          f"{r['expected_4xx']} expected refusals, {r['errors']} errors; server CPU {r['server_cpu_pct']:.0f} % "
          f"of one core")
    for line in r["first_errors"]:
        print(f"  error: {line}")
    print(f"RSS (MiB): start {r['rss_start_mib']:.1f}, after warm-up ({r['warmup_s']:.0f} s) "
          f"{r['rss_warmup_mib']:.1f}, "
          f"end {r['rss_end_mib']:.1f}, peak {r['rss_peak_mib']:.1f} (VmHWM {r['vm_hwm_mib']:.1f}), "
          f"max of the last 20 % {r['rss_max_last_part_mib']:.1f}")
    print(f"growth after warm-up: end {r['growth_end_pct']:+.2f} %, max of the last 20 % "
          f"{r['growth_max_last_pct']:+.2f} %; trend {r['slope_after_warmup_mib_per_min']:+.2f} MiB/min")
    print(f"server threads {r['threads_warmup']} -> {r['threads_end']}, open files {r['fds_warmup']} -> "
          f"{r['fds_end']}; at the end: {r['end_gauges']}")
    print(f"server stopped with SIGTERM: exit code {r['server_exit_code']} after {r['server_stop_s']:.1f} s")
    if r["server_log_problem_count"]:
        print(f"server log: {r['server_log_problem_count']} ERROR / traceback entries, the first:")
        for block in r["server_log_problems"][:3]:
            print("  " + block[:3000].replace("\n", "\n  "))
    growth_ok = max(r["growth_end_pct"], r["growth_max_last_pct"]) < GOAL_GROWTH_PCT
    errors_ok = r["errors"] <= GOAL_ERRORS
    passed = growth_ok and errors_ok
    print(f"{'PASS' if passed else 'FAIL'}: RSS growth < {GOAL_GROWTH_PCT:.0f} % after warm-up "
          f"({'ok' if growth_ok else 'failed'}: end {r['growth_end_pct']:+.2f} %, "
          f"max {r['growth_max_last_pct']:+.2f} %), {GOAL_ERRORS} errors "
          f"({'ok' if errors_ok else 'failed'}: {r['errors']})")
    return passed


if __name__ == "__main__":
    sys.exit(main())
