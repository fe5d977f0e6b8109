"""Images from untrusted bytes and arrays: round trips, conversions and every refusal."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vla_foundry.errors import InputTooLargeError, InvalidInputError
from vla_foundry.image_io import decode_image_bytes, image_from_array, webp_supported

LIMIT = 16_777_216


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    array = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    array[:12] = 90  # a flat band, so lossy JPEG stays close to the source there
    return array


def png_with_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is rewritten to claim another size, with a valid CRC."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ----------------------------------------------------------------------------- encoded images


def test_png_rgb_round_trip_is_exact(pixels):
    out = decode_image_bytes(encode(Image.fromarray(pixels), "PNG"), max_pixels=LIMIT)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    np.testing.assert_array_equal(out, pixels)
    assert out.flags.writeable and out.flags.c_contiguous


def test_jpeg_rgb_round_trip_is_close(pixels):
    out = decode_image_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95, subsampling=0), max_pixels=LIMIT)
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8
    assert np.abs(out[:6].astype(int) - 90).max() <= 4  # the flat band, away from the noisy rows' ringing


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_gray_becomes_rgb_with_equal_channels(pixels, fmt):
    gray = pixels[:, :, 0]
    out = decode_image_bytes(encode(Image.fromarray(gray, "L"), fmt, **({"quality": 95} if fmt == "JPEG" else {})),
                             max_pixels=LIMIT)
    assert out.shape == (24, 40, 3)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    if fmt == "PNG":
        np.testing.assert_array_equal(out[:, :, 1], gray)


def test_rgba_png_drops_alpha_and_keeps_the_stored_colour(pixels):
    rgba = np.concatenate([pixels, np.zeros((24, 40, 1), np.uint8)], axis=2)  # fully transparent
    out = decode_image_bytes(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=LIMIT)
    np.testing.assert_array_equal(out, pixels)  # not composited over black


def test_palette_png_becomes_its_rgb_colours():
    image = Image.new("P", (3, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    image.putdata([0, 1, 2, 2, 1, 0])
    out = decode_image_bytes(encode(image, "PNG"), max_pixels=LIMIT)
    assert out.shape == (2, 3, 3)
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_palette_png_with_transparency_decodes_without_warnings(recwarn):
    image = Image.new("P", (2, 2))
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    image.putdata([0, 1, 1, 0])
    out = decode_image_bytes(encode(image, "PNG", transparency=b"\x00\xff"), max_pixels=LIMIT)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [40, 50, 60]
    assert not [w for w in recwarn if "ransparency" in str(w.message)]


def test_sixteen_bit_gray_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = decode_image_bytes(encode(Image.fromarray(values), "PNG"), max_pixels=LIMIT)
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_cmyk_jpeg_becomes_rgb():
    out = decode_image_bytes(encode(Image.new("CMYK", (8, 4), (0, 0, 0, 0)), "JPEG", quality=95), max_pixels=LIMIT)
    assert out.shape == (4, 8, 3) and out.min() >= 250  # no ink is white


def test_exif_orientation_is_applied_to_jpeg():
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image_bytes(encode(image, "JPEG", exif=exif.tobytes()), max_pixels=LIMIT)
    assert out.shape == (40, 20, 3)  # stored 40 wide, shown 20 wide


@pytest.mark.skipif(not webp_supported(), reason="this Pillow has no WebP")
def test_webp_is_accepted_where_pillow_has_it(pixels):
    out = decode_image_bytes(encode(Image.fromarray(pixels), "WEBP", lossless=True), max_pixels=LIMIT)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("data", [b"just some text, not an image", bytes(range(256)), b"GIF89a" + b"\x00" * 40])
def test_bytes_that_are_not_png_or_jpeg_are_refused(data):
    with pytest.raises(InvalidInputError) as e:
        decode_image_bytes(data, max_pixels=LIMIT, field="images[0]")
    assert type(e.value) is InvalidInputError
    assert e.value.field == "images[0]"
    assert str(e.value).startswith("images[0]: ") and "not a PNG or JPEG image" in str(e.value)


def test_empty_bytes_are_refused():
    with pytest.raises(InvalidInputError, match="empty"):
        decode_image_bytes(b"", max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused_not_half_decoded(pixels, fmt):
    data = encode(Image.fromarray(pixels), fmt)
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(InvalidInputError, match=f"{fmt} .*(truncated|cannot be)") as e:
            decode_image_bytes(data[:cut], max_pixels=LIMIT, field="img")
        assert e.value.field == "img"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # decoding never flips the process-wide flag


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused_even_if_someone_allowed_them_globally(pixels, fmt, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(pixels), fmt)
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(InvalidInputError, match="(?i)truncated"):
            decode_image_bytes(data[:cut], max_pixels=LIMIT)


@pytest.mark.parametrize("allowed_globally", [False, True])
@pytest.mark.parametrize("fmt,edit,taken", [
    ("PNG", lambda data: data + b"appended by the camera app" * 10, True),
    ("JPEG", lambda data: data + b"\x00" * 100 + b"a phone's trailer", True),
    ("PNG", lambda data: data[:-12], True),  # lacks only IEND
    ("JPEG", lambda data: data[:-2], False),  # lacks EOI: it cannot be told from a scan cut short
], ids=["PNG after IEND", "JPEG after EOI", "PNG without IEND", "JPEG without EOI"])
def test_end_markers_are_judged_alike_whatever_the_process_wide_flag(pixels, monkeypatch, allowed_globally, fmt,
                                                                     edit, taken):
    """Data after the end marker, and a PNG's missing IEND, are no cut; a JPEG without EOI is refused. With Pillow's
    LOAD_TRUNCATED_IMAGES set by another library, the same (before, the last bytes were read: complete images with
    a trailer, or a PNG without IEND, were refused then)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", allowed_globally)
    data = encode(Image.fromarray(pixels), fmt)
    if not taken:
        with pytest.raises(InvalidInputError, match="(?i)truncated"):
            decode_image_bytes(edit(data), max_pixels=LIMIT)
        return
    np.testing.assert_array_equal(decode_image_bytes(edit(data), max_pixels=LIMIT),
                                  decode_image_bytes(data, max_pixels=LIMIT))


