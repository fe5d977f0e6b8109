"""Request ids: the client's ``X-Request-ID`` when sane, else a new one; in the reply header, the error body
and the log lines of the request (text and JSON logs)."""

from __future__ import annotations

import json
import re
import logging
import subprocess
import sys

import httpx
import pytest

from service import DeploymentSpec
from service.request_ids import JsonFormatter, RequestIdFilter, new_request_id
from tests.factories import PREDICT_REQUESTS
from tests.service.conftest import serving
from tests.service.live_server import live_server


def test_ids_are_echoed_and_in_error_bodies(tiny_checkpoints, caplog):
    spec = DeploymentSpec(name="tiny-transformer", checkpoint=str(tiny_checkpoints["transformer"]))
    with serving(spec, api_keys="secret") as client:
        auth = {"authorization": "Bearer secret"}
        ok = client.post("/predict/transformer", json=PREDICT_REQUESTS["transformer"],
                         headers={**auth, "x-request-id": "robot-7:step.42"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "robot-7:step.42"
        fresh = client.get("/models", headers=auth)
        assert len(fresh.headers["x-request-id"]) == 32  # none given: a new one
        assert client.get("/models", headers=auth).headers["x-request-id"] != fresh.headers["x-request-id"]
        # an insane id (too long, or characters a log line or header must not carry) is replaced
        for bad in ("x" * 129, "a b", "id\twith\ttabs"):
            assert client.get("/models", headers={**auth, "x-request-id": bad}).headers["x-request-id"] != bad
        with caplog.at_level(logging.INFO, logger="service.access"):
            refused = client.post("/predict/transformer", json={"bogus": 1}, headers={**auth, "x-request-id": "r-422"})
            unauthorized = client.get("/models", headers={"x-request-id": "r-401"})
        assert refused.status_code == 422 and refused.json()["error"]["request_id"] == "r-422"
        assert refused.headers["x-request-id"] == "r-422"
        assert unauthorized.status_code == 401 and unauthorized.json()["error"]["request_id"] == "r-401"
        access = [r for r in caplog.records if r.name == "service.access"]
        assert [(r.route, r.status) for r in access] == [("/predict/transformer", 422), ("/models", 401)]


def test_new_ids_are_32_hex_digits_unique_here_and_across_processes():
    """A process's new ids share its random prefix and count up (no system call each); another process (a replica)
    has another prefix."""
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    other = subprocess.run([sys.executable, "-c", "from service.request_ids import new_request_id as n; print(n())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert len(other) == 32 and other[:16] != ids[0][:16]


def test_json_log_lines_carry_the_request_id_and_the_access_fields():
    from service.request_ids import current_request_id

    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "%s %s", ("GET", "/models"), None)
    record.route, record.status = "/models", 200
    token = current_request_id.set("abc")
    try:
        RequestIdFilter().filter(record)
    finally:
        current_request_id.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "abc" and line["message"] == "GET /models"
    assert line["route"] == "/models" and line["status"] == 200 and line["level"] == "INFO"


KEY, WRONG_KEY = "key-4f1c9e2a7b", "wrong-8d3b6a0e5c"
BODY_MARK = "body-mark-71e2"


def test_a_live_server_logs_json_with_request_ids(tmp_path, tiny_checkpoints):
    policy = tiny_checkpoints["transformer"]
    log = tmp_path / "server.log"
    with live_server(["--checkpoint", f"{policy}=tiny"], tmp_path / "demo",
                     env={"VLA_LOG_FORMAT": "json", "VLA_API_KEYS": KEY}, log_path=log) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            reply = client.post("/predict/transformer", json=PREDICT_REQUESTS["transformer"],
                                headers={"authorization": f"Bearer {KEY}", "x-request-id": "live-1"})
            assert reply.status_code == 200 and reply.headers["x-request-id"] == "live-1"
            marked = client.post("/predict/transformer", headers={"authorization": f"Bearer {KEY}"},
                                 json={"model": "tiny", "prompt": BODY_MARK, "max_new_tokens": 2})
            assert marked.status_code == 200, marked.text
            wrong = client.get("/models", headers={"authorization": f"Bearer {WRONG_KEY}"})
            assert wrong.status_code == 401
    text = [line for line in log.read_text().splitlines() if line.strip()]
    assert not [line for line in text if not line.startswith("{")], text  # uvicorn's own lines too
    lines = [json.loads(line) for line in text]
    assert any(entry["logger"].startswith("uvicorn") for entry in lines)
    access = [entry for entry in lines if entry.get("logger") == "service.access" and entry["request_id"] == "live-1"]
    assert access and access[0]["route"] == "/predict/transformer" and access[0]["status"] == 200
    # Neither the key nor a wrong one appears anywhere in the log, nor the request's body (before, the check
    # passed unless some logged value was exactly the key).
    assert not [line for line in text if KEY in line or WRONG_KEY in line or BODY_MARK in line]


def test_a_live_server_logs_text_in_its_own_format_with_paths_cut_short(tmp_path, tiny_checkpoints):
    """In the default text format every line has the server's form (time, level, logger, request id): uvicorn's
    websocket lines came in its own, with no time (two a connection). And a client's path of any length cost its
    length in the access line (twice in JSON, over 100 KB a line): it is cut to a fixed length, with its own."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from service.request_ids import MAX_LOGGED_PATH

    log = tmp_path / "server.log"
    with live_server(["--checkpoint", f"{tiny_checkpoints['transformer']}=tiny"], tmp_path / "demo",
                     log_path=log) as base:
        with pytest.raises(InvalidStatus):  # (no websocket route there: refused, and uvicorn logs it)
            connect(base.replace("http", "ws") + "/ws/nowhere", open_timeout=10).close()
        with pytest.raises(InvalidStatus):  # (uvicorn's line quotes the path and query: cut too)
            connect(base.replace("http", "ws") + "/ws/" + "b" * 3000 + "?q=" + "c" * 3000, open_timeout=10).close()
        long = "/" + "a" * 20_000
        assert httpx.get(base + long, timeout=30).status_code == 404
    text = [line for line in log.read_text().splitlines()  # (the banner is for a person: lines of its own)
            if line.strip() and not line.startswith(("VLA Foundry Serve on", "  curl"))]
    form = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+ \[[^\]]+\]: ")
    assert [line for line in text if "WebSocket /ws/nowhere" in line], text  # (uvicorn's line is there)
    assert not [line for line in text if not form.match(line)], text
    (access,) = [line for line in text if "service.access" in line and "404" in line]
    assert f"/{'a' * (MAX_LOGGED_PATH - 1)}…(20001 characters) 404" in access and len(access) < 500
    assert max(len(line) for line in text) < 1000
