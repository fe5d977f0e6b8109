"""Bad input gets one clear error shape and changes nothing for anyone else."""

import asyncio
import base64
import threading
import time

import msgpack
import pytest
from fastapi.routing import APIRoute

from service import DeploymentSpec, Settings
from service.deployments import Deployment
from service.errors import ApiError
from service.executor import ModelExecutor, QueueFull
from service.middleware import DecodedBodyRoute
from service.modalities.base import ModelCall, each
from tests.factories import PREDICT_REQUESTS
from tests.service.conftest import serving

SEEDED = {"prompt": ["the quick", "a robot"], "max_new_tokens": 6, "temperature": 1.0, "seed": 5}

BAD_PREDICT = [
    ({"prompt": "the", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "the", "max_new_tokens": 65}, 422, "max_new_tokens"),
    ({"prompt": "the", "temperature": -0.5}, 422, "temperature"),
    ({"prompt": "the", "top_p": 0}, 422, "top_p"),
    ({"prompt": []}, 422, "prompt"),
    ({"prompt_token_ids": [[1, 2], []]}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": [1, 300]}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": [-1]}, 422, "prompt_token_ids"),
    ({"prompt": ["a"] * 5}, 422, "prompt"),
    ({"prompt": "the", "prompt_token_ids": [1]}, 422, "prompt"),
    ({}, 422, "prompt"),
    ({"prompt": "the", "max_tokens": 3}, 422, "max_tokens"),
    ({"prompt": "the", "seed": -1}, 422, "seed"),
    ({"prompt_token_ids": {"dtype": "float32", "shape": [2], "data": "AAAAAAAAAAA="}}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": {"dtype": "int32", "shape": [3], "data": "AAAAAAAAAAA="}}, 422, "prompt_token_ids"),
    ({"prompt": "the", "model": "nope"}, 404, "model"),
    ({"prompt": "the", "temperature": float("inf")}, 422, "temperature"),
    ({"prompt": "the", "top_p": float("nan")}, 422, "top_p"),
    ({"prompt_token_ids": ["1", "2"]}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": [True, False]}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": [1.0]}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": {"dtype": "int64", "shape": [True], "data": "AAAAAAAAAAA="}}, 422, "prompt_token_ids"),
    ({"prompt_token_ids": {"dtype": "int64", "shape": [2**62, 4], "data": ""}}, 422, "prompt_token_ids"),
    ({"prompt": "the", "stop": ""}, 422, "stop"),
    ({"prompt": "bad \ud800"}, 422, "prompt"),
    # counts are integers, not booleans, strings or floats that happen to convert
    ({"prompt": "the", "seed": True}, 422, "seed"),
    ({"prompt": "the", "seed": 1.5}, 422, "seed"),
    ({"prompt": "the", "max_new_tokens": "2"}, 422, "max_new_tokens"),
    ({"prompt": "the", "max_new_tokens": 2.0}, 422, "max_new_tokens"),
    # and numbers are numbers: true is not 1.0, "0.5" is not 0.5
    ({"prompt": "the", "temperature": True}, 422, "temperature"),
    ({"prompt": "the", "top_p": "0.5"}, 422, "top_p"),
    ({"prompt": "the", "timeout_s": "30"}, 422, "timeout_s"),
    # and switches are booleans, not "no" or 0
    ({"prompt": "the", "use_cache": "no"}, 422, "use_cache"),
    ({"prompt": "the", "use_cache": 0}, 422, "use_cache"),
]


def post_json(client, path, body):
    """Send the body as Python's json does, NaN and Infinity included (httpx refuses them)."""
    import json

    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def assert_error(response, status, field=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) <= {"type", "message", "field", "request_id"} and error["message"]
    assert "Traceback" not in error["message"] and "/site-packages/" not in error["message"]
    if field:
        assert error.get("field") == field, error


def test_bad_predict_inputs_are_refused_and_change_nothing(client):
    before = client.post("/predict/transformer", json=SEEDED).json()
    for body, status, field in BAD_PREDICT:
        assert_error(post_json(client, "/predict/transformer", body), status, field)
    after = client.post("/predict/transformer", json=SEEDED).json()
    assert before["completions"] == after["completions"]