def test_header_claiming_a_huge_size_is_refused_before_decoding():
    data = png_with_size(20000, 20000)
    start = time.perf_counter()
    with pytest.raises(InputTooLargeError) as e:
        decode_image_bytes(data, max_pixels=LIMIT, field="images[1]")
    assert time.perf_counter() - start < 0.5  # nothing of 400M pixels was allocated or decoded
    assert e.value.field == "images[1]"
    assert str(e.value) == ("images[1]: the PNG header says 20000x20000 pixels (400000000), over this server's "
                            "limit of 16777216 (VLA_MAX_IMAGE_PIXELS); send a smaller image")


def test_pixel_limit_is_inclusive(pixels):
    data = encode(Image.fromarray(pixels), "PNG")
    assert decode_image_bytes(data, max_pixels=24 * 40).shape == (24, 40, 3)
    with pytest.raises(InputTooLargeError, match="over this server's limit of 959 "):
        decode_image_bytes(data, max_pixels=24 * 40 - 1)


def test_larger_than_pillows_own_bomb_limit_is_ours_to_refuse(recwarn):
    # 60000x60000 is past 2x Image.MAX_IMAGE_PIXELS, where Image.open itself would raise or warn.
    with pytest.raises(InputTooLargeError, match="60000x60000"):
        decode_image_bytes(png_with_size(60000, 60000), max_pixels=LIMIT)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_zero_size_image_is_refused():
    with pytest.raises(InvalidInputError) as e:
        decode_image_bytes(png_with_size(0, 5), max_pixels=LIMIT, field="images[0]")
    assert type(e.value) is InvalidInputError and e.value.field == "images[0]"


def test_non_bytes_are_refused():
    with pytest.raises(InvalidInputError, match="expected encoded image bytes; got str"):
        decode_image_bytes("iVBORw0KGgo=", max_pixels=LIMIT)


# ----------------------------------------------------------------------------- arrays


