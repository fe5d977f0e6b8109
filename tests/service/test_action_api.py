"""``/predict/diffusion_policy`` and ``/evaluate/diffusion_policy`` over HTTP.

The acceptance path: the shared fixture's raw observation and initial noise, sent to a real
server on a loopback port, come back as the fixture's denormalized actions. Bad
observations are refused with the field named, and the deployment keeps answering.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import time
from typing import Optional

import httpx
import msgpack
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from service import DeploymentSpec
from service.codecs import encode_array
from service.modalities.action import Observation
from tests.conftest import FIXTURES
from tests.openpi.msgpack_numpy import openpi_pack_array, openpi_unpack_array
from tests.factories import POLICY_CAMERAS, PREDICT_REQUESTS, png_data_url, policy_observation
from tests.service.conftest import serving
from tests.service.live_server import live_server

FIXTURE = FIXTURES / "diffusion_policy_clip_basic"  # also outside fixtures: built into the request bodies


def typed(array: np.ndarray) -> dict:
    return encode_array(np.ascontiguousarray(array), binary=False)


def fixture_requests() -> list[tuple[dict, dict]]:
    """(request, expected denormalized actions per field) for both fixture samples.

    Sample 0 has its first action row given (past_mask), sample 1 none; the images go as typed uint8 arrays,
    one per image index (t-1, t0), and the proprioception as the P+1 = 2 raw rows.
    """
    raw = load_file(str(FIXTURE / "expected" / "preprocess.safetensors"))
    out = load_file(str(FIXTURE / "expected" / "generate_actions_steps10.safetensors"))
    cases = json.loads((FIXTURE / "expected" / "cases.json").read_text())
    instructions = cases["preprocess"]["language_instructions"]
    action_fields = cases["preprocess"]["action_fields"]
    (proprio,) = cases["preprocess"]["proprioception_fields"]
    requests = []
    for b in range(2):
        body = {"observation": {
            "images": {cam: [typed(raw[f"input.raw_image.{b}.{cam}_t{i}"].numpy()) for i in (-1, 0)]
                       for cam in ("scene_left", "wrist_right")},
            "lowdim": {proprio: raw[f"input.raw_lowdim.{b}.{proprio}"][:2].tolist()},
            "language_instruction": instructions[b]},
            "noise": out["input.initial_noise"][b].tolist(), "num_inference_steps": 10}
        if bool(out["input.past_mask"][b, 0]):
            body["past_actions"] = {f: raw[f"input.raw_lowdim.{b}.{f}"][:1].tolist() for f in action_fields}
        expected = {f: out[f"output.denormalized.{f}"][b].numpy() for f in action_fields}
        requests.append((body, expected))
    return requests


def test_fixture_observation_gives_the_fixture_actions_on_a_live_server(tmp_path):
    """With the production sampling path: a traced graph per batch size, captured at warm-up (the other tests
    run with VLA_TRACED_SAMPLING=false, tests/conftest.py)."""
    settings = {"VLA_TRACED_SAMPLING": "true", "VLA_MAX_BATCH_SIZE": "2"}
    with live_server(["--checkpoint", f"{FIXTURE}=fixture-policy"], tmp_path / "demo", env=settings) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            info = client.get("/models/fixture-policy").json()
            assert info["type"] == "diffusion_policy" and info["checkpoint"]["file"] == "checkpoint_2.pt"
            assert info["io"]["sampling_graphs"] == "traced"
            for body, expected in fixture_requests():
                response = client.post("/predict/diffusion_policy", json=body)
                assert response.status_code == 200, response.text
                payload = response.json()
                for field, values in expected.items():
                    np.testing.assert_allclose(np.array(payload["actions"][field]), values, atol=1e-5)
                chunk = np.concatenate([np.array(payload["actions"][f]) for f in payload["action_fields"]], axis=-1)
                np.testing.assert_allclose(np.array(payload["action_chunk"]), chunk, atol=1e-7)
                assert payload["first_action_index"] == 1 and payload["checkpoint_step"] == info["checkpoint"]["step"]


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    fixture = DeploymentSpec(name="fixture-policy", checkpoint=str(FIXTURE))
    tiny = DeploymentSpec(name="tiny-policy", checkpoint=str(tiny_checkpoints["diffusion_policy"]), n_action_steps=2)
    with serving(fixture, tiny, max_images=8, max_image_pixels=64 * 64, max_inference_steps=50) as c:
        yield c


def predict(client, body: dict, model: str = "tiny-policy"):
    return client.post("/predict/diffusion_policy", json={"model": model, **body})


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_models_io_tells_a_robot_what_to_send(client):
    io = client.get("/models/fixture-policy").json()["io"]
    assert io["cameras"] == ["scene_left", "wrist_right"] and io["image_indices"] == [-1, 0]
    assert io["image_names"] == ["scene_left_t-1", "wrist_right_t-1", "scene_left_t0", "wrist_right_t0"]
    assert io["image"]["resize_to"] == [40, 48] and io["image"]["resize_method"] == "center_crop"
    assert io["proprioception"] == [{"field": "robot__actual__poses__right::panda__xyz", "dim": 3, "steps": 2}]
    assert [a["dim"] for a in io["actions"]] == [3, 1] and io["action_dim"] == 4
    assert (io["past_steps"], io["future_steps"], io["action_steps"], io["num_timesteps"]) == (1, 6, 8, 100)
    assert io["uses_language"] is True and io["default_inference_steps"] == 10 and io["sampler"] == "flow_matching"
    assert client.get("/models/tiny-policy").json()["io"]["n_action_steps"] == 2  # the deployment's setting


def test_fixture_actions_in_process_app_with_png_frames(client):
    """The same acceptance through PNG-encoded frames (lossless) instead of typed arrays."""
    import io as _io

    from PIL import Image

    body, expected = fixture_requests()[1]
    for camera, frames in body["observation"]["images"].items():
        encoded = []
        for frame in frames:
            pixels = np.frombuffer(base64.b64decode(frame["data"]), np.uint8).reshape(frame["shape"])
            buffer = _io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
        body["observation"]["images"][camera] = encoded
    payload = predict(client, body, "fixture-policy").json()
    for field, values in expected.items():
        np.testing.assert_allclose(np.array(payload["actions"][field]), values, atol=1e-5)


def test_same_seed_same_actions_and_past_rows_come_back(client):
    body = PREDICT_REQUESTS["diffusion_policy"]
    first, again = predict(client, body).json(), predict(client, body).json()
    other = predict(client, {**body, "seed": 2}).json()
    assert first["actions"] == again["actions"] and first["seed"] == 1
    assert first["actions"] != other["actions"]
    # The executed past action comes back unchanged in row 0 (up to float32 normalize/denormalize rounding).
    np.testing.assert_allclose(first["actions"]["arm__delta"][0], [0.5, -0.5], atol=1e-5)
    np.testing.assert_allclose(first["actions"]["gripper"][0], [1.0], atol=1e-5)
    assert len(first["action_chunk"]) == 4 and len(first["action_chunk"][0]) == 3
    assert first["n_action_steps"] == 2 and first["action_fields"] == ["arm__delta", "gripper"]
    assert set(first["timing_ms"]) == {"queue", "preprocess", "infer", "total", "batch_size"}
    assert first["timing_ms"]["batch_size"] == 1


def test_single_frame_per_camera_is_refused_and_session_fields_echo(client):
    now = time.time()  # an observation whose chunk is already past its valid_until would be dropped (504)
    body = {**PREDICT_REQUESTS["diffusion_policy"], "session_id": "robot-7", "timestamp": now}
    payload = predict(client, body).json()
    assert payload["session_id"] == "robot-7" and payload["timestamp"] == now
    one_frame = policy_observation()
    one_frame["images"]["front"] = png_data_url(0)
    error = error_of(predict(client, {"observation": one_frame}), 422)
    assert error["field"] == "observation.images.front" and "2 per camera" in error["message"]


def test_msgpack_request_with_raw_uint8_frames(client):
    rng = np.random.default_rng(0)
    observation = {"images": {cam: [encode_array(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), binary=True)
                                    for _ in range(2)] for cam in POLICY_CAMERAS},
                   "lowdim": {"arm__pos": encode_array(np.array([[0.1, 0.2], [0.3, 0.4]], np.float32), binary=True)},
                   "language_instruction": "pick"}
    response = client.post("/predict/diffusion_policy",
                           content=msgpack.packb({"model": "tiny-policy", "observation": observation, "seed": 3},
                                                 use_bin_type=True),
                           headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    assert response.status_code == 200, response.text
    payload = msgpack.unpackb(response.content)
    assert len(payload["action_chunk"]) == 4 and payload["seed"] == 3


def test_msgpack_bytes_and_json_base64_give_the_same_actions(client):
    """Frames as raw bytes or PNG bytes in msgpack, and as base64 typed arrays or data: URLs in JSON: the same
    observation, the same actions (msgpack bytes are never re-encoded on the way to the model)."""
    rng = np.random.default_rng(4)
    raw = {cam: [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2)] for cam in POLICY_CAMERAS}
    png = [_png_bytes(frame) for frame in raw["wrist"]]
    lowdim = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)

    def body(binary: bool) -> dict:
        wrist = png if binary else ["data:image/png;base64," + base64.b64encode(b).decode() for b in png]
        images = {"front": [encode_array(f, binary=binary) for f in raw["front"]], "wrist": wrist}
        return {"model": "tiny-policy", "seed": 11, "observation": {
            "images": images, "lowdim": {"arm__pos": encode_array(lowdim, binary=binary)},
            "language_instruction": "pick"}}

    packed = client.post("/predict/diffusion_policy", content=msgpack.packb(body(True), use_bin_type=True),
                         headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    as_json = client.post("/predict/diffusion_policy", json=body(False))
    assert packed.status_code == 200 and as_json.status_code == 200, (packed.content[:300], as_json.text[:300])
    np.testing.assert_allclose(msgpack.unpackb(packed.content)["action_chunk"], as_json.json()["action_chunk"],
                               atol=1e-6)


def openpi_body(body: dict) -> dict:
    """A JSON request body as an openpi robot builds it: every typed array as a numpy array."""
    if isinstance(body, dict):
        if set(body) == {"dtype", "shape", "data"}:
            return np.frombuffer(base64.b64decode(body["data"]), body["dtype"]).reshape(body["shape"])
        return {k: openpi_body(v) for k, v in body.items()}
    if isinstance(body, list):
        return [openpi_body(v) for v in body]
    return body


def post_openpi(client, body: dict):
    """POST ``body`` packed with openpi's ``msgpack_numpy`` (bytes keys), the reply unpacked the same way."""
    return client.post("/predict/diffusion_policy",
                       content=msgpack.packb(body, default=openpi_pack_array, use_bin_type=True),
                       headers={"content-type": "application/msgpack", "accept": "application/msgpack"})


