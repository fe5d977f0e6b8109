"""Caption endpoints over HTTP: images in every accepted form, and bad images refused fast and clearly."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import msgpack
import numpy as np
import pytest
from PIL import Image

from service import DeploymentSpec
from service.codecs import encode_array
from tests.factories import png_data_url
from tests.service.conftest import serving


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    specs = [DeploymentSpec(name="vlm", checkpoint=str(tiny_checkpoints["vlm"])),
             DeploymentSpec(name="vlm_hf", checkpoint=str(tiny_checkpoints["vlm_hf"]))]
    with serving(*specs, max_images=3, max_image_pixels=256 * 256, max_new_tokens=16) as c:
        yield c


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def huge_header_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width × height (with a valid CRC) and carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def caption(client, model_type: str, **body):
    return client.post(f"/predict/{model_type}", json={"max_new_tokens": 4, "temperature": 0, **body})


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("model_type", ["vlm", "vlm_hf"])
def test_every_image_form_gives_the_same_caption(client, model_type):
    as_png = base64.b64encode(png_bytes(PIXELS)).decode()
    forms = [as_png, "data:image/png;base64," + as_png, encode_array(PIXELS, binary=False),
             encode_array(PIXELS.astype(np.float32) / 255, binary=False)]
    captions = [caption(client, model_type, image=form).json()["captions"] for form in forms]
    assert all(c == captions[0] for c in captions), captions
    assert captions[0][0]["finish_reason"] in ("stop", "length")


def test_msgpack_images_and_reply(client):
    body = {"image": {"__ndarray__": True, "dtype": "uint8", "shape": list(PIXELS.shape), "data": PIXELS.tobytes()},
            "max_new_tokens": 3, "temperature": 0}
    response = client.post("/predict/vlm", content=msgpack.packb(body),
                           headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    assert response.status_code == 200, response.content
    reply = msgpack.unpackb(response.content)
    json_reply = caption(client, "vlm", image=encode_array(PIXELS, binary=False), max_new_tokens=3).json()
    assert reply["captions"] == json_reply["captions"]


def test_several_prompts_and_image_lists(client):
    one, two = png_data_url(0), png_data_url(1)
    body = caption(client, "vlm", images=[[one], [two]], prompt=["the", "a robot"]).json()
    assert len(body["captions"]) == 2
    shared = caption(client, "vlm", images=[one], prompt=["the", "a robot"]).json()
    assert len(shared["captions"]) == 2
    cameras = caption(client, "vlm", images=[one, two]).json()  # two images in one caption = two cameras
    assert len(cameras["captions"]) == 1
    e = error_of(caption(client, "vlm", images=[[one], [two], [one]], prompt=["a", "b"]), 422)
    assert "3 image lists" in e["message"] and e["field"] == "prompt"


@pytest.mark.parametrize("model_type", ["vlm", "vlm_hf"])
def test_evaluate_captions(client, model_type):
    response = client.post(f"/evaluate/{model_type}", json={"images": [png_data_url(0)], "texts": ["a red block"],
                                                            "seed": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert np.isfinite(body["loss"]) and body["num_tokens"] > 0 and body["num_samples"] == 1


def test_not_an_image(client):
    e = error_of(caption(client, "vlm", image=base64.b64encode(b"hello, this is text").decode()), 422)
    assert e["field"] == "image" and "PNG or JPEG" in e["message"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(client, fmt):
    data = png_bytes(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt)
    e = error_of(caption(client, "vlm", images=[png_data_url(0), base64.b64encode(data[:len(data) // 2]).decode()]),
                 422)
    assert e["field"] == "images[1]" and "truncated" in e["message"].lower()


def test_huge_header_refused_before_decoding(client):
    e = error_of(caption(client, "vlm", image=base64.b64encode(huge_header_png()).decode()), 413)
    assert e["field"] == "image" and "20000x20000" in e["message"] and str(256 * 256) in e["message"]


def test_too_many_pixels_in_a_typed_array(client):
    big = np.zeros((300, 300, 3), dtype=np.uint8)
    e = error_of(caption(client, "vlm", image=encode_array(big, binary=False)), 413)
    assert e["field"] == "image"


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((8, 8, 3), dtype=np.int64), "dtype"),
    (np.zeros((8, 8, 4), dtype=np.uint8), "shape"),
    (np.zeros((3, 8, 8, 2), dtype=np.uint8), "shape"),
    (np.full((8, 8, 3), np.nan, dtype=np.float32), "finite"),
    (np.full((8, 8, 3), 2.0, dtype=np.float32), "[0, 1]"),
])
def test_bad_typed_arrays(client, array, fragment):
    e = error_of(caption(client, "vlm", images=[encode_array(array, binary=False)]), 422)
    assert e["field"] == "images[0]" and fragment in e["message"]


def test_too_many_images(client):
    e = error_of(caption(client, "vlm", images=[png_data_url(i) for i in range(4)]), 422)
    assert e["field"] == "images" and "limit of 3" in e["message"]


def test_structure_errors(client):
    assert error_of(caption(client, "vlm"), 422)["field"] == "images"
    assert error_of(caption(client, "vlm", image=png_data_url(0), images=[png_data_url(1)]), 422)["field"] == "images"
    assert error_of(caption(client, "vlm", images=[png_data_url(0), [png_data_url(1)]]), 422)["field"] == "images"
    e = error_of(caption(client, "vlm", image="https://example.com/cat.png"), 422)
    assert "remote image URLs are not fetched" in e["message"]
    e = error_of(caption(client, "vlm_hf", image=png_data_url(0), prompt_token_ids=[1, 2]), 422)
    assert e["field"] == "prompt_token_ids" and "text prompts" in e["message"]


def test_unknown_deployment_and_type(client):
    e = error_of(caption(client, "vlm", image=png_data_url(0), model="nope"), 404)
    assert e["field"] == "model" and "nope" in e["message"]
    e = error_of(client.post("/predict/vlmm", json={}), 404)
    assert "'vlm'" in e["message"]


def test_models_describe_caption_inputs(client):
    io_vlm = client.get("/models/vlm").json()["io"]
    assert io_vlm["tokens_per_image"] == 4 and io_vlm["image_size"] == 32 and "images" in io_vlm["accepts"]
    io_hf = client.get("/models/vlm_hf").json()["io"]
    assert io_hf["image_token_id"] == 301 and io_hf["chat"] is True


@pytest.mark.parametrize("path,body,field", [
    ("/evaluate/vlm", {"input_ids": []}, "input_ids"),
    ("/evaluate/vlm", {"input_ids": [[5, 6], [7, 8], [9, 10]]}, "input_ids"),
    ("/evaluate/vlm", {"texts": []}, "texts"),
    ("/predict/vlm", {"prompt_token_ids": [[5], [6], [7]], "max_new_tokens": 2}, "prompt_token_ids"),
    ("/predict/vlm", {"prompt": ["a", "b", "c"], "max_new_tokens": 2}, "prompt"),
    ("/predict/transformer", {"prompt_token_ids": [[5], [6], [7]], "max_new_tokens": 2}, "prompt_token_ids"),
])
def test_a_refusal_of_a_batch_names_the_field_the_client_sent(tiny_checkpoints, path, body, field):
    """Too few or too many rows are refused naming ``input_ids`` or ``prompt_token_ids`` when those were sent
    (before, captions named ``texts`` and ``prompt`` whichever was sent)."""
    from service import DeploymentSpec
    from tests.service.conftest import serving

    specs = [DeploymentSpec(name=t, checkpoint=str(tiny_checkpoints[t])) for t in ("vlm", "transformer")]
    with serving(*specs, max_batch=2, max_new_tokens=8) as client:
        image = {"image": png_data_url(0)} if "vlm" in path else {}
        refused = client.post(path, json={**image, **body})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == field, refused.text