def test_uint8_hwc_array_is_copied_unchanged(pixels):
    source = pixels.copy()
    source.setflags(write=False)
    out = image_from_array(source, max_pixels=LIMIT)
    np.testing.assert_array_equal(out, pixels)
    assert out.flags.writeable and out.flags.c_contiguous and not np.shares_memory(out, source)


@pytest.mark.parametrize("shape", [(24, 40), (24, 40, 1)])
def test_gray_arrays_become_rgb(pixels, shape):
    gray = pixels[:, :, 0].reshape(shape)
    out = image_from_array(gray, max_pixels=LIMIT)
    assert out.shape == (24, 40, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], pixels[:, :, 0])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f4"])
def test_unit_float_arrays_are_scaled_and_rounded(dtype):
    values = np.array([[[0.0, 0.5, 1.0], [0.25, 0.999, 0.002]]], dtype=dtype)
    out = image_from_array(values, max_pixels=LIMIT)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [0, 128, 255]
    assert out[0, 1].tolist() == [64, 255, 1]  # 63.75, 254.75, 0.51 rounded


@pytest.mark.parametrize("dtype", ["int64", "uint16", "int8", "bool", "int32"])
def test_other_dtypes_are_refused(dtype):
    with pytest.raises(InvalidInputError) as e:
        image_from_array(np.zeros((4, 4, 3), dtype=dtype), max_pixels=LIMIT, field="images[3]")
    assert e.value.field == "images[3]"
    assert f"dtype {np.dtype(dtype).name} is not accepted" in str(e.value) and "uint8" in str(e.value)


def test_rgba_arrays_are_refused_not_cut_to_rgb():
    with pytest.raises(InvalidInputError) as e:
        image_from_array(np.zeros((4, 4, 4), np.uint8), max_pixels=LIMIT, field="images[0]")
    assert "shape [4, 4, 4]" in str(e.value) and "4 channels" in str(e.value) and "(H, W, 3)" in str(e.value)


@pytest.mark.parametrize("shape,fragment", [((3, 32, 32), "channels-first"), ((4, 4, 2), "shape [4, 4, 2]"),
                                            ((2, 4, 4, 3), "shape [2, 4, 4, 3]"), ((12,), "shape [12]")])
def test_wrong_shapes_are_refused(shape, fragment):
    with pytest.raises(InvalidInputError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as e:
        image_from_array(np.zeros(shape, np.uint8), max_pixels=LIMIT, field="frame")
    assert e.value.field == "frame"


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0), (0, 0, 1)])
def test_empty_arrays_are_refused(shape):
    with pytest.raises(InvalidInputError, match="no pixels"):
        image_from_array(np.zeros(shape, np.uint8), max_pixels=LIMIT)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused(bad):
    values = np.full((2, 2, 3), 0.5, np.float32)
    values[1, 1, 2] = bad
    with pytest.raises(InvalidInputError, match="1 NaN or infinite values") as e:
        image_from_array(values, max_pixels=LIMIT, field="images[0]")
    assert e.value.field == "images[0]"


def test_out_of_range_floats_are_refused_with_a_hint_for_0_255():
    with pytest.raises(InvalidInputError, match=r"must be in \[0, 1\]; got values from 0 to 255.*send them as uint8"):
        image_from_array(np.full((2, 2, 3), 255.0, np.float32) * np.array([0, 1, 1]), max_pixels=LIMIT)
    with pytest.raises(InvalidInputError, match=r"from -0.5 to 0.5"):
        image_from_array(np.full((2, 2, 3), 0.5) * np.array([-1, 1, 1]), max_pixels=LIMIT)


def test_array_over_the_pixel_limit_is_too_large():
    with pytest.raises(InputTooLargeError) as e:
        image_from_array(np.zeros((10, 11, 3), np.uint8), max_pixels=100, field="images[2]")
    assert e.value.field == "images[2]"
    assert "11x10 pixels (110), over this server's limit of 100" in str(e.value)


def test_non_arrays_are_refused():
    with pytest.raises(InvalidInputError, match="expected an array; got list"):
        image_from_array([[1, 2, 3]], max_pixels=LIMIT)