def test_openpi_msgpack_bodies_give_the_fixture_actions(client):
    """openpi's packer (bytes-keyed arrays, numpy arrays for the lowdim, noise and past rows too)."""
    for body, expected in fixture_requests():
        body = {"model": "fixture-policy", **openpi_body(body)}
        body["observation"]["lowdim"] = {k: np.array(v, np.float32) for k, v in body["observation"]["lowdim"].items()}
        body["noise"] = np.array(body["noise"], np.float32)
        body["num_inference_steps"] = np.int64(10)  # openpi packs numpy scalars as __npgeneric__ maps
        response = post_openpi(client, body)
        assert response.status_code == 200, response.content[:300]
        payload = msgpack.unpackb(response.content, object_hook=openpi_unpack_array)
        for field, values in expected.items():
            np.testing.assert_allclose(np.array(payload["actions"][field]), values, atol=1e-5)


BAD_ARRAYS = {
    "object dtype": ({"__ndarray__": True, "data": b"", "dtype": "|O", "shape": [0]}, 422),
    "malformed dtype": ({"__ndarray__": True, "data": b"", "dtype": ",", "shape": [0]}, 422),
    "complex dtype": ({"__ndarray__": True, "data": b"\0" * 16, "dtype": "<c8", "shape": [2]}, 422),
    "wrong byte count": ({"__ndarray__": True, "data": b"\0" * 5, "dtype": "<f4", "shape": [2]}, 422),
    "float camera frame": ({"__ndarray__": True, "data": b"\0" * 4 * 48, "dtype": "<f4", "shape": [4, 4, 3]}, 422),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_arrays_are_refused_alike_with_str_and_bytes_keys(client, case):
    value, status = BAD_ARRAYS[case]
    errors = []
    for bytes_keys in (False, True):
        array = {k.encode(): v for k, v in value.items()} if bytes_keys else value
        observation = {"images": {cam: [encode_array(np.zeros((4, 4, 3), np.uint8), binary=True)] * 2
                                  for cam in POLICY_CAMERAS},
                       "lowdim": {"arm__pos": array}, "language_instruction": "pick"}
        if case == "float camera frame":
            observation["lowdim"]["arm__pos"] = [[0.1, 0.2], [0.3, 0.4]]
            observation["images"]["front"] = [array, array]
        response = client.post("/predict/diffusion_policy", content=msgpack.packb(
            {"model": "tiny-policy", "observation": observation}, use_bin_type=True),
            headers={"content-type": "application/msgpack"})
        errors.append({k: v for k, v in error_of(response, status).items() if k != "request_id"})  # per request
    assert errors[0] == errors[1]


def test_only_raw_frames_within_the_cap_decode_on_the_event_loop():
    frame = encode_array(np.zeros((4, 6, 3), np.uint8), binary=True)
    assert Observation(images={"front": [frame, frame]}).raw_frames_only()
    assert not Observation(images={"front": [frame, frame]}).raw_frames_only(max_bytes=100)
    assert not Observation(images={"front": encode_array(np.zeros((4, 6, 3), np.uint8), binary=False)}
                           ).raw_frames_only()  # base64: decoding it is real work
    assert not Observation(images={"front": _png_bytes(np.zeros((4, 6, 3), np.uint8))}).raw_frames_only()


def _png_bytes(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _bad(observation_edit=None, **top):
    observation = policy_observation()
    if observation_edit:
        observation_edit(observation)
    return {"observation": observation, **top}


BAD_OBSERVATIONS = {
    "unknown camera": (lambda o: o["images"].update(top=o["images"]["front"]), 422, "observation.images.top"),
    "missing camera": (lambda o: o["images"].pop("wrist"), 422, "observation.images.wrist"),
    "three frames": (lambda o: o["images"]["front"].append(png_data_url(9)), 422, "observation.images.front"),
    "lowdim dims": (lambda o: o["lowdim"].update(arm__pos=[[0.1, 0.2, 0.3]] * 2), 422, "observation.lowdim.arm__pos"),
    "lowdim steps": (lambda o: o["lowdim"].update(arm__pos=[[0.1, 0.2]]), 422, "observation.lowdim.arm__pos"),
    "missing lowdim": (lambda o: o.update(lowdim={}), 422, "observation.lowdim.arm__pos"),
    "unknown lowdim": (lambda o: o["lowdim"].update(speed=[[1.0]] * 2), 422, "observation.lowdim.speed"),
    "string lowdim": (lambda o: o["lowdim"].update(arm__pos=[["a", "b"]] * 2), 422, "observation.lowdim.arm__pos"),
    "infinite typed lowdim": (lambda o: o["lowdim"].update(arm__pos=typed(np.array([[np.inf, 0], [0, 0]], np.float32))),
                              422, "observation.lowdim.arm__pos"),
    "complex typed lowdim": (lambda o: o["lowdim"].update(arm__pos=typed(np.zeros((2, 2), np.complex64))),
                             422, "observation.lowdim.arm__pos"),
    "float frame": (lambda o: o["images"]["front"].__setitem__(0, typed(np.zeros((8, 8, 3), np.float64))), 422,
                    "observation.images.front[0]"),
    "not an image": (lambda o: o["images"]["front"].__setitem__(0, "bm90IGFuIGltYWdl"), 422,
                     "observation.images.front[0]"),
    "oversized frame": (lambda o: o["images"]["front"].__setitem__(0, png_data_url(0, (80, 80))), 413,
                        "observation.images.front[0]"),
    "no instruction": (lambda o: o.pop("language_instruction"), 422, "observation.language_instruction"),
    "long instruction": (lambda o: o.update(language_instruction="pick up " * 40), 422,
                         "observation.language_instruction"),
    "thin frame": (lambda o: o["images"]["front"].__setitem__(1, typed(np.zeros((1, 60, 3), np.uint8))), 422,
                   "observation.images.front[1]"),
    "four channels": (lambda o: o["images"]["front"].__setitem__(1, typed(np.zeros((8, 8, 4), np.uint8))), 422,
                      "observation.images.front[1]"),
}


@pytest.mark.parametrize("case", list(BAD_OBSERVATIONS))
def test_bad_observations_are_refused_naming_the_field(client, case):
    edit, status, field = BAD_OBSERVATIONS[case]
    good = predict(client, PREDICT_REQUESTS["diffusion_policy"]).json()
    error = error_of(predict(client, _bad(edit)), status)
    assert error["field"] == field, error
    if "frame" in case or "channels" in case:  # a camera frame is uint8: no message offers floats
        assert "float" not in error["message"].replace("float64", ""), error
    again = predict(client, PREDICT_REQUESTS["diffusion_policy"]).json()
    assert again["actions"] == good["actions"], "a refused request changes nothing for the next one"


def test_nan_in_json_and_bad_request_fields(client):
    text = json.dumps({"model": "tiny-policy", **PREDICT_REQUESTS["diffusion_policy"]}).replace("0.1", "NaN", 1)
    response = client.post("/predict/diffusion_policy", content=text, headers={"content-type": "application/json"})
    assert response.status_code == 422
    bad_past = {**PREDICT_REQUESTS["diffusion_policy"], "past_actions": {"arm__delta": [[0.5, -0.5]] * 2,
                                                                         "gripper": [[1.0]] * 2}}
    assert error_of(predict(client, bad_past), 422)["field"] == "past_actions.arm__delta"
    bad_noise = {**PREDICT_REQUESTS["diffusion_policy"], "noise": [[0.0, 0.0, 0.0]] * 3}
    assert error_of(predict(client, bad_noise), 422)["field"] == "noise"
    too_many_steps = {**PREDICT_REQUESTS["diffusion_policy"], "num_inference_steps": 51}
    assert error_of(predict(client, too_many_steps), 422)["field"] == "num_inference_steps"
    over_t = {**PREDICT_REQUESTS["diffusion_policy"], "num_inference_steps": 11}  # the tiny policy's T is 10
    error = error_of(predict(client, over_t), 422)
    assert error["field"] == "num_inference_steps" and "10" in error["message"]


@pytest.mark.parametrize("edit, field", [
    (lambda b: b.update(noise=[[1e39, 0.0, 0.0]] + [[0.0] * 3] * 8), "noise"),
    (lambda b: b["observation"]["lowdim"].update(arm__pos=[[1e39, 0.0], [0.0, 0.0]]), "observation.lowdim.arm__pos"),
    (lambda b: b.update(past_actions={"arm__delta": [[-1e39, 0.0]], "gripper": [[0.0]]}), "past_actions.arm__delta"),
], ids=["noise", "lowdim", "past_actions"])
def test_values_beyond_float32_are_named_as_such_not_as_nan_or_infinity(client, edit, field):
    """1e39 is finite as sent (JSON numbers are float64), but the policy computes in float32."""
    body = copy.deepcopy(PREDICT_REQUESTS["diffusion_policy"])
    edit(body)
    error = error_of(predict(client, body), 422)
    assert error["field"] == field and "1e+39, beyond float32's range" in error["message"], error
    assert "NaN" not in error["message"] and "finite" not in error["message"], error


def test_evaluate_is_seeded_and_checks_action_windows(client):
    from tests.factories import EVALUATE_REQUESTS

    body = {"model": "tiny-policy", **EVALUATE_REQUESTS["diffusion_policy"]}
    first = client.post("/evaluate/diffusion_policy", json=body).json()
    assert first == {**client.post("/evaluate/diffusion_policy", json=body).json(), "timing_ms": first["timing_ms"]}
    assert first["num_samples"] == 2 and first["num_action_rows"] == 2 * 3 and np.isfinite(first["loss"])
    every_row = client.post("/evaluate/diffusion_policy", json={**body, "condition_on_past": False}).json()
    assert every_row["num_action_rows"] == 2 * 4
    for lax in ("no", 0):  # a switch is a boolean, as the other fields are strict about their types
        refused = client.post("/evaluate/diffusion_policy", json={**body, "condition_on_past": lax})
        assert error_of(refused, 422)["field"] == "condition_on_past"
    short = json.loads(json.dumps(body))
    short["samples"][1]["actions"]["gripper"] = [[1.0]] * 3
    assert error_of(client.post("/evaluate/diffusion_policy", json=short), 422)["field"] == "samples[1].actions.gripper"
    wordy = json.loads(json.dumps(body))
    wordy["samples"][1]["observation"]["language_instruction"] = "pick up " * 40
    error = error_of(client.post("/evaluate/diffusion_policy", json=wordy), 422)
    assert error["field"] == "samples[1].observation.language_instruction"
    many = {**body, "samples": body["samples"] * 3}  # 6 samples × 4 frames, over the cap of 8 per request
    assert error_of(client.post("/evaluate/diffusion_policy", json=many), 422)["field"] == "samples"


def test_bfloat16_keeps_the_action_state_in_float32(tiny_checkpoints):
    """A bf16 policy still returns the executed past actions exactly: only the layers run in bf16."""
    from vla_foundry.pipelines import load_pipeline
    from vla_foundry.robotics.observations import RawObservation

    pipeline = load_pipeline(tiny_checkpoints["diffusion_policy"], dtype="bfloat16")
    r = pipeline.robot_io
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    past = {"arm__delta": np.array([[0.0123, -0.0456]], np.float32), "gripper": np.array([[0.0789]], np.float32)}
    sample = RawObservation({n: frame for n in r.image_names}, {"arm__pos": np.zeros((2, 2), np.float32)},
                            "pick", past)
    out = pipeline.predict([sample], seed=0)
    np.testing.assert_allclose(out["actions"]["arm__delta"][0, 0], past["arm__delta"][0], atol=1e-6)
    np.testing.assert_allclose(out["actions"]["gripper"][0, 0], past["gripper"][0], atol=1e-6)
    assert out["action_chunk"].dtype == np.float32


def test_64_concurrent_robots_are_batched_and_each_gets_its_own_chunk(tiny_checkpoints, tmp_path):
    """64 robots at once on a live server: calls are shared (timing_ms.batch_size > 1), and every robot's
    chunk equals the one the same request gets alone (its own seed, its own observation)."""
    import asyncio

    bodies = [{"observation": policy_observation(seed=i % 7), "seed": 1000 + i, "num_inference_steps": 3}
              for i in range(64)]
    for i in (5, 20, 41):  # bad requests among them, with their batch key: each fails alone
        bodies[i] = {**bodies[i], "noise": [[0.0] * 3] * 2} if i == 5 else \
            {**bodies[i], "observation": {**bodies[i]["observation"], "language_instruction": "go " * 100}}
    with live_server(["--checkpoint", f"{tiny_checkpoints['diffusion_policy']}=policy"], tmp_path / "demo") as base:
        async def all_at_once() -> list[dict]:
            async with httpx.AsyncClient(base_url=base, timeout=120,
                                         limits=httpx.Limits(max_connections=64)) as client:
                replies = await asyncio.gather(*[client.post("/predict/diffusion_policy", json=b) for b in bodies])
            assert [i for i, r in enumerate(replies) if r.status_code != 200] == [5, 20, 41]
            assert [replies[i].json()["error"]["field"] for i in (5, 20, 41)] == [
                "noise", "observation.language_instruction", "observation.language_instruction"]
            return [r.json() for r in replies]

        together = asyncio.run(all_at_once())
        info = httpx.get(base + "/models/policy").json()
        with httpx.Client(base_url=base, timeout=60) as client:
            alone = [client.post("/predict/diffusion_policy", json=b).json() for b in bodies]
    together, alone, bodies = ([x for i, x in enumerate(v) if i not in (5, 20, 41)] for v in (together, alone, bodies))
    assert info["batching"] == {"max_batch_size": 8, "batch_wait_ms": 0.0}  # the CPU default
    sizes = [r["timing_ms"]["batch_size"] for r in together]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    assert all(r["timing_ms"]["batch_size"] == 1 for r in alone)
    for mine, solo, body in zip(together, alone, bodies):
        assert mine["seed"] == solo["seed"] == body["seed"]
        np.testing.assert_allclose(mine["action_chunk"], solo["action_chunk"], atol=1e-5)


def test_concurrent_sessions_are_batched_and_keep_their_own_histories(tiny_checkpoints, tmp_path):
    """12 robots on their own sessions, 3 steps each, all at once: calls are shared, one robot's bad step fails
    alone, and every robot's chunks equal those of the same episode replayed with nobody else around."""
    import asyncio

    robots = [f"robot-{i}" for i in range(12)]

    def body(robot: int, step: int) -> dict:
        observation = policy_observation(seed=robot + step)
        observation["images"] = {cam: frames[-1] for cam, frames in observation["images"].items()}  # current only
        observation["lowdim"] = {"arm__pos": [0.1 * step, 0.05 * robot]}
        return {"session_id": robots[robot], "observation": observation, "seed": 50 + robot,
                "num_inference_steps": 3}

    bad = {"session_id": "robot-bad", "observation": {"images": {"front": png_data_url(0)}, "lowdim": {}},
           "num_inference_steps": 3}  # the robots' batch key: it may share their calls

    async def episode(client: httpx.AsyncClient, robot: int) -> list[dict]:
        replies = []
        for step in range(3):
            reply = await client.post("/predict/diffusion_policy", json=body(robot, step))
            assert reply.status_code == 200, reply.text
            replies.append(reply.json())
        return replies

    async def fleet(base: str, with_bad: bool) -> tuple[list, Optional[httpx.Response]]:
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            tasks = [episode(client, r) for r in range(len(robots))]
            bad_reply = client.post("/predict/diffusion_policy", json=bad) if with_bad else asyncio.sleep(0)
            *episodes, refused = await asyncio.gather(*tasks, bad_reply)
            return episodes, refused

    with live_server(["--checkpoint", f"{tiny_checkpoints['diffusion_policy']}=policy"], tmp_path / "demo") as base:
        together, refused = asyncio.run(fleet(base, with_bad=True))
        for robot in robots:
            assert httpx.delete(f"{base}/sessions/{robot}").status_code == 200
        alone = []
        for r in range(len(robots)):  # the same episodes, one robot at a time
            alone.append(asyncio.run(fleet_of_one(base, episode, r)))
    assert refused.status_code == 422 and refused.json()["error"]["field"].startswith("observation")
    sizes = [reply["timing_ms"]["batch_size"] for episode in together for reply in episode]
    assert max(sizes) > 1, sizes
    for mine, solo in zip(together, alone):
        assert [m["step"] for m in mine] == [s["step"] for s in solo] == [0, 1, 2]  # n_action_steps 1
        for m, s in zip(mine, solo):
            assert m["seed"] == s["seed"]
            np.testing.assert_allclose(m["action_chunk"], s["action_chunk"], atol=1e-5)


async def fleet_of_one(base: str, episode, robot: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        return await episode(client, robot)
