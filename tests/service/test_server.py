"""The real server: `vla-foundry serve` in a subprocess on a free loopback port, over httpx."""

import httpx
import pytest
from safetensors.torch import load_file

from tests.service.live_server import live_server
from vla_foundry.pipelines import load_pipeline


@pytest.fixture(scope="module")
def server(transformer_fixture, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config_model.yaml").write_text("type: transformer\n")  # no checkpoints at all
    args = ["--checkpoint", str(transformer_fixture), "--checkpoint", f"{broken}=broken"]
    with live_server(args, tmp_path_factory.mktemp("nodemo")) as base, httpx.Client(base_url=base, timeout=30) as c:
        yield c


def test_models_and_readiness(server):
    models = server.get("/models").json()
    assert "transformer" in models["registered_models"]
    by_name = {d["name"]: d for d in models["deployments"]}
    assert by_name["transformer_basic"]["status"] == "ready"
    assert by_name["transformer_basic"]["checkpoint"]["file"] == "checkpoint_2.pt"
    assert by_name["broken"]["status"] == "failed" and "no checkpoint_<N>.pt" in by_name["broken"]["error"]
    ready = server.get("/health/ready").json()
    assert ready["status"] == "ready" and ready["deployments"]["broken"] == "failed" and "failed" not in ready


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
