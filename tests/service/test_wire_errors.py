"""A bad value refused alike whatever the wire format: the same body as JSON and as msgpack names the same field."""

from __future__ import annotations

import copy
import json

import msgpack
import numpy as np
import pytest

from service import DeploymentSpec
from service.codecs import encode_array
from tests.factories import PREDICT_REQUESTS, png_data_url
from tests.service.conftest import serving

FRAME = np.zeros((8, 8, 3), np.uint8)


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    specs = [DeploymentSpec(name=t, checkpoint=str(tiny_checkpoints[t])) for t in ("vlm", "diffusion_policy")]
    with serving(*specs) as c:
        yield c


class Array:
    """A typed array in a body, written in each wire format's convention (base64 in JSON, raw bytes in msgpack)."""

    def __init__(self, array: np.ndarray, **overrides):
        self.array, self.overrides = array, overrides

    def wire(self, binary: bool) -> dict:
        return {**encode_array(self.array, binary=binary), **self.overrides}


class Scalar:
    """A number: plain in JSON, a numpy scalar (``__npgeneric__``, as openpi's msgpack_numpy packs one) in msgpack."""

    def __init__(self, value: float):
        self.value = value

    def wire(self, binary: bool):
        return {"__npgeneric__": True, "data": self.value, "dtype": "<f8"} if binary else self.value


def as_json(body) -> bytes:
    def default(value):
        return value.wire(binary=False)

    return json.dumps(body, default=default).encode()  # NaN and infinity as Python's json writes them


def as_msgpack(body) -> bytes:
    return msgpack.packb(body, default=lambda value: value.wire(binary=True), use_bin_type=True)


def caption(**changes) -> dict:
    return {"images": [[Array(FRAME)]], "prompt": "what is this", "max_new_tokens": 2, **changes}


def policy(where: tuple, value) -> dict:
    body = copy.deepcopy(PREDICT_REQUESTS["diffusion_policy"])
    parent = body
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    return body


