"""The OpenAI-compatible API: the official ``openai`` client against the real server, plus in-process checks."""

from __future__ import annotations

import copy
import time

import httpx
import openai
import pytest

from service import DeploymentSpec
from tests.factories import png_data_url, tiny_model, tiny_transformer_params
from tests.service.conftest import serving
from tests.service.live_server import live_server
from tests.service.test_metrics import samples, value
from vla_foundry.checkpoint import save_experiment

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A text model with a chat template and room for long streams (max_seq_len 1024)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("chat") / "chat"
    params = tiny_transformer_params(vocab_size=len(tokenizer), max_seq_len=1024, hidden_dim=64, n_layers=4)
    save_experiment(tiny_model(params), path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def live(chat_checkpoint, tiny_checkpoints, tmp_path_factory):
    args = ["--checkpoint", f"{chat_checkpoint}=chat", "--checkpoint", f"{tiny_checkpoints['vlm_hf']}=captioner"]
    with live_server(args, tmp_path_factory.mktemp("nodemo")) as base:
        yield base


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list(client):
    ids = {m.id for m in client.models.list()}
    assert {"chat", "captioner"} <= ids


def test_completion_equals_predict(client, live):
    completion = client.completions.create(model="chat", prompt="the quick", max_tokens=8, temperature=0)
    (choice,) = completion.choices
    assert completion.model == "chat" and choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8
    predicted = httpx.post(f"{live}/predict/transformer", json={"model": "chat", "prompt": "the quick",
                                                                "max_new_tokens": 8, "temperature": 0}).json()
    assert choice.text == predicted["completions"][0]["text"]
    assert completion.usage.completion_tokens == len(predicted["completions"][0]["token_ids"])


def test_chat_is_seeded_and_counts_usage(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a robot picks up"}]
    a = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, seed=7, n=2)
    b = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1] and all(c.message.role == "assistant" for c in a.choices)
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens > 0


def test_a_developer_message_reaches_the_template_as_a_system_one(client):
    """OpenAI's ``developer`` role is its newer name for ``system``: the template (which knows ``system``; many
    refuse other roles) gets it as that, so both give the same prompt and the same greedy reply."""
    replies = [client.chat.completions.create(model="chat", max_tokens=8, temperature=0, messages=[
        {"role": role, "content": "be brief"}, {"role": "user", "content": "a robot picks up"}]) for role in
        ("system", "developer")]
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


def test_a_multi_turn_chat_sends_back_the_clients_own_reply_and_counts_each_prompt_once(client, live):
    """The usual loop with the official client: the reply's message (``model_dump()``, with its null refusal,
    annotations, audio, function and tool calls) goes back in the next turn. A prompt's tokens count once
    whatever ``n`` is (as OpenAI counts them), and a stream names its seed in every chunk, as a reply does."""
    messages = [{"role": "user", "content": "a robot picks up"}]
    first = client.chat.completions.create(model="chat", messages=messages, max_tokens=6, seed=3)
    messages += [first.choices[0].message.model_dump(), {"role": "user", "content": "and then?"}]
    second = client.chat.completions.create(model="chat", messages=messages, max_tokens=6, seed=3)
    assert second.choices[0].message.role == "assistant"
    one, three = (client.chat.completions.create(model="chat", messages=messages, max_tokens=4, seed=3, n=n)
                  for n in (1, 3))
    assert three.usage.prompt_tokens == one.usage.prompt_tokens > 0
    with pytest.raises(openai.UnprocessableEntityError) as tools:
        client.chat.completions.create(model="chat", max_tokens=4, messages=[
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                    "function": {"name": "f", "arguments": "{}"}}]}])
    assert "tool_calls" in tools.value.message
    chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=4, stream=True))
    fingerprints = {c.system_fingerprint for c in chunks}
    assert len(fingerprints) == 1 and fingerprints.pop().startswith("seed-")
    seed = int(chunks[0].system_fingerprint[len("seed-"):])  # replays the stream
    again = client.chat.completions.create(model="chat", messages=messages, max_tokens=4, seed=seed)
    assert again.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # null means the default, as OpenAI reads it (completions: 16 tokens)
    nulls = httpx.post(f"{live}/v1/completions", json={"model": "chat", "prompt": "hi", "temperature": None,
                                                       "top_p": None, "n": None, "max_tokens": None, "seed": 1})
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["usage"]["completion_tokens"] <= 16
    over = httpx.post(f"{live}/v1/chat/completions", json={"model": "chat", "messages": messages,
                                                           "max_completion_tokens": 10**6})
    assert over.status_code == 422 and over.json()["error"]["field"] == "max_completion_tokens"


