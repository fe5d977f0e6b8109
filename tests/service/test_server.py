"""The real server: `vla-foundry serve` in a subprocess on a free loopback port, over httpx."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from vla_foundry.pipelines import load_pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli() -> list[str]:
    script = Path(sys.executable).parent / "vla-foundry"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vla_foundry"]


@pytest.fixture(scope="module")
def server(transformer_fixture, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config_model.yaml").write_text("type: transformer\n")  # no checkpoints at all
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_DEMO_DIR": str(tmp_path_factory.mktemp("nodemo"))}
    proc = subprocess.Popen(cli() + ["serve", "--checkpoint", str(transformer_fixture), "--checkpoint", f"{broken}=broken",
                                     "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.2)
            yield client
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_models_and_readiness(server):
    models = server.get("/models").json()
    assert "transformer" in models["registered_models"]
    by_name = {d["name"]: d for d in models["deployments"]}
    assert by_name["transformer_basic"]["status"] == "ready"
    assert by_name["transformer_basic"]["checkpoint"]["file"] == "checkpoint_2.pt"
    assert by_name["broken"]["status"] == "failed" and "no checkpoint_<N>.pt" in by_name["broken"]["error"]
    ready = server.get("/health/ready").json()
    assert ready["status"] == "ready" and "broken" in ready["failed"]


def test_greedy_predict_equals_the_fixture(server, transformer_fixture):
    expected = load_file(transformer_fixture / "expected" / "generate.safetensors")
    prompt = expected["input.input_ids"].tolist()
    response = server.post("/predict/transformer", json={"model": "transformer_basic", "prompt_token_ids": prompt,
                                                         "max_new_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    got = [c["token_ids"] for c in response.json()["completions"]]
    assert got == expected["output.tokens_use_cache"][:, 12:].tolist()


def test_evaluate_equals_in_process_loss(server, transformer_fixture):
    ids = load_file(transformer_fixture / "expected" / "forward.safetensors")["input.input_ids"].tolist()
    response = server.post("/evaluate/transformer", json={"input_ids": ids, "seed": 3})
    assert response.status_code == 200, response.text
    remote = response.json()
    local = load_pipeline(transformer_fixture).evaluate(input_ids=ids, seed=3)
    assert remote["loss"] == pytest.approx(local["loss"], abs=1e-6)
    assert remote["num_tokens"] == local["num_tokens"] == 2 * 11


def test_bad_input_over_the_wire(server):
    response = server.post("/predict/transformer", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "bad_request"
    response = server.post("/predict/transformer", json={"prompt": "text without a tokenizer"})
    assert response.status_code == 422 and "token ids only" in response.json()["error"]["message"]
