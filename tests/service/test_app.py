"""The app in process (TestClient runs the lifespan): every registered type, discovery, codecs."""

import base64
import threading

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import DeploymentSpec, Settings, create_app
from service.codecs import encode_array
from service.images import decode_image_value
from tests.factories import EVALUATE_REQUESTS, PREDICT_REQUESTS
from tests.openpi.msgpack_numpy import openpi_pack_array, openpi_unpack_array
from tests.service.conftest import serving, wait_ready
from vla_foundry.models import list_registered_batch_handlers, list_registered_models
from vla_foundry.pipelines import load_pipeline

TYPES = list_registered_models()


def test_models_lists_registry_and_deployments(client):
    body = client.get("/models").json()
    assert body["registered_models"] == list_registered_models()
    assert body["registered_batch_handlers"] == list_registered_batch_handlers()
    names = {d["name"]: d for d in body["deployments"]}
    for model_type in TYPES:
        info = names[f"tiny-{model_type}"]
        assert info["status"] == "ready" and info["type"] == model_type and info["error"] is None
        assert info["device"] == "cpu" and info["dtype"] == "float32"
        # A bare HF directory (the tiny vlm_hf) is its own checkpoint: its weights file, no training step.
        bare_hf = info["checkpoint"]["file"] == "model.safetensors"
        assert info["checkpoint"]["file"].startswith("checkpoint_") or bare_hf
        assert info["checkpoint"]["step"] == (None if bare_hf else 0)
        assert info["endpoints"] == {"predict": f"/predict/{model_type}", "evaluate": f"/evaluate/{model_type}"}
        assert info["io"], "io tells a client how to build a request"
    assert client.get("/models/tiny-transformer").json()["io"]["vocab_size"] == 300


@pytest.mark.parametrize("model_type", TYPES)
def test_predict_every_type(client, model_type):
    body = PREDICT_REQUESTS[model_type]
    first = client.post(f"/predict/{model_type}", json=body)
    assert first.status_code == 200, first.text
    payload = first.json()
    assert payload["model"] == f"tiny-{model_type}"
    timings = {"queue", "preprocess", "infer", "total", "batch_size"}
    assert {"queue", "infer", "total"} <= set(payload["timing_ms"]) <= timings
    again = client.post(f"/predict/{model_type}", json=body).json()
    for reply in (payload, again):  # time-dependent: the timings, and a chunk's validity (receive time + …)
        reply.pop("timing_ms"), reply.pop("valid_until", None)
    assert payload == again, "same request and seed, same answer"


@pytest.mark.parametrize("model_type", TYPES)
def test_evaluate_every_type_matches_in_process(client, tiny_checkpoints, model_type):
    body = EVALUATE_REQUESTS[model_type]
    response = client.post(f"/evaluate/{model_type}", json=body)
    assert response.status_code == 200, response.text
    remote = response.json()
    local_args = dict(body)
    if model_type == "diffusion_policy":  # observations are checked and decoded by the service's own models
        from service.modalities.action import ActionEvaluateRequest, check_evaluate

        pipeline = load_pipeline(tiny_checkpoints[model_type])
        parsed = check_evaluate(pipeline, ActionEvaluateRequest(**body))
        local = pipeline.evaluate(parsed.samples, parsed.action_windows, seed=parsed.seed,
                                  condition_on_past=parsed.condition_on_past)
        assert remote["loss"] == pytest.approx(local["loss"], abs=1e-6) and remote["seed"] == body["seed"]
        return
    if "images" in body:  # the pipeline takes decoded pixels (one list per caption, or a flat list)
        decode = lambda im: decode_image_value(im, max_pixels=10**6, field="images")  # noqa: E731
        local_args["images"] = [[decode(im) for im in v] if isinstance(v, list) else decode(v) for v in body["images"]]
    local = load_pipeline(tiny_checkpoints[model_type]).evaluate(**local_args)
    assert remote["loss"] == pytest.approx(local["loss"], abs=1e-6)
    assert remote["num_samples"] == local["num_samples"] and remote["seed"] == body["seed"]