def test_chat_stream_arrives_before_the_end(client, live):
    messages = [{"role": "user", "content": "shall i compare thee"}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=900, temperature=0)
    before = samples(httpx.get(f"{live}/metrics").text)
    started = time.monotonic()
    arrivals, pieces, finish, usage = [], [], None, None
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=900, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            arrivals.append(time.monotonic() - started)
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.completion_tokens > 100, "a long generation, so streaming shows in the arrival times"
    assert len(arrivals) > 20
    # Chunks are sent as tokens are generated, not buffered to the end.
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])
    # The server timed the stream: its first token (counted from the request's arrival, so within what the client
    # waited) and its pace (from the first token to the last, per token, within the client's span of chunks).
    after = samples(httpx.get(f"{live}/metrics").text)

    def grew(name: str) -> tuple[float, float]:
        return tuple(value(after, f"{name}_{s}", deployment="chat") - value(before, f"{name}_{s}", deployment="chat")
                     for s in ("count", "sum"))

    count, first_token = grew("vla_time_to_first_token_seconds")
    assert count == 1 and 0 < first_token < arrivals[0]
    count, pace = grew("vla_time_per_output_token_seconds")
    assert count == 1 and 0 < pace * (usage.completion_tokens - 1) < arrivals[-1]


def test_chat_with_an_image_on_a_caption_model(client):
    content = [{"type": "image_url", "image_url": {"url": png_data_url(3)}}, {"type": "text", "text": "what is it"}]
    a = client.chat.completions.create(model="captioner", messages=[{"role": "user", "content": content}],
                                       max_tokens=6, seed=1)
    b = client.chat.completions.create(model="captioner", messages=[{"role": "user", "content": content}],
                                       max_tokens=6, seed=1)
    assert isinstance(a.choices[0].message.content, str)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_errors_reach_the_client(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="hi")
    assert "no-such-model" in missing.value.message and "chat" in missing.value.message
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert bad.value.body["field"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as unsupported:
        client.completions.create(model="chat", prompt="hi", logprobs=2)
    assert "logprobs" in unsupported.value.message
    # OpenAI's own names for the field and the kind of error, which its client reads
    assert (bad.value.param, bad.value.code) == ("temperature", "invalid_value")
    with pytest.raises(openai.UnprocessableEntityError) as zero:  # 0 still asks for the sampled token's logprob
        client.completions.create(model="chat", prompt="hi", logprobs=0)
    assert zero.value.param == "logprobs"
    # null means the default, as OpenAI reads it (the client sends what it is given)
    assert client.completions.create(model="chat", prompt="hi", max_tokens=2, echo=None).choices


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def app_client(chat_checkpoint, tiny_checkpoints, fixtures_dir):
    specs = [DeploymentSpec(name="chat", checkpoint=str(chat_checkpoint)),
             DeploymentSpec(name="vlm", checkpoint=str(tiny_checkpoints["vlm"])),
             DeploymentSpec(name="ids-only", checkpoint=str(fixtures_dir / "transformer_basic"))]
    with serving(*specs, max_new_tokens=64, max_batch=4) as c:
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_v1_models_lists_text_and_caption_only(app_client):
    body = app_client.get("/v1/models").json()
    assert body["object"] == "list"
    assert {m["id"]: m["type"] for m in body["data"]} == {"chat": "transformer", "vlm": "vlm",
                                                          "ids-only": "transformer"}
    assert app_client.get("/v1/models/chat").json()["id"] == "chat"


def test_completion_prompt_forms_and_n(app_client):
    body = app_client.post("/v1/completions", json={"model": "chat", "prompt": ["the quick", "a robot"], "n": 2,
                                                    "max_tokens": 3, "seed": 1}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    ids = app_client.post("/v1/completions", json={"model": "chat", "prompt": [5, 6, 7], "max_tokens": 3,
                                                   "temperature": 0}).json()
    assert ids["usage"]["prompt_tokens"] == 3 and isinstance(ids["choices"][0]["text"], str)


def test_stop_string_cuts_and_streams_without_it(app_client):
    request = {"model": "chat", "prompt": "the quick", "max_tokens": 20, "temperature": 0}
    full = app_client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    assert len(full) > 4
    stop = full[2:4]
    cut = app_client.post("/v1/completions", json={**request, "stop": stop}).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    with app_client.stream("POST", "/v1/completions", json={**request, "stop": stop, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_with_include_usage_every_chunk_carries_usage_null_but_the_last(app_client, route):
    """OpenAI's streaming format: with ``stream_options.include_usage`` every chunk has a ``usage`` field, null in all
    but the last (which has no choices); without it, no chunk has one. (How many content chunks the 6 tokens take
    varies: a stream sends in one event every token made since its last, fewer events on a busy host.)"""
    import json

    chat = route == "/v1/chat/completions"
    request = {"model": "chat", "max_tokens": 6, "temperature": 0, "stream": True,
               **({"messages": [{"role": "user", "content": "the quick"}]} if chat else {"prompt": "the quick"})}
    whole = app_client.post(route, json={**request, "stream": False}).json()["choices"][0]
    whole = whole["message"]["content"] if chat else whole["text"]
    for include in (True, False):
        options = {"stream_options": {"include_usage": True}} if include else {}
        with app_client.stream("POST", route, json={**request, **options}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        texts = [(c["choices"][0]["delta"].get("content") if chat else c["choices"][0]["text"]) or ""
                 for c in chunks if c["choices"]]
        assert "".join(texts) == whole and len(chunks) >= 1 + include  # (with usage: its own last chunk)
        if include:
            assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        else:
            assert not any("usage" in c for c in chunks)


def test_v1_refusals(app_client):
    image_part = {"type": "image_url", "image_url": {"url": png_data_url(0)}}
    e = error_of(app_client.post("/v1/chat/completions", json={
        "model": "chat", "messages": [{"role": "user", "content": [image_part]}]}), 422)
    assert "text model" in e["message"]
    e = error_of(app_client.post("/v1/completions", json={"model": "ids-only", "prompt": "hi"}), 422)
    assert "no tokenizer" in e["message"]
    e = error_of(app_client.post("/v1/chat/completions", json={
        "model": "vlm", "messages": [{"role": "user", "content": "hi"}]}), 422)
    assert "chat template" in e["message"]
    e = error_of(app_client.post("/v1/completions", json={"model": "chat", "prompt": "x", "echo": True}), 422)
    assert e["field"] == "echo"
    e = error_of(app_client.post("/v1/completions", json={"model": "chat", "prompt": "x", "max_tokens": 65}), 422)
    assert e["field"] == "max_tokens" and "64" in e["message"]
    e = error_of(app_client.post("/v1/completions", json={"model": "chat", "prompt": "x", "bogus": 1}), 422)
    assert "bogus" in e["message"]
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    e = error_of(app_client.post("/v1/chat/completions", json={
        "model": "vlm", "messages": [{"role": "user", "content": remote}]}), 422)
    assert "remote image URLs are not fetched" in e["message"]
    e = error_of(app_client.post("/v1/completions", json={"prompt": "x"}), 422)
    assert e["field"] == "model" and "chat" in e["message"]
    # strict types: nothing read as a boolean or a token id that is not one
    for body, field in (({"stream": "yes"}, "stream"), ({"prompt": [True, False]}, "prompt"),
                        ({"prompt": [1.0, 2.0]}, "prompt"),
                        ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream: true
                        ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus")):
        e = error_of(app_client.post("/v1/completions", json={"model": "chat", "prompt": "x", **body}), 422)
        assert e["field"] == field and e["param"] == field, (body, e)


def test_every_v1_error_has_openais_param_and_code_and_no_other_route_does(app_client):
    """Refusals made before a route runs (a body type, here) carry them too on /v1; the other routes keep the one
    shape without them."""
    refused = app_client.post("/v1/completions", content=b"<x/>", headers={"content-type": "application/xml"})
    error = error_of(refused, 415)
    assert error["code"] == error["type"] and "param" in error
    error = error_of(app_client.post("/predict/transformer", json={"prompt": "a", "bogus": 1}), 422)
    assert "param" not in error and "code" not in error


def test_caption_model_completes_text_and_chats_with_images(app_client):
    text_only = app_client.post("/v1/completions", json={"model": "vlm", "prompt": "the quick", "max_tokens": 3})
    assert text_only.status_code == 200, text_only.text
    part = {"type": "image_url", "image_url": {"url": png_data_url(1)}}
    e = error_of(app_client.post("/v1/chat/completions", json={
        "model": "vlm", "messages": [{"role": "user", "content": [part]}]}), 422)
    assert "chat template" in e["message"]  # the tiny vlm's tokenizer has none


def test_a_text_only_caption_prompt_with_the_image_placeholder_is_refused_as_predict_refuses_it(app_client):
    """Without an image, a placeholder in a /v1 prompt was embedded with no image behind it (200, silently);
    /predict refused the same. The error names the /v1 field in its message too (not prompt_token_ids)."""
    placeholder = app_client.get("/models/vlm").json()["io"]["image_token_id"]
    e = error_of(app_client.post("/v1/completions", json={"model": "vlm", "prompt": [placeholder, 5],
                                                          "max_tokens": 3}), 422)
    assert e["field"] == "prompt" and "image placeholder" in e["message"] and "prompt_token_ids" not in e["message"]
    e = error_of(app_client.post("/v1/completions", json={"model": "vlm", "prompt": [[]], "max_tokens": 3}), 422)
    assert e["field"] == "prompt" and "prompt_token_ids" not in e["message"], e



def test_chat_content_parts_on_a_text_model_are_joined(app_client):
    as_parts = app_client.post("/v1/chat/completions", json={
        "model": "chat", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                  {"type": "text", "text": "there"}]}]})
    as_text = app_client.post("/v1/chat/completions", json={
        "model": "chat", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hello there"}]})
    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]
    assert as_parts.json()["usage"] == as_text.json()["usage"]


def test_chat_images_are_capped(app_client):
    part = {"type": "image_url", "image_url": {"url": png_data_url(0)}}
    e = error_of(app_client.post("/v1/chat/completions", json={
        "model": "vlm", "messages": [{"role": "user", "content": [part] * 17}]}), 422)
    assert e["field"] == "messages" and "limit of 16" in e["message"]


def test_v1_errors_use_v1_field_names(app_client):
    e = error_of(app_client.post("/v1/completions", json={"model": "chat", "prompt": "x" * 1000, "max_tokens": 64}),
                 422)
    assert e["field"] == "max_tokens" and "max_new_tokens" not in e["message"]
    # a prompt that alone fills the context names the prompt (a chat's: its messages)
    e = error_of(app_client.post("/v1/completions", json={"model": "chat", "prompt": "x" * 3000, "max_tokens": 4}),
                 422)
    assert e["field"] == "prompt" and "shorten the prompt" in e["message"]
    e = error_of(app_client.post("/v1/chat/completions", json={"model": "chat", "messages": [
        {"role": "user", "content": "x" * 3000}]}), 422)
    assert e["field"] == "messages" and "the messages are" in e["message"] and "the messages is" not in e["message"]
    e = error_of(app_client.post("/v1/chat/completions", json={"model": "chat", "max_completion_tokens": 64,
                                                               "messages": [{"role": "user", "content": "x" * 1000}]}),
                 422)
    assert e["field"] == "max_completion_tokens" and "max_tokens" not in e["message"]  # the name it sent


def test_a_prompt_of_megabytes_is_refused_off_the_model_thread(app_client, monkeypatch):
    """A prompt is rendered, tokenized and checked for its length before the request queues (on a copy of the
    tokenizer, in the thread pool), so a prompt of megabytes never holds up the model thread, where the other
    clients' tokens are made."""
    import threading

    from vla_foundry.pipelines.text import TextPipeline

    encoded_on = []
    real = TextPipeline.encode_prompts

    def encode_prompts(self, prompts, *args, **kwargs):
        if prompts is not None:  # text to tokenize (token rows are only checked)
            encoded_on.append(threading.current_thread().name)
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(TextPipeline, "encode_prompts", encode_prompts)
    big = "the robot " * 200_000  # 2 MB
    for path, body in (("/v1/completions", {"prompt": big}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]})):
        e = error_of(app_client.post(path, json={"model": "chat", "max_tokens": 4, **body}), 422)
        assert e["field"] in ("prompt", "messages")
    ok = app_client.post("/v1/completions", json={"model": "chat", "prompt": "the robot", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert len(encoded_on) == 3 and not any(name.startswith("model-") for name in encoded_on), encoded_on


def test_a_stream_adds_up_to_the_completion_when_the_tokenizer_cleans_up_spaces(tmp_path):
    """A WordPiece model (its decode cleans up tokenization spaces: " ' m" → "'m"), on a live server, through the
    official ``openai`` client: a client that joins a stream's text deltas gets exactly the text the same request
    gets without streaming, which is the text of its tokens decoded whole (as ``/predict`` gives them)."""
    import httpx

    from tests.vla_foundry.test_streamed_text import wordpiece_tokenizer

    tokenizer = wordpiece_tokenizer()
    path = tmp_path / "wordpiece"
    save_experiment(tiny_model(tiny_transformer_params(vocab_size=len(tokenizer), max_seq_len=256), seed=3), path,
                    tokenizer=tokenizer)
    cleaned = 0
    with live_server(["--checkpoint", f"{path}=wp"], tmp_path / "nodemo") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        for seed in range(8):
            request = {"model": "wp", "prompt": ["i ' m the robot", "it ' s up . don ' t"], "max_tokens": 100,
                       "seed": seed}
            plain = client.completions.create(**request).choices
            joined = ["", ""]
            for chunk in client.completions.create(**request, stream=True):
                for choice in chunk.choices:
                    joined[choice.index] += choice.text
            predicted = httpx.post(f"{base}/predict/transformer", timeout=60, json={
                "model": "wp", "prompt": request["prompt"], "max_new_tokens": 100, "temperature": 1.0, "top_k": 0,
                "top_p": 1.0, "seed": seed}).json()["completions"]  # (OpenAI's sampling defaults)
            for row in range(2):
                assert joined[row] == plain[row].text == predicted[row]["text"], (seed, row)
                raw = tokenizer.decode(predicted[row]["token_ids"], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
                cleaned += raw != predicted[row]["text"]
    assert cleaned >= 2, "the clean-up seldom changed these completions: the test would prove little"


def test_a_request_without_a_length_is_served_under_a_cap_below_the_default(chat_checkpoint):
    """Under VLA_MAX_NEW_TOKENS = 8, below the completions API's default of 16 tokens and /predict's 20, a request
    that asks no length gets at most the cap (before: 422 'max_tokens must be <= 8; got 16', a value the client
    never sent); one that asks for more than the cap is still refused, naming its field."""
    with serving(DeploymentSpec(name="chat", checkpoint=str(chat_checkpoint)), max_new_tokens=8) as c:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)
        completion = client.completions.create(model="chat", prompt="hi", temperature=0, seed=0)
        assert completion.usage.completion_tokens <= 8
        predicted = c.post("/predict/transformer", json={"model": "chat", "prompt": "hi", "temperature": 0})
        assert predicted.status_code == 200 and len(predicted.json()["completions"][0]["token_ids"]) <= 8
        for path, body, field in (("/v1/completions", {"prompt": "hi", "max_tokens": 9}, "max_tokens"),
                                  ("/predict/transformer", {"prompt": "hi", "max_new_tokens": 9}, "max_new_tokens")):
            refused = c.post(path, json={"model": "chat", **body})
            assert refused.status_code == 422 and refused.json()["error"]["field"] == field, refused.text


# Hugging Face's SmolVLM-Instruct chat template (transformers' SmolVLM default without video): it reads every
# message's content as a list of parts.
SMOLVLM_TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
                    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
                    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def test_every_messages_text_reaches_a_processor_template_that_reads_parts(tmp_path, tiny_tokenizer, monkeypatch):
    """A captioner whose HF processor has SmolVLM's template: the text of a text-only chat, and a system message
    beside an image, reach the model (before, string content rendered as nothing there: the same prompt whatever
    the user wrote, answered 200)."""
    import vla_foundry.demo.hf_models as hf_models

    monkeypatch.setattr(hf_models, "IDEFICS3_CHAT_TEMPLATE", SMOLVLM_TEMPLATE)
    path = hf_models.build_tiny_idefics3(tmp_path / "smolvlm", tiny_tokenizer)
    with serving(DeploymentSpec(name="smol", checkpoint=str(path)), max_new_tokens=8, max_batch=4) as c:

        def prompt_tokens(messages) -> int:
            reply = c.post("/v1/chat/completions", json={"model": "smol", "messages": messages, "max_tokens": 1,
                                                         "temperature": 0})
            assert reply.status_code == 200, reply.text
            return reply.json()["usage"]["prompt_tokens"]

        words = "the robot picks up the red block "
        assert prompt_tokens([{"role": "user", "content": words * 5}]) > prompt_tokens(
            [{"role": "user", "content": "hi"}]) + 10
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(1)}},
                                            {"type": "text", "text": "what is it"}]}
        assert prompt_tokens([{"role": "system", "content": words * 3}, user]) > prompt_tokens([user]) + 10


