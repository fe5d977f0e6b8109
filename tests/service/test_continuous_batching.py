"""Continuous batching over the wire: the official ``openai`` client and ``/predict`` against a live server whose
text and caption deployments decode many requests together. Each request gets what it gets alone; a client that
disconnects mid-stream leaves the batch; ``/models`` and ``/metrics`` say how each deployment generates."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.live_server import live_server
from tests.service.test_openai import chat_checkpoint  # noqa: F401  (a fixture: a text model with a chat template)


@pytest.fixture(scope="module")
def live(chat_checkpoint, tiny_checkpoints, tmp_path_factory):  # noqa: F811
    args = ["--checkpoint", f"{chat_checkpoint}=chat", "--checkpoint", f"{tiny_checkpoints['vlm']}=captioner",
            "--checkpoint", f"{tiny_checkpoints['transformer_hf']}=hf"]
    # traced steps as served by default (tests/conftest.py turns traces off for the other servers: policies')
    env = {"VLA_MAX_BATCH_SIZE": "8", "VLA_TRACED_SAMPLING": "true"}
    with live_server(args, tmp_path_factory.mktemp("nodemo"), env=env) as base:
        yield base


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0, timeout=120)


def sequences(live: str, deployment: str, state: str = "running") -> float:
    text = httpx.get(f"{live}/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "vla_generation_sequences":
            for sample in family.samples:
                if sample.labels == {"deployment": deployment, "state": state}:
                    return sample.value
    raise AssertionError(f"no vla_generation_sequences for {deployment}")


def test_models_say_how_each_deployment_generates(live):
    models = {d["name"]: d for d in httpx.get(f"{live}/models").json()["deployments"]}
    for name in ("chat", "captioner", "hf"):  # hf: a Llama as transformer_hf, decoding in slots (hf_slots.py)
        batching = models[name]["batching"]
        assert batching["generation"] == "continuous" and batching["max_sequences"] == 8
        assert batching["kv_cache_bytes"] > 0 and batching["prefill_tokens_per_step"] == 512
        # our transformer's batched steps run from one trace (slot_graphs.py); an HF model's eagerly
        assert batching["decode_steps"] == ("eager" if name == "hf" else "traced")


CHATS = [  # (content, max_tokens, seed, temperature, stream, n)
    ("a robot picks up", 40, 1, 1.0, False, 1), ("shall i compare thee", 120, 2, 0.0, True, 1),
    ("the quick brown fox", 8, 3, 0.7, True, 2), ("move to the red target", 60, 4, 1.0, False, 1),
    ("once upon a time", 90, 5, 0.0, False, 1), ("grip", 3, 6, 1.0, True, 1),
    ("where is the cup", 70, 7, 1.0, True, 1), ("hello", 25, 8, 0.9, False, 3)]


def chat(client, content, max_tokens, seed, temperature, stream, n, model="chat") -> list[tuple[str, str]]:
    """(content, finish reason) per choice, streamed or not."""
    kwargs = dict(model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, seed=seed,
                  temperature=temperature, n=n)
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        return [(c.message.content, c.finish_reason) for c in reply.choices]
    texts, finishes = [""] * n, [None] * n
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    return list(zip(texts, finishes))


@pytest.mark.parametrize("model", ["chat", "hf"])
def test_concurrent_chats_get_what_each_gets_alone(client, model):
    chats = CHATS if model == "chat" else [(c, min(m, 80), *rest) for c, m, *rest in CHATS]  # hf: 128 positions
    with concurrent.futures.ThreadPoolExecutor(len(chats)) as pool:
        together = list(pool.map(lambda args: chat(client, *args, model=model), chats))
    alone = [chat(client, *args, model=model) for args in chats]
    assert together == alone
    assert any(len(text) > 50 for choices in alone for text, _ in choices)  # long enough to overlap


@pytest.mark.parametrize("model,route", [("chat", "transformer"), ("hf", "transformer_hf")])
def test_concurrent_predictions_share_decode_steps_and_keep_their_tokens(live, model, route):
    rng = np.random.default_rng(0)
    bodies = [{"model": model, "prompt_token_ids": [rng.integers(1, 100, size=int(rng.integers(2, 12))).tolist()],
               "max_new_tokens": int(rng.integers(20, 60)), "temperature": 1.0, "seed": i} for i in range(12)]

    def predict(body):
        reply = httpx.post(f"{live}/predict/{route}", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(predict, bodies))
    alone = [predict(b) for b in bodies]
    assert [r["completions"] for r in together] == [r["completions"] for r in alone]
    assert max(r["timing_ms"]["batch_size"] for r in together) > 1  # they decoded alongside each other
    assert all(r["timing_ms"]["batch_size"] == 1 for r in alone)


def test_captions_decode_together_and_keep_their_tokens(live):
    from tests.factories import png_data_url

    bodies = [{"model": "captioner", "images": [png_data_url(i)], "prompt": p, "max_new_tokens": 16, "seed": i,
               "temperature": 1.0} for i, p in enumerate(["a", "the robot", "what is", "red", "cup on the"])]

    def predict(body):
        reply = httpx.post(f"{live}/predict/vlm", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()["captions"]

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(predict, bodies))
    assert together == [predict(b) for b in bodies]


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(client, live):
    messages = [{"role": "user", "content": "shall i compare thee"}]
    started = time.monotonic()
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=900, temperature=0)
    whole_s = time.monotonic() - started
    assert whole.usage.completion_tokens > 100  # long: a stream of it is still running when its client leaves
    with httpx.stream("POST", f"{live}/v1/chat/completions", timeout=60,
                      json={"model": "chat", "messages": messages, "max_tokens": 900, "temperature": 0,
                            "stream": True}) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert sequences(live, "chat") == 1  # decoding now
        left = time.monotonic()
    deadline = left + whole_s / 2
    while sequences(live, "chat") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sequences(live, "chat") == 0, "the stream's sequence kept decoding after its client left"
    # and the deployment still serves
    assert client.chat.completions.create(model="chat", messages=messages, max_tokens=4).choices


def test_a_request_of_more_prompts_than_slots_is_still_served(live):
    """12 prompts on a deployment of 8 slots: the request runs by itself, the solo way, and gets its 12 rows."""
    body = {"model": "chat", "prompt_token_ids": [[i + 1, i + 2] for i in range(12)], "max_new_tokens": 5,
            "temperature": 0}
    reply = httpx.post(f"{live}/predict/transformer", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["completions"]) == 12


def test_by_default_a_model_whose_one_sequence_does_not_fit_generates_one_request_at_a_time(tiny_checkpoints,
                                                                                              monkeypatch):
    """The default KV cache cap is a quarter of the memory free at load (here made too small for one sequence): the
    deployment still serves, one request at a time. An explicit VLA_KV_CACHE_MB that small fails the load instead,
    naming the setting."""
    from service.settings import DeploymentSpec
    from tests.service.conftest import serving

    monkeypatch.setattr("service.deployments.free_memory_bytes", lambda device: 4096)
    spec = DeploymentSpec(name="hf", checkpoint=str(tiny_checkpoints["transformer_hf"]))
    with serving(spec) as client:
        models = client.get("/models").json()["deployments"]
        assert models[0]["status"] == "ready" and models[0]["batching"]["generation"] == "per_request"
        reply = client.post("/predict/transformer_hf", json={"model": "hf", "prompt_token_ids": [[5, 6]],
                                                              "max_new_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and len(reply.json()["completions"][0]["token_ids"]) == 4
    with serving(spec, kv_cache_mb=0.001) as client:
        model = client.get("/models").json()["deployments"][0]
        assert model["status"] == "failed" and "VLA_KV_CACHE_MB" in model["error"]


@pytest.mark.parametrize("model_process", [False, True], ids=["in-thread", "model-process"])
def test_a_request_of_more_sequences_than_slots_is_refused_when_its_cache_would_pass_the_cap(tiny_checkpoints,
                                                                                             model_process):
    """VLA_KV_CACHE_MB bounds a deployment's KV cache; a request of more sequences than its slots runs by itself
    with a cache of its own, which came on top of it whatever its size. Now only what the cap leaves beside the
    slots: more is refused before it runs (422 naming the field to lower, OpenAI's name on /v1)."""
    from service.settings import DeploymentSpec
    from tests.service.conftest import serving
    from vla_foundry.pipelines import load_pipeline

    model = load_pipeline(tiny_checkpoints["transformer"]).model
    per_token = model.slot_bytes() // model.max_seq_len
    spec = DeploymentSpec(name="t", checkpoint=str(tiny_checkpoints["transformer"]), max_batch_size=1,
                          model_process=model_process)
    with serving(spec, kv_cache_mb=(model.slot_bytes() + 24 * per_token) / 2**20) as client:
        body = {"model": "t", "prompt": [[5, 6], [7, 8]], "temperature": 0, "seed": 0}
        fits = client.post("/v1/completions", json={**body, "max_tokens": 10})  # 2 × (2 + 10) ≤ 24 tokens
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 2
        refused = client.post("/v1/completions", json={**body, "max_tokens": 11})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["param"] == "max_tokens" and "at most 10 new tokens" in error["message"], error
        predicted = client.post("/predict/transformer", json={"model": "t", "prompt_token_ids": [[5, 6]] * 13,
                                                              "max_new_tokens": 1})
        assert predicted.status_code == 422 and predicted.json()["error"]["field"] == "prompt"  # (as for its length)