def test_messages_say_what_is_allowed(client):
    error = client.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 65}).json()["error"]
    assert error["message"] == "max_new_tokens must be <= 64; got 65"
    error = client.post("/predict/transformer", json={"prompt_token_ids": [1, 300]}).json()["error"]
    assert "outside [0, 300)" in error["message"]


@pytest.mark.parametrize("body", [{"input_ids": [[1]]}, {"input_ids": []}, {"texts": ["a"], "input_ids": [[1, 2]]},
                                  {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]},
                                  {"input_ids": [[1, 2, 999]]},
                                  {"input_ids": [[1, 2, 3]], "attention_mask": [[0, 0, 0]]},
                                  {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 5, 1]]},
                                  {"input_ids": [[0, 0, 5, 17]], "attention_mask": [[0, 0, 1, 1]]}])
def test_bad_evaluate_inputs(client, body):
    assert_error(client.post("/evaluate/transformer", json=body), 422)


def test_left_padding_in_an_evaluation_is_refused_naming_the_mask(client):
    """The loss reads each row from its first column (no mask goes into the causal model): padding before the
    tokens would change their loss, so it is refused; the same row padded on the right gets the unpadded loss."""
    left = client.post("/evaluate/transformer", json={"input_ids": [[0, 0, 5, 17, 42]],
                                                      "attention_mask": [[0, 0, 1, 1, 1]]})
    assert_error(left, 422)
    assert left.json()["error"]["field"] == "attention_mask" and "right" in left.json()["error"]["message"]
    alone = client.post("/evaluate/transformer", json={"input_ids": [[5, 17, 42]]}).json()
    right = client.post("/evaluate/transformer", json={"input_ids": [[5, 17, 42, 0, 0]],
                                                       "attention_mask": [[1, 1, 1, 0, 0]]}).json()
    assert right["loss"] == pytest.approx(alone["loss"], abs=1e-6)


def test_malformed_bodies_are_400(client):
    as_json, as_msgpack = {"content-type": "application/json"}, {"content-type": "application/msgpack"}
    assert_error(client.post("/predict/transformer", content=b"{not json", headers=as_json), 400)
    assert_error(client.post("/predict/transformer", json=[1, 2]), 400)
    assert_error(client.post("/predict/transformer", content=b"\xc1\xc1", headers=as_msgpack), 400)
    object_array = {"__ndarray__": True, "data": b"", "dtype": "O", "shape": [0]}
    refused = client.post("/predict/transformer", content=msgpack.packb({"prompt_token_ids": object_array}),
                          headers=as_msgpack)
    assert_error(refused, 422)
    assert "object arrays are refused" in refused.json()["error"]["message"]
    for body in (msgpack.packb({"prompt": "a", "temperature": float("nan")}),
                 msgpack.packb({"prompt": "a", "when": msgpack.Timestamp(1)}, datetime=False),
                 msgpack.packb({"prompt": "a", "x": msgpack.ExtType(5, b"zz")})):
        assert_error(client.post("/predict/transformer", content=body, headers=as_msgpack), 422)
    response = client.post("/predict/transformer", content=b"<prompt/>", headers={"content-type": "application/xml"})
    assert_error(response, 415)
    response = client.post("/predict/transformer", content=b'{"prompt": "\xff\xfe"}', headers=as_json)
    assert_error(response, 400)
    assert "not UTF-8" in response.json()["error"]["message"]  # what is wrong, not only that parsing failed
    # msgpack keeps bytes as bytes: where a string belongs, undecodable bytes are a named 422, not a crash.
    response = client.post("/predict/transformer", content=msgpack.packb({"prompt": b"\xff\xfe"}, use_bin_type=True),
                           headers={"content-type": "application/msgpack"})
    assert_error(response, 422, "prompt")


CRAFTED_ARRAYS = {  # each once got a 500 from numpy's own errors
    "subarray dtype": {"dtype": "(99999999999,)u1", "shape": [1], "data": b"\0"},
    "zero-size dtype": {"dtype": "U", "shape": [1], "data": b""},
    "unindexable zero-size shape": {"dtype": "|u1", "shape": [0, 2**63], "data": b""},
    "too many dimensions": {"dtype": "|u1", "shape": [1] * 40, "data": b"\0"},
    "datetime dtype": {"dtype": "<M8[s]", "shape": [1], "data": b"\0" * 8},
}