BAD_BODIES = {  # case → (route, body, the field both refusals name)
    "image array, dtype numpy parses as Python": (
        "/predict/vlm", caption(images=[[png_data_url(0)], [Array(FRAME, dtype=",")]]), "images[1][0]"),
    "image array, complex dtype": ("/predict/vlm", caption(images=[[Array(FRAME, dtype="<c8")]]), "images[0][0]"),
    "camera frame, bad dtype": (
        "/predict/diffusion_policy", policy(("observation", "images", "front", 1), Array(FRAME, dtype=",")),
        "observation.images.front[1]"),
    "lowdim array, complex dtype": (
        "/predict/diffusion_policy",
        policy(("observation", "lowdim", "arm__pos"), Array(np.zeros((2, 2), np.complex64))),
        "observation.lowdim.arm__pos"),
    "image array, bad shape": ("/predict/vlm", caption(images=[[Array(FRAME, shape=[8, -8, 3])]]), "images[0][0]"),
    "NaN number": ("/predict/vlm", caption(temperature=float("nan")), "temperature"),
    "infinite number": ("/predict/diffusion_policy", policy(("seed",), float("inf")), "seed"),
    "NaN numpy scalar": ("/predict/vlm", caption(seed=Scalar(float("nan"))), "seed"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_the_same_bad_body_names_the_same_field_in_json_and_msgpack(client, case):
    route, body, field = BAD_BODIES[case]
    errors = []
    for content_type, encode in (("application/json", as_json), ("application/msgpack", as_msgpack)):
        response = client.post(route, content=encode(body), headers={"content-type": content_type})
        assert response.status_code == 422, (content_type, response.text)
        errors.append(response.json()["error"])
    from_json, from_msgpack = errors
    assert from_json.get("field") == from_msgpack.get("field") == field, errors
    assert from_msgpack["message"].startswith(f"{field}: "), from_msgpack  # as JSON refusals read: the field first
    if isinstance(body, dict) and "dtype" in case:  # the same check refuses the array in both: the same words
        assert from_json["message"] == from_msgpack["message"]


def test_a_number_in_a_list_is_named_down_to_its_element_in_msgpack(client):
    """The policy checks a JSON body's lowdim as a whole (``observation.lowdim.arm__pos``); msgpack's decoder refuses
    the number itself, so its field goes on to the element, within the field JSON names."""
    body = policy(("observation", "lowdim", "arm__pos"), [[0.1, 0.2], [float("nan"), 0.4]])
    json_error = client.post("/predict/diffusion_policy", content=as_json(body),
                             headers={"content-type": "application/json"}).json()["error"]
    msgpack_error = client.post("/predict/diffusion_policy", content=as_msgpack(body),
                                headers={"content-type": "application/msgpack"}).json()["error"]
    assert json_error["field"] == "observation.lowdim.arm__pos"
    assert msgpack_error.get("field") == "observation.lowdim.arm__pos[1][0]", msgpack_error


def test_a_websocket_frame_refused_while_unpacking_names_its_field_in_the_close_reason(client):
    frame = {"observation/front": Array(FRAME, dtype="<c8"), "prompt": "pick"}
    with client.websocket_connect("/ws/diffusion_policy") as ws:
        msgpack.unpackb(ws.receive_bytes())  # the metadata frame
        ws.send_bytes(as_msgpack(frame))
        assert ws.receive_text().startswith("observation/front: complex arrays are refused")
        closed = ws.receive()
    assert closed["type"] == "websocket.close" and closed["code"] == 1008
    assert closed["reason"] == "field=observation/front"


def test_a_close_reason_naming_a_long_non_ascii_field_still_fits_its_frame(client):
    """A close frame's reason holds at most 123 bytes: a field of a client's own non-ASCII key is cut there (in
    bytes, not characters), and the close still arrives (else the robot sees an abnormal closure)."""
    with client.websocket_connect("/ws/diffusion_policy") as ws:
        msgpack.unpackb(ws.receive_bytes())  # the metadata frame
        ws.send_bytes(as_msgpack({"observation": {"観" * 60: float("nan")}, "prompt": "pick"}))
        ws.receive_text()
        closed = ws.receive()
    assert closed["type"] == "websocket.close" and closed["code"] == 1008
    assert closed["reason"].startswith("field=observation.観") and len(closed["reason"].encode()) <= 123


def test_msgpack_refusals_are_422_whatever_the_keys_and_400_only_for_what_is_not_msgpack(client):
    """The status follows the kind of refusal, not its words: a key of the body is part of the message now."""
    body = caption(**{"not valid msgpack": float("nan")})
    response = client.post("/predict/vlm", content=as_msgpack(body), headers={"content-type": "application/msgpack"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "not valid msgpack", response.text
    response = client.post("/predict/vlm", content=b"\xc1\xc1", headers={"content-type": "application/msgpack"})
    assert response.status_code == 400 and "not valid msgpack" in response.json()["error"]["message"]


def test_a_websocket_frame_is_refused_1008_for_its_own_fault_and_closed_1011_for_the_servers(client, monkeypatch):
    """A ragged observation/state is the frame's fault (1008, naming the field). A ValueError out of the server's own
    code (here the model call's) is not: it closed 1008 with the error's text, where HTTP answers 500; now 1011,
    without the text."""
    from service.routes import robot_ws
    from tests.service.test_robot_ws import flat_observation

    with client.websocket_connect("/ws/diffusion_policy") as ws:
        msgpack.unpackb(ws.receive_bytes())
        ws.send_bytes(as_msgpack({**flat_observation(), "observation/state": [[0.1, 0.2], [0.3]]}))
        assert "observation/state must be numbers" in ws.receive_text()
        closed = ws.receive()
    assert (closed["code"], closed["reason"]) == (1008, "field=observation/state")

    def broken(pipeline, items):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(robot_ws, "session_predict", broken)
    with client.websocket_connect("/ws/diffusion_policy") as ws:
        msgpack.unpackb(ws.receive_bytes())
        ws.send_bytes(as_msgpack(flat_observation()))
        text = ws.receive_text()
        closed = ws.receive()
    assert closed["code"] == 1011 and "broadcast" not in text