def test_a_video_token_in_a_chat_is_refused_naming_messages_through_the_official_client(tmp_path, tiny_tokenizer):
    """Qwen2-VL's processor refuses a video token without a video; through ``/v1`` that refusal named `images`
    (OpenAI's `param`), which the client never sent, and a chat with no image, which skips the processor, was
    answered 200 with the video placeholder embedded as a word. The official client now reads `messages` in both."""
    from transformers import AutoProcessor

    from vla_foundry.demo.hf_models import build_tiny_qwen2_vl

    path = build_tiny_qwen2_vl(tmp_path / "qwen2_vl", tiny_tokenizer)
    with serving(DeploymentSpec(name="qwen", checkpoint=str(path)), max_new_tokens=8, max_batch=4) as c:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)
        video = AutoProcessor.from_pretrained(path).video_token
        image = {"type": "image_url", "image_url": {"url": png_data_url(1)}}
        for content in (f"what is {video} here", [image, {"type": "text", "text": f"what is {video} here"}]):
            with pytest.raises(openai.UnprocessableEntityError) as refused:
                client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": content}],
                                               max_tokens=2, seed=0)
            assert refused.value.param == "messages" and "video" in refused.value.message
        fine = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": [image]}],
                                              max_tokens=2, seed=0)
        assert fine.choices[0].finish_reason in ("stop", "length")