@pytest.mark.parametrize("wire", ["json", "msgpack"])
@pytest.mark.parametrize("array", list(CRAFTED_ARRAYS.values()), ids=list(CRAFTED_ARRAYS))
def test_crafted_arrays_are_refused_not_crashed_on(client, array, wire):
    if wire == "msgpack":
        body = {"prompt_token_ids": {"__ndarray__": True, **array}}
        response = client.post("/predict/transformer", content=msgpack.packb(body, use_bin_type=True),
                               headers={"content-type": "application/msgpack"})
    else:
        body = {"prompt_token_ids": {**array, "data": base64.b64encode(array["data"]).decode()}}
        response = client.post("/predict/transformer", json=body)
    assert_error(response, 422)


@pytest.mark.parametrize("depth", [100, 990])  # 990: about Python's recursion limit (msgpack unpacks it)
def test_deeply_nested_msgpack_is_refused_not_crashed_on(client, depth):
    body = b"\x82\xa6prompt\xa1a\xa1x" + b"\x91" * depth + b"\x01"  # {"prompt": "a", "x": [[...[1]...]]}
    assert msgpack.unpackb(body)["prompt"] == "a"
    response = client.post("/predict/transformer", content=body, headers={"content-type": "application/msgpack"})
    assert_error(response, 422)
    assert "deep" in response.json()["error"]["message"]
    assert response.json()["error"].get("field") is None  # the body as a whole, not a path 64 keys long


def test_every_body_route_reads_the_unpacked_msgpack_body(client):
    """The middleware hands msgpack bodies to routes through the scope; a route of another class would try to
    parse msgpack as JSON."""
    def routes(items):  # included routers (health, models, the OpenAI API) hold their own routes
        for r in items:
            yield from routes(r.original_router.routes) if hasattr(r, "original_router") else [r]

    body_routes = [r for r in routes(client.app.routes) if isinstance(r, APIRoute) and r.body_field is not None]
    assert len(body_routes) > 10
    assert all(isinstance(r, DecodedBodyRoute) for r in body_routes), \
        [r.path for r in body_routes if not isinstance(r, DecodedBodyRoute)]


def test_body_over_the_cap_is_413(client):
    big = {"prompt": "x" * (70 * 1024)}
    assert_error(client.post("/predict/transformer", json=big), 413)


def test_a_page_of_another_origin_cannot_post_a_body_typed_as_text_or_a_form(client):
    """Bodies typed as text or as a form are read as JSON (``curl -d`` sends a form type), and a browser sends those
    types across origins without asking the server first: from another origin's page they are refused (415), so a
    web page cannot drive a server that runs without keys. curl (no Origin) and the server's own page are served."""
    body = b'{"prompt": "a", "max_new_tokens": 1}'
    for media in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", ""):
        for origin in ("https://evil.example", "null"):
            refused = client.post("/predict/transformer", content=body,
                                  headers={"content-type": media, "origin": origin})
            assert_error(refused, 415)
            assert "another origin" in refused.json()["error"]["message"]
        assert client.post("/predict/transformer", content=body, headers={"content-type": media}).status_code == 200
        same = client.post("/predict/transformer", content=body,
                           headers={"content-type": media, "origin": "http://testserver"})
        assert same.status_code == 200, same.text
    as_json = client.post("/predict/transformer", content=body,  # (JSON takes a CORS preflight, which fails here)
                          headers={"content-type": "application/json", "origin": "https://evil.example"})
    assert as_json.status_code == 200


def test_listed_origins_pass_and_a_server_with_keys_checks_none(tiny_checkpoints):
    """VLA_ALLOWED_ORIGINS lets a listed page's forms through (a proxy that rewrites Host, a web app elsewhere);
    with API keys nothing is refused for its origin: such a request needs a key, which a page cannot add to it."""
    spec = DeploymentSpec(name="lm", checkpoint=str(tiny_checkpoints["transformer"]))
    body, text = b'{"prompt": "a", "max_new_tokens": 1}', {"content-type": "text/plain"}
    with serving(spec, allowed_origins="https://app.example, https://other.example/") as c:
        assert c.post("/predict/transformer", content=body, headers={**text, "origin": "https://app.example"}
                      ).status_code == 200
        assert c.post("/predict/transformer", content=body, headers={**text, "origin": "https://evil.example"}
                      ).status_code == 415
        for spelled in ("https://APP.example:443", "https://app.example/"):  # as browsers compare origins
            assert c.post("/predict/transformer", content=body, headers={**text, "origin": spelled}).status_code == 200
    assert Settings(allowed_origins=["https://a.example", "http://b.example:8080"]).allowed_origin_list() == {
        ("https", "a.example"), ("http", "b.example:8080")}  # (a YAML list too)
    with pytest.raises(ValueError, match="not a web origin"):
        Settings(allowed_origins="app.example")
    with serving(spec, api_keys="k") as c:
        keyed = {**text, "origin": "https://evil.example", "authorization": "Bearer k"}
        assert c.post("/predict/transformer", content=body, headers=keyed).status_code == 200
        assert c.post("/predict/transformer", content=body, headers={**text, "origin": "https://evil.example"}
                      ).status_code == 401


