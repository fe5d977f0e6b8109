"""Request values → images: data: URLs, base64, typed arrays, limits, and the HTTP statuses."""

import base64
import io
import struct
import zlib

import msgpack
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import BaseModel, field_validator

from service.codecs import encode_array, unpack_msgpack
from service.errors import install_error_handlers
from service.images import decode_image_list, decode_image_value
from vla_foundry.errors import InputTooLargeError, InvalidInputError

LIMIT = 16_777_216


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def png(pixels) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(value, **limits):
    limits.setdefault("max_pixels", LIMIT)
    return decode_image_value(value, field="images[0]", **limits)


def huge_png() -> bytes:
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    struct.pack_into(">II", data, 16, 20000, 20000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ----------------------------------------------------------------------------- accepted forms


@pytest.mark.parametrize("media_type", ["image/png", "IMAGE/PNG", "image/jpeg", "image/jpg"])
def test_data_url_decodes(png, pixels, media_type):
    # The bytes' magic number picks the decoder; the declared image type only has to be accepted.
    out = decode(f"data:{media_type};base64,{b64(png)}")
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_data_url_decodes(pixels):
    out = decode("data:image/jpeg;base64," + b64(encode(Image.fromarray(pixels), "JPEG")))
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8


def test_bare_base64_decodes_with_line_breaks_and_padding_whitespace(png, pixels):
    wrapped = "\n".join(b64(png)[i:i + 76] for i in range(0, len(b64(png)), 76))
    np.testing.assert_array_equal(decode(f"  {wrapped}\n"), pixels)


def test_base64_jpeg_starting_with_a_slash_is_not_taken_for_a_path(pixels):
    text = b64(encode(Image.fromarray(pixels), "JPEG"))
    assert text.startswith("/9j/")
    assert decode(text).shape == (6, 9, 3)


def test_gray_and_rgba_pngs_become_rgb(pixels):
    gray = decode(b64(encode(Image.fromarray(pixels[:, :, 1], "L"), "PNG")))
    np.testing.assert_array_equal(gray[:, :, 0], pixels[:, :, 1])
    rgba = np.concatenate([pixels, np.full((6, 9, 1), 128, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode(b64(encode(Image.fromarray(rgba, "RGBA"), "PNG"))), pixels)


def test_typed_uint8_array_decodes(pixels):
    np.testing.assert_array_equal(decode(encode_array(pixels, binary=False)), pixels)


def test_typed_gray_array_becomes_rgb(pixels):
    out = decode(encode_array(pixels[:, :, 2], binary=False))
    assert out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out[:, :, 1], pixels[:, :, 2])


def test_typed_float_array_in_unit_range_decodes():
    values = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    assert decode(encode_array(values, binary=False)).tolist() == [[[0, 128, 255]]]


def test_msgpack_array_and_encoded_bytes_reach_the_same_result_after_unpacking(pixels, png):
    body = msgpack.packb({"images": [encode_array(pixels, binary=True), png]}, use_bin_type=True)
    unpacked = unpack_msgpack(body)
    assert isinstance(unpacked["images"][0]["data"], bytes) and "__ndarray__" not in unpacked["images"][0]
    out = decode_image_list(unpacked["images"], max_images=4, max_pixels=LIMIT)
    np.testing.assert_array_equal(out[0], pixels)
    np.testing.assert_array_equal(out[1], pixels)


def test_raw_bytes_are_accepted_for_callers_that_hold_them(png, pixels):
    np.testing.assert_array_equal(decode(png), pixels)


def test_image_list_decodes_each_and_allows_empty(png, pixels):
    out = decode_image_list([b64(png), encode_array(pixels, binary=False)], max_images=2, max_pixels=LIMIT)
    assert len(out) == 2 and all(o.shape == (6, 9, 3) for o in out)
    assert decode_image_list([], max_images=2, max_pixels=LIMIT) == []


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.jpg", "HTTPS://x/y"])
def test_remote_urls_are_not_fetched(url):
    with pytest.raises(InvalidInputError) as e:
        decode(url)
    assert type(e.value) is InvalidInputError and e.value.field == "images[0]"
    assert str(e.value) == ("images[0]: remote image URLs are not fetched; send the image as a data: URL, "
                            "base64 PNG/JPEG or a typed array")


@pytest.mark.parametrize("path", ["/tmp/cat.png", "cat.jpg", "C:\\images\\cat.png", "~/cat.png", "file:///etc/passwd"])
def test_file_paths_and_file_urls_are_not_read(path):
    with pytest.raises(InvalidInputError, match="(file path|file: URLs are not read).*send the image as a data: URL"):
        decode(path)


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/video0", "etc/hosts", "/home/robot/cam0", "/data/frames/"])
def test_paths_without_a_dot_are_named_as_paths_not_as_bad_base64(path):
    """Such a path is valid base64 text or nearly, so it used to be refused as 'not valid base64 (Incorrect
    padding)' or as bytes that are not an image: the message must say what happened and what to send."""
    with pytest.raises(InvalidInputError) as refused:
        decode(path)
    assert refused.value.field == "images[0]"
    assert str(refused.value) == (f"images[0]: {path!r} looks like a file path, and the server reads no files: "
                                  "images travel in the request; send the image as a data: URL, base64 PNG/JPEG or "
                                  "a typed array")


@pytest.mark.parametrize("text, message", [
    ("/9j/4AAQSkZJRgABAQAA", "starts like a JPEG file"),  # a truncated base64 JPEG is a broken image, not a path
    ("bm90IGFuIGltYWdl", "are not a PNG or JPEG image"),  # no '/': base64 of other bytes
    ("abc", "not valid base64"),
])
def test_strings_that_are_no_path_keep_their_own_reason(text, message):
    with pytest.raises(InvalidInputError, match=message):
        decode(text)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_images_in_formats_not_taken_are_named_by_their_format_not_as_paths(fmt):
    """The base64 of almost any image holds a '/' somewhere: only a string starting at the root reads as a path."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)).save(buffer, format=fmt)
    text = b64(buffer.getvalue())
    assert "/" in text[1:]  # (the case at hand)
    with pytest.raises(InvalidInputError, match="are not a PNG or JPEG image"):
        decode(text)


@pytest.mark.parametrize("media_type", ["text/plain", "image/gif", "application/octet-stream", ""])
def test_data_url_with_other_media_types_is_refused(png, media_type):
    with pytest.raises(InvalidInputError, match="media type .* is not accepted; use one of image/jpeg") as e:
        decode(f"data:{media_type};base64,{b64(png)}")
    assert e.value.field == "images[0]"


def test_data_url_that_is_not_base64_or_has_no_comma_is_refused(png):
    with pytest.raises(InvalidInputError, match="not base64-encoded"):
        decode("data:image/png,rawtext")
    with pytest.raises(InvalidInputError, match="needs a comma"):
        decode("data:image/png;base64")


@pytest.mark.parametrize("text", ["not base64 at all!", "iVBORw0KGgo", "@@@@"])
def test_bad_base64_is_refused(text):
    with pytest.raises(InvalidInputError, match="images\\[0\\]: the image string is not valid base64") as e:
        decode(text)
    assert e.value.field == "images[0]"


@pytest.mark.parametrize("data", [b"hello, this is text", np.random.default_rng(2).bytes(64)])
def test_base64_of_something_that_is_not_an_image_is_refused(data):
    with pytest.raises(InvalidInputError, match="not a PNG or JPEG image") as e:
        decode("data:image/png;base64," + b64(data))
    assert e.value.field == "images[0]"


def test_truncated_png_in_base64_is_refused(png):
    with pytest.raises(InvalidInputError, match="PNG .*truncated|PNG .*cannot be"):
        decode(b64(png[: len(png) // 2]))


def test_huge_header_is_too_large_and_names_the_limit():
    with pytest.raises(InputTooLargeError) as e:
        decode_image_value(b64(huge_png()), max_pixels=LIMIT, field="images[1]")
    assert e.value.field == "images[1]"
    assert "20000x20000" in str(e.value) and "limit of 16777216 (VLA_MAX_IMAGE_PIXELS)" in str(e.value)


def test_encoded_bytes_over_max_bytes_are_too_large_before_decoding(png):
    with pytest.raises(InputTooLargeError, match=f"is {len(png)} bytes, over this server's limit of 100 bytes"):
        decode(b64(png), max_bytes=100)
    with pytest.raises(InputTooLargeError, match=f"is {len(png)} bytes"):
        decode(png, max_bytes=100)
    assert decode(b64(png), max_bytes=len(png)).shape == (6, 9, 3)  # the limit itself is allowed


@pytest.mark.parametrize("array,fragment", [
    ({"dtype": "int64", "shape": [1, 1, 3], "data": b64(bytes(24))}, "dtype int64 is not accepted"),
    ({"dtype": "complex64", "shape": [1, 1, 3], "data": b64(bytes(24))}, "complex arrays are refused"),
    ({"dtype": "uint8", "shape": [2, 2, 4], "data": b64(bytes(16))}, "4 channels"),
    ({"dtype": "uint8", "shape": [3, 8, 8], "data": b64(bytes(192))}, "channels-first"),
    ({"dtype": "uint8", "shape": [2, 2, 3], "data": b64(bytes(5))}, "array data has 5 bytes"),
    ({"dtype": "uint8", "shape": [2, 2, 3], "data": "%%%"}, "not valid base64"),
    ({"dtype": "float32", "shape": [1, 1, 3], "data": b64(np.array([0, np.nan, 1], np.float32).tobytes())},
     "NaN or infinite"),
    ({"dtype": "float32", "shape": [1, 1, 3], "data": b64(np.array([0, 2, 1], np.float32).tobytes())},
     r"must be in \[0, 1\]"),
])
def test_bad_typed_arrays_are_refused_with_the_field(array, fragment):
    with pytest.raises(InvalidInputError, match=fragment) as e:
        decode_image_value(array, max_pixels=LIMIT, field="images[2]")
    assert type(e.value) is InvalidInputError and e.value.field == "images[2]"
    assert str(e.value).startswith("images[2]: ")


def test_typed_array_over_the_pixel_limit_is_too_large():
    with pytest.raises(InputTooLargeError, match="over this server's limit of 10"):
        decode(encode_array(np.zeros((4, 4, 3), np.uint8), binary=False), max_pixels=10)


@pytest.mark.parametrize("value,fragment", [(42, "got int"), (None, "got NoneType"), ([1, 2], "got list"),
                                            ({"url": "x"}, "got keys \\['url'\\]"), ("   ", "is empty")])
def test_other_values_are_refused(value, fragment):
    with pytest.raises(InvalidInputError, match=fragment) as e:
        decode(value)
    assert e.value.field == "images[0]"


def test_too_many_images_are_refused_before_decoding():
    with pytest.raises(InvalidInputError) as e:
        decode_image_list(["not even decoded"] * 5, max_images=4, max_pixels=LIMIT)
    assert type(e.value) is InvalidInputError and e.value.field == "images"
    assert str(e.value) == "images: 5 images, over this server's limit of 4 per request; send at most 4"


def test_list_errors_name_the_index(png):
    with pytest.raises(InvalidInputError, match=r"^frames\[2\]: remote") as e:
        decode_image_list([b64(png), b64(png), "http://x/y.png"], max_images=4, max_pixels=LIMIT, field="frames")
    assert e.value.field == "frames[2]"


def test_a_single_image_instead_of_a_list_is_refused(png):
    with pytest.raises(InvalidInputError, match="must be a list of images.*wrap a single image in a list"):
        decode_image_list(b64(png), max_images=4, max_pixels=LIMIT)


# ----------------------------------------------------------------------------- HTTP statuses


class Body(BaseModel):
    images: list


class ValidatedBody(BaseModel):
    images: list

    @field_validator("images")
    @classmethod
    def _decode(cls, value):
        decode_image_list(value, max_images=2, max_pixels=100)
        return value


@pytest.fixture(scope="module")
def http():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/in-route")
    async def in_route(body: Body):
        return {"shapes": [list(a.shape) for a in decode_image_list(body.images, max_images=2, max_pixels=100)]}

    @app.post("/in-validator")
    async def in_validator(body: ValidatedBody):
        return {"ok": True}

    return TestClient(app)


@pytest.mark.parametrize("path", ["/in-route", "/in-validator"])
def test_http_statuses_413_for_too_large_and_422_for_invalid(http, path, png):
    big = encode_array(np.zeros((11, 10, 3), np.uint8), binary=False)
    response = http.post(path, json={"images": [b64(png), big]})
    assert response.status_code == 413, response.text
    assert response.json() == {"error": {
        "type": "payload_too_large", "field": "images[1]",
        "message": "images[1]: the array is 10x11 pixels (110), over this server's limit of 100 "
                   "(VLA_MAX_IMAGE_PIXELS); send a smaller image"}}

    response = http.post(path, json={"images": ["https://example.com/a.png"]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_value" and error["field"] == "images[0]"
    assert "remote image URLs are not fetched" in error["message"]

    response = http.post(path, json={"images": ["/etc/passwd"]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "images[0]" and "'/etc/passwd' looks like a file path" in error["message"]

    response = http.post(path, json={"images": [b64(png)] * 3})
    assert response.status_code == 422 and response.json()["error"]["field"] == "images"


def test_http_ok_path(http, png):
    assert http.post("/in-route", json={"images": [b64(png)]}).json() == {"shapes": [[6, 9, 3]]}