def test_text_completion_shape(client):
    payload = client.post("/predict/transformer", json={"prompt": "the quick", "max_new_tokens": 4,
                                                        "temperature": 0}).json()
    (completion,) = payload["completions"]
    assert isinstance(completion["text"], str) and len(completion["token_ids"]) <= 4
    assert completion["finish_reason"] in ("stop", "length")
    usage = payload["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == len(completion["token_ids"])


def test_msgpack_in_and_out_with_typed_arrays(client):
    ids = np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int32)
    request = {"prompt_token_ids": encode_array(ids, binary=True), "max_new_tokens": 3, "temperature": 0}
    response = client.post("/predict/transformer", content=msgpack.packb(request, use_bin_type=True),
                           headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/msgpack"
    reply = msgpack.unpackb(response.content)
    as_json = client.post("/predict/transformer", json={"prompt_token_ids": ids.tolist(), "max_new_tokens": 3,
                                                        "temperature": 0}).json()
    assert [c["token_ids"] for c in reply["completions"]] == [c["token_ids"] for c in as_json["completions"]]
    # JSON arrays use base64 data in the same convention
    response = client.post("/predict/transformer", json={"prompt_token_ids": encode_array(ids, binary=False),
                                                         "max_new_tokens": 3, "temperature": 0})
    assert [c["token_ids"] for c in response.json()["completions"]] == [c["token_ids"] for c in as_json["completions"]]


def test_health(client):
    assert client.get("/health/live").json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert client.get("/healthz").json() == ready.json()
    for path in ("/health/live", "/health/ready", "/healthz"):  # as load balancers probe
        assert client.head(path).status_code == 200, path  # (it was 405)


def test_openapi_has_a_request_schema_per_type(client):
    spec = client.get("/openapi.json").json()
    for model_type in TYPES:
        camel = "".join(p.capitalize() for p in model_type.split("_"))
        for kind in ("predict", "evaluate"):
            operation = spec["paths"][f"/{kind}/{model_type}"]["post"]
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith(f"{camel}{kind.capitalize()}Request")
    assert client.get("/docs").status_code == 200


def test_a_deployment_of_another_type_is_pointed_to_its_own_route(client):
    names = {d["type"]: d["name"] for d in client.get("/models").json()["deployments"]}
    for kind, body in (("predict", {"prompt": "a"}), ("evaluate", {"texts": ["a b"]})):
        response = client.post(f"/{kind}/transformer", json={"model": names["vlm"], **body})
        assert response.status_code == 404 and response.json()["error"]["field"] == "model"
        assert f"POST to /{kind}/vlm" in response.json()["error"]["message"]


def test_openapi_publishes_what_the_server_takes(client):
    """The app's caps as maxima, the bounds checked, and every token-id form a text request takes."""
    schemas, settings = client.get("/openapi.json").json()["components"]["schemas"], client.app.state.settings
    text = schemas["TransformerPredictRequest"]["properties"]
    image = schemas["StableDiffusionPredictRequest"]["properties"]
    assert text["max_new_tokens"]["maximum"] == settings.max_new_tokens
    assert image["num_images"]["maximum"] == settings.max_images
    steps = next(b for b in image["num_inference_steps"]["anyOf"] if b.get("type") == "integer")
    assert steps["maximum"] == settings.max_inference_steps
    guidance = next(b for b in image["guidance_scale"]["anyOf"] if b.get("type") == "number")
    assert guidance["minimum"] == 0 and guidance["maximum"] == 100
    assert [f["type"] for f in text["prompt_token_ids"]["anyOf"]] == ["array", "array", "object", "null"]
    for ids in ([5, 6], [[5, 6]], {"dtype": "<i8", "shape": [2], "data": "BQAAAAAAAAAGAAAAAAAAAA=="}):
        reply = client.post("/predict/transformer", json={"prompt_token_ids": ids, "max_new_tokens": 1})
        assert reply.status_code == 200, (ids, reply.text)


def test_failed_deployment_does_not_stop_the_others(tiny_checkpoints, tmp_path):
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config_model.yaml").write_text("type: transformer\nhidden_dim: 32\n")
    (broken / "checkpoints" / "checkpoint_1.pt").write_bytes(b"truncated")
    good = DeploymentSpec(name="good", checkpoint=str(tiny_checkpoints["transformer"]))
    with serving(good, DeploymentSpec(name="broken", checkpoint=str(broken))) as client:
        ready = wait_ready(client).json()
        # the public probe is terse: statuses only, no reason (it would name the checkpoint's path)
        assert ready == {"status": "ready", "deployments": {"good": "ready", "broken": "failed"}}
        info = client.get("/models/broken").json()  # the reason, behind the key where keys are set
        assert info["status"] == "failed" and "CheckpointError" in info["error"]
        assert "not a torch zip checkpoint" in info["error"]
        good = client.post("/predict/transformer", json={"model": "good", "prompt": "the", "max_new_tokens": 2})
        assert good.status_code == 200
        refused = client.post("/predict/transformer", json={"model": "broken", "prompt": "the"})
        assert refused.status_code == 503 and "failed to load" in refused.json()["error"]["message"]


def test_a_policy_setting_on_a_deployment_of_another_type_fails_its_load_naming_it(tiny_checkpoints):
    """``num_inference_steps: 5`` on an image deployment was taken and changed nothing (its requests' default
    stayed 20): the deployment fails instead, saying which settings apply to policies only. A policy takes them."""
    image = DeploymentSpec(name="image", checkpoint=str(tiny_checkpoints["stable_diffusion"]), num_inference_steps=5,
                           control_period_s=0.2)
    policy = DeploymentSpec(name="policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), num_inference_steps=3)
    with serving(image, policy) as client:
        info = client.get("/models/image").json()
        assert info["status"] == "failed"
        assert "num_inference_steps, control_period_s apply to policies only" in info["error"]
        assert client.get("/models/policy").json()["status"] == "ready"


def test_several_deployments_of_a_type_need_a_name(tiny_checkpoints):
    path = str(tiny_checkpoints["transformer"])
    with serving(DeploymentSpec(name="a", checkpoint=path), DeploymentSpec(name="b", checkpoint=path)) as client:
        response = client.post("/predict/transformer", json={"prompt": "the"})
        assert response.status_code == 422 and response.json()["error"]["field"] == "model"
        assert "a, b" in response.json()["error"]["message"]
        assert client.post("/predict/transformer", json={"prompt": "the", "model": "b"}).json()["model"] == "b"


@pytest.mark.slow
def test_no_deployment_serves_the_demo_pack_training_what_is_not_shipped(tmp_path, monkeypatch):
    import vla_foundry.demo as demo
    from vla_foundry.demo import transformer as transformer_demo
    from vla_foundry.demo import stable_diffusion as sd_demo
    from vla_foundry.demo import policy as policy_demo
    from vla_foundry.demo import vlm as vlm_demo

    monkeypatch.setattr(demo, "SHIPPED_PACK", tmp_path / "nothing-shipped")  # the training path
    # The real members train for hundreds of steps; 10 show the same path in seconds.
    monkeypatch.setitem(demo.BUILDERS, "demo-transformer",
                        lambda path, progress: transformer_demo.build(path, progress, steps=10))
    monkeypatch.setitem(demo.BUILDERS, "demo-vlm", lambda path, progress: vlm_demo.build(path, progress, steps=10))
    monkeypatch.setitem(demo.BUILDERS, "demo-stable_diffusion",
                        lambda path, progress: sd_demo.build(path, progress, steps=5))
    monkeypatch.setitem(demo.BUILDERS, "demo-diffusion_policy",
                        lambda path, progress: policy_demo.build(path, progress, steps=5))
    with serving(demo_dir=tmp_path / "demo") as client:
        infos = {d["name"]: d for d in client.get("/models").json()["deployments"]}
        assert set(infos) == set(demo.DEMO_MEMBERS)
        assert all(info["status"] == "ready" for info in infos.values()), infos
        info = infos["demo-transformer"]
        assert info["demo"]["random_weights"] is False and info["demo"]["train_steps"] == 10
        assert info["io"]["accepts"] == ["prompt", "prompt_token_ids"]
        assert infos["demo-transformer_hf"]["demo"]["random_weights"] is True
        assert infos["demo-vlm_hf"]["demo"]["random_weights"] is True
        completion = client.post("/predict/transformer", json={"prompt": "Shall I", "max_new_tokens": 5,
                                                               "temperature": 0}).json()["completions"][0]
        assert isinstance(completion["text"], str) and completion["token_ids"]
        image = vlm_demo.sample(__import__("random").Random(0))[0]
        caption = client.post("/predict/vlm", json={"image": encode_array(image, binary=False),
                                                    "max_new_tokens": 6, "temperature": 0})
        assert caption.status_code == 200, caption.text
        png = client.post("/predict/stable_diffusion", json={"prompt": "a red circle", "num_inference_steps": 4},
                          headers={"accept": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert infos["demo-diffusion_policy"]["io"]["cameras"] == ["scene"]
        from vla_foundry.demo import reach_task

        state = reach_task.sample_state(np.random.default_rng(0))
        frame = reach_task.render(state)
        chunk = client.post("/predict/diffusion_policy", json={"observation": {
            "images": {"scene": encode_array(frame, binary=False)},
            "lowdim": {"agent__xy": [state.agent.tolist()] * 2},
            "language_instruction": reach_task.instruction(state.goal)}, "seed": 0})
        assert chunk.status_code == 200 and len(chunk.json()["actions"]["agent__delta_xy"]) == 5, chunk.text
        chat = client.post("/v1/chat/completions", json={"model": "demo-transformer_hf", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hello"}]})
        assert chat.status_code == 200, chat.text
    assert all(demo.is_built(tmp_path / "demo" / m) for m in demo.DEMO_MEMBERS)


def test_the_server_answers_while_the_demo_pack_is_prepared(tmp_path, monkeypatch):
    """Nothing waits for the demo pack: the server answers at once, each member shows ``loading`` with what it
    is doing until its copy (or training) is done, and then serves."""
    import vla_foundry.demo as demo

    release = threading.Event()
    real_copy = demo.copy_shipped_member

    def slow_copy(name, target, files, pack=None):
        if name == "demo-transformer":
            assert release.wait(60)
        real_copy(name, target, files, pack)

    monkeypatch.setattr(demo, "copy_shipped_member", slow_copy)
    app = create_app(Settings(deployments=[], demo_dir=str(tmp_path / "demo"), device="cpu"))
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        info = client.get("/models/demo-transformer").json()
        assert info["status"] == "loading" and "preparing" in info["stage"], info
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["deployments"]["demo-transformer"] == "loading"
        release.set()
        wait_ready(client)
        info = client.get("/models/demo-transformer").json()
        assert info["status"] == "ready" and info["stage"] is None and info["demo"]["random_weights"] is False
        completion = client.post("/predict/transformer", json={"prompt": "Shall I", "max_new_tokens": 4})
        assert completion.status_code == 200, completion.text


def test_msgpack_replies_spell_arrays_as_the_request_did(client):
    """An openpi peer (bytes-keyed arrays in) gets bytes-keyed arrays back, which its unpacker makes numpy;
    str keys in (or no arrays at all) get str keys; JSON gets base64 typed arrays."""
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    headers = {"content-type": "application/msgpack", "accept": "application/msgpack"}
    body = {"texts": ["a red circle"], "images": [image]}
    openpi = client.post("/predict/clip_hf", headers=headers,
                         content=msgpack.packb(body, default=openpi_pack_array, use_bin_type=True))
    assert openpi.status_code == 200, openpi.content[:300]
    reply = msgpack.unpackb(openpi.content, object_hook=openpi_unpack_array)
    embeds = reply["image_embeds"]
    assert isinstance(embeds, np.ndarray) and embeds.dtype == np.float32 and embeds.shape[0] == 1
    assert reply["similarity"].shape == (1, 1)
    ours = client.post("/predict/clip_hf", headers=headers, content=msgpack.packb(
        {"texts": ["a red circle"], "images": [encode_array(image, binary=True)]}, use_bin_type=True))
    mine = msgpack.unpackb(ours.content)["image_embeds"]
    assert set(mine) == {"__ndarray__", "data", "dtype", "shape"}
    np.testing.assert_array_equal(np.frombuffer(mine["data"], mine["dtype"]).reshape(mine["shape"]), embeds)
    as_json = client.post("/predict/clip_hf", json={"texts": ["a red circle"],
                                                    "images": [encode_array(image, binary=False)]}).json()
    assert set(as_json["image_embeds"]) == {"dtype", "shape", "data"}


@pytest.mark.parametrize("model_type", ["clip_hf", "clip_openclip"])
def test_encoder_requests_batched_equal_their_solo_embeddings(tiny_checkpoints, model_type):
    """embed_each over mixed requests (texts only, images only, both) gives each what embed gives it alone; a
    request the encoder refuses fails alone in the service's batch."""
    from service.modalities.encoder import EncoderPredictRequest, predict

    pipeline = load_pipeline(tiny_checkpoints[model_type])
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (20 + int(rng.integers(0, 20)), 24, 3), dtype=np.uint8)  # noqa: E731
    requests = [(["a red circle", "a blue square"], None), (None, [image(), image()]),
                (["a green one"], [image()])]
    batched = pipeline.embed_each(requests)
    for (texts, images), out in zip(requests, batched):
        alone = pipeline.embed(texts, images)
        assert set(out) == set(alone)
        for key in out:
            np.testing.assert_allclose(out[key], alone[key], atol=1e-5)
    too_long = EncoderPredictRequest(texts=["word " * 200])
    fine = EncoderPredictRequest(texts=["a red circle"])
    refused, reply = predict(pipeline, [too_long, fine])
    assert getattr(refused, "field", None) == "texts"
    np.testing.assert_allclose(reply["text_embeds"], pipeline.embed(["a red circle"])["text_embeds"], atol=1e-5)


@pytest.mark.parametrize("model_type", ["clip_hf", "clip_openclip"])
def test_an_embedding_requests_texts_are_tokenized_once_off_the_model_thread(client, model_type, monkeypatch):
    """The check before the request queues tokenizes its texts (a huge text is refused there); the model call uses
    those ids (the model thread tokenized them twice more: its own check, then the text tower's call)."""
    import threading

    pipeline = client.app.state.manager.get(f"tiny-{model_type}").pipeline
    calls, tokenize = [], pipeline.model.tokenize
    monkeypatch.setattr(pipeline.model, "tokenize",
                        lambda *a, **k: calls.append(threading.current_thread().name) or tokenize(*a, **k))
    texts = ["a red circle", "a blue square"]
    reply = client.post(f"/predict/{model_type}", json={"texts": texts}, headers={"accept": "application/json"})
    assert reply.status_code == 200, reply.text
    assert len(calls) == 1 and not calls[0].startswith("model-"), calls
    monkeypatch.setattr(pipeline.model, "tokenize", tokenize)
    embeds = reply.json()["text_embeds"]
    got = np.frombuffer(base64.b64decode(embeds["data"]), embeds["dtype"]).reshape(embeds["shape"])
    np.testing.assert_allclose(got, pipeline.embed(texts)["text_embeds"], atol=1e-6)


def test_openapi_documents_the_error_shape_on_every_route(client):
    spec = client.get("/openapi.json").json()
    ref = "#/components/schemas/ErrorBody"
    for path in ("/predict/transformer", "/sessions/{session_id}/step", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "422", "503", "504"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == ref, (path, status)
    detail = spec["components"]["schemas"]["ErrorDetail"]["properties"]
    assert set(detail) == {"type", "message", "field", "request_id", "param", "code"}  # (the last two: /v1's)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # 422s have our shape, not FastAPI's
    for path in ("/v1/completions", "/v1/chat/completions"):  # a stream is server-sent events
        assert {"application/json", "text/event-stream"} <= set(spec["paths"][path]["post"]["responses"]["200"]
                                                                 ["content"])


def test_openapi_declares_every_reply_format(client):
    """Every predict/evaluate route's 200 is JSON or msgpack (the same schema); /predict/stable_diffusion may also be
    the PNG itself (seed in X-Seed), and no other route is; the encoders' embeddings are typed arrays."""
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    png_routes = []
    for model_type in TYPES:
        for kind in ("predict", "evaluate"):
            path = f"/{kind}/{model_type}"
            reply = spec["paths"][path]["post"]["responses"]["200"]
            content = reply["content"]
            json_schema = content["application/json"]["schema"]
            assert content["application/msgpack"]["schema"] == json_schema, path
            assert json_schema["$ref"].removeprefix("#/components/schemas/") in schemas, path
            if "image/png" in content:
                png_routes.append(path)
                assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}
                assert set(reply["headers"]) == {"X-Seed", "X-Model", "X-Timing-Ms", "X-Request-ID"}
            assert set(content) <= {"application/json", "application/msgpack", "image/png"}, path
    assert png_routes == ["/predict/stable_diffusion"]
    for path in ("/models", "/models/{name}"):
        assert "application/msgpack" in spec["paths"][path]["get"]["responses"]["200"]["content"], path
    embeddings = schemas["EncoderPredictResponse"]["properties"]
    for name in ("text_embeds", "image_embeds", "similarity"):
        assert {"$ref": "#/components/schemas/TypedArray"} in embeddings[name]["anyOf"], name
    typed_array = schemas["TypedArray"]
    assert set(typed_array["required"]) == {"dtype", "shape", "data"}
    assert typed_array["properties"]["shape"]["items"] == {"type": "integer"}


def test_encoder_json_reply_is_what_its_schema_declares(client):
    """The embedding reply holds to its declared model, and its typed arrays are written as before (the model only
    documents them: the reply itself is written by the codec)."""
    from service.modalities.encoder import EncoderPredictResponse

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    response = client.post("/predict/clip_hf", json={"texts": ["a red circle", "a square"],
                                                     "images": [encode_array(image, binary=False)]})
    assert response.status_code == 200, response.text
    reply = EncoderPredictResponse.model_validate(response.json())
    assert reply.similarity.shape == [2, 1] and reply.text_embeds.dtype == "<f4"
    assert b'"similarity":{"dtype":"<f4","shape":[2,1],"data":"' in response.content


@pytest.mark.parametrize("accept, media_type", [
    ("application/msgpack", "application/msgpack"),
    ("application/msgpack;q=0", "application/json"),
    ("application/msgpack;q=0, application/json", "application/json"),
    ("application/msgpack;q=0.5, application/json", "application/json"),
    ("application/json;q=0.5, application/msgpack", "application/msgpack"),
    ("*/*", "application/json"),
])
def test_accept_q_values_choose_the_reply_format(client, accept, media_type):
    """Replies, errors and /models alike: msgpack only when the client prefers it (q=0 refuses it)."""
    headers = {"accept": accept}
    ok = client.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 2, "seed": 1}, headers=headers)
    refused = client.post("/predict/transformer", json={"prompt": "a", "max_new_tokens": 0}, headers=headers)
    listed = client.get("/models", headers=headers)
    assert (ok.status_code, refused.status_code, listed.status_code) == (200, 422, 200)
    for response in (ok, refused, listed):
        assert response.headers["content-type"] == media_type, (response.request.url, response.content[:80])