def test_unknown_type_route_and_deployment_are_404(client):
    response = client.post("/predict/transformr", json={"prompt": "a"})
    assert_error(response, 404)
    assert "closest is 'transformer'" in response.json()["error"]["message"]
    assert_error(client.post("/evaluate/unknown", json={}), 404)
    assert_error(client.get("/models/nope"), 404, "name")  # the path parameter
    assert_error(client.get("/nowhere"), 404)


def test_errors_follow_accept_msgpack(client):
    response = client.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 0},
                           headers={"accept": "application/msgpack"})
    assert response.status_code == 422
    assert msgpack.unpackb(response.content)["error"]["field"] == "max_new_tokens"


def test_loading_deployment_is_503_with_retry_after(tiny_checkpoints):
    release = threading.Event()
    deployment = Deployment(DeploymentSpec(checkpoint=str(tiny_checkpoints["transformer"])), Settings(),
                            prepare=release.wait)
    deployment.start_loading()
    try:
        with pytest.raises(ApiError) as err:
            asyncio.run(deployment.call(ModelCall(each(lambda pipeline, item: None), None)))
        assert err.value.status == 503 and err.value.retry_after
    finally:
        release.set()
        deployment.executor.shutdown()


def test_full_queue_is_refused_not_buffered():
    gate = threading.Event()
    executor = ModelExecutor("tiny", max_queue=1)
    try:
        running = executor.submit(gate.wait)
        while not running.running():
            pass
        executor.submit(lambda: 1)
        with pytest.raises(QueueFull, match="1 requests waiting"):
            executor.submit(lambda: 2)
    finally:
        gate.set()
        executor.shutdown()


def test_executor_serializes_work_on_one_thread():
    executor = ModelExecutor("serial", max_queue=16)
    seen, active = [], []
    lock = threading.Lock()

    overlaps = []

    def job(i):
        with lock:
            active.append(i)
            overlaps.append(len(active))
        time.sleep(0.005)  # long enough that a second worker would overlap
        seen.append((i, threading.current_thread().name))
        with lock:
            active.remove(i)
        return i

    futures = [executor.submit(job, i) for i in range(10)]
    assert [f.result(timeout=5).value for f in futures] == list(range(10))
    assert {name for _, name in seen} == {"model-serial"}
    assert max(overlaps) == 1
    executor.shutdown()


def test_overloaded_deployment_answers_503(tiny_checkpoints):
    spec = DeploymentSpec(name="busy", checkpoint=str(tiny_checkpoints["transformer"]))
    with serving(spec, max_queue=1) as client:
        deployment = client.app.state.manager.get("busy")
        gate = threading.Event()
        running = deployment.executor.submit(gate.wait)
        while not running.running():
            pass
        queued = deployment.executor.submit(lambda: None)
        try:
            response = client.post("/predict/transformer", json={"prompt": "a"})
            assert_error(response, 503)
            assert response.headers["retry-after"] == "1" and response.json()["error"]["type"] == "overloaded"
        finally:
            gate.set()
        running.result(timeout=30), queued.result(timeout=30)  # the queue is empty again (else a race with it)
        assert client.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 2}).status_code == 200


def test_a_body_of_too_many_keys_is_413_before_validation(tiny_checkpoints):
    """Each unknown key would cost its own validation error on the event loop: a body over the key cap is refused
    while it is parsed (JSON and msgpack alike, keys counted at every depth), naming the setting."""
    spec = DeploymentSpec(checkpoint=str(tiny_checkpoints["transformer"]))
    with serving(spec, max_body_keys=100) as client:
        flat = {"prompt": "a", **{f"k{i}": 0 for i in range(150)}}
        nested = {"prompt": "a", "x": [{"a": 1, "b": 2}] * 60}
        for body in (flat, nested):
            response = client.post("/predict/transformer", json=body)
            assert_error(response, 413)
            assert "VLA_MAX_BODY_KEYS" in response.json()["error"]["message"]
        packed = client.post("/predict/transformer", content=msgpack.packb(flat),
                             headers={"content-type": "application/msgpack"})
        assert_error(packed, 413)
        few = client.post("/predict/transformer", json={"prompt": "a", **{f"k{i}": 0 for i in range(20)}})
        assert_error(few, 422)  # under the cap: validated as before, the unknown keys named
        assert client.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 2}).status_code == 200


def _with_text(body, suffix: str):
    """``body`` with ``suffix`` appended to its first text (not an image's data URL), and that text's field."""
    import copy

    body = copy.deepcopy(body)

    def visit(value, where):
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            here = f"{where}.{key}" if isinstance(value, dict) and where else key if isinstance(value, dict) \
                else f"{where}[{key}]"
            if isinstance(item, str) and not item.startswith("data:") and key not in ("model", "scheduler", "dtype"):
                value[key] = item + suffix
                return here
            found = visit(item, here)
            if found:
                return found
        return None

    return body, visit(body, "")


@pytest.mark.parametrize("model_type", sorted(PREDICT_REQUESTS))
def test_a_lone_surrogate_in_any_text_is_refused_naming_it(client, model_type):
    """JSON can spell a lone UTF-16 surrogate (\\ud800), which no tokenizer takes: every route refuses it with 422
    naming the field (the image, caption and CLIP routes answered 500), and an emoji's surrogate pair is text."""
    body, field = _with_text(PREDICT_REQUESTS[model_type], " \ud800")
    assert field is not None, model_type
    assert_error(post_json(client, f"/predict/{model_type}", {**body, "model": f"tiny-{model_type}"}), 422, field)
    emoji, _ = _with_text(PREDICT_REQUESTS[model_type], " \U0001F916")
    response = post_json(client, f"/predict/{model_type}", {**emoji, "model": f"tiny-{model_type}"})
    assert response.status_code == 200, response.text


def test_a_body_nested_thousands_deep_is_malformed_not_a_server_error(client):
    """JSON nested deeper than the parser recurses (a RecursionError, answered 500 before) is a malformed body."""
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = client.post("/predict/transformer", content=deep, headers={"content-type": "application/json"})
    assert_error(response, 400)
    assert "flatter" in response.json()["error"]["message"]


def test_an_empty_body_is_told_so(client):
    response = client.post("/predict/stable_diffusion", content=b"", headers={"content-type": "application/json"})
    assert_error(response, 422)
    assert "no body" in response.json()["error"]["message"] and "None" not in response.json()["error"]["message"]


def test_replies_say_they_vary_with_accept(client):
    """The same URL answers JSON, msgpack or a PNG by the request's Accept: caches must key on it."""
    assert client.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 2}).headers["vary"] == "Accept"
    assert client.get("/models").headers["vary"] == "Accept"


def test_an_empty_batch_names_the_field_that_was_sent(client):
    for field in ("texts", "input_ids"):
        response = client.post("/evaluate/transformer", json={field: []})
        assert_error(response, 422)
        assert response.json()["error"]["field"] == field


@pytest.mark.parametrize("route", ["/predict/vlm", "/predict/vlm_hf", "/evaluate/vlm_hf"])
def test_a_caption_with_an_empty_image_list_is_refused_naming_it(client, route):
    response = client.post(route, json={"images": [[]], "texts": ["a red square"]} if "evaluate" in route
                           else {"images": [[]]})
    assert_error(response, 422)
    assert response.json()["error"]["field"] == "images[0]"


def test_images_that_fill_the_context_alone_are_blamed_not_the_prompt(client):
    """16 images' placeholders fill the tiny captioner's context before any text: the fix is fewer images."""
    from tests.factories import png_data_url

    response = client.post("/predict/vlm", json={"images": [png_data_url(1)] * 16})
    assert_error(response, 422)
    assert response.json()["error"]["field"] == "images" and "fewer images" in response.json()["error"]["message"]
