"""Images from untrusted bytes or arrays, as (H, W, 3) uint8 RGB, with a pixel limit.

Requests carry images as encoded files (PNG or JPEG; WebP too where this Pillow build
has it) or as plain arrays. Both paths end here so every model sees the same layout and
every client gets the same refusals. The pixel limit is checked on the header, before a
single pixel is decoded, so a small file that claims a huge size costs nothing.

Nothing global is changed: Pillow's ``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``
and the warning filters stay as they are, because other code in the process shares them.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps, features
from PIL.JpegImagePlugin import JpegImageFile
from PIL.PngImagePlugin import PngImageFile

from vla_foundry.errors import InputTooLargeError, InvalidInputError

# The service setting that sets ``max_pixels``; named in messages so an operator knows what to raise.
PIXEL_LIMIT_SETTING = "VLA_MAX_IMAGE_PIXELS"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

# Pillow reads a 16-bit grayscale PNG into one of these modes, with values up to 65535.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_FLOAT_DTYPES = ("float16", "float32", "float64")
_ALLOWED_ARRAYS = ("uint8 with shape (H, W, 3), (H, W, 1) or (H, W), or float16/float32/float64 "
                   "of the same shapes with values in [0, 1]")

# What a broken file can raise from inside Pillow's readers and decoders.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error,
                  zlib.error, Image.DecompressionBombError)


def webp_supported() -> bool:
    return bool(features.check("webp"))


def _reader_for(data: bytes):
    """The Pillow reader class for the bytes' magic number, or None for anything else.

    The format's reader is used directly rather than ``Image.open`` because ``Image.open``
    runs Pillow's own decompression-bomb check, which warns (a global warning filter would
    be needed to silence it) or raises against a process-wide limit; here the only limit
    is the caller's ``max_pixels``.
    """
    if data.startswith(_PNG_MAGIC):
        return "PNG", PngImageFile
    if data.startswith(_JPEG_MAGIC):
        return "JPEG", JpegImageFile
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and webp_supported():
        from PIL.WebPImagePlugin import WebPImageFile

        return "WebP", WebPImageFile
    return None


def _accepted_formats() -> str:
    return "PNG or JPEG (or WebP)" if webp_supported() else "PNG or JPEG"


def _too_large(field: str, width: int, height: int, max_pixels: int, what: str) -> InputTooLargeError:
    return InputTooLargeError(
        f"{field}: {what} {width}x{height} pixels ({width * height}), over this server's limit of {max_pixels} "
        f"({PIXEL_LIMIT_SETTING}); send a smaller image", field)


def decode_image_bytes(data: bytes, *, max_pixels: int, field: str = "image",
                       claim: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """PNG or JPEG bytes (WebP too where Pillow has it) → a new (H, W, 3) uint8 RGB array.

    - The header's width × height is checked against ``max_pixels`` before any pixel is
      decoded: over it → ``InputTooLargeError`` (HTTP 413).
    - Not one of those formats, a truncated or corrupt file, or a 0-pixel image →
      ``InvalidInputError`` (HTTP 422). Truncated files are refused, never half-decoded.
    - EXIF orientation is applied, so the array is upright as a viewer shows it.
    - Gray, palette, 16-bit gray and CMYK become RGB. Alpha is dropped, not composited:
      the stored colour of each pixel is kept, as ``PIL.Image.convert("RGB")`` does.
      16-bit gray is scaled to 8 bits (value / 257, rounded), not clipped.
    - ``claim(pixels)``, when given, is called with width × height from the header, before any pixel is
      decoded: a caller's budget (a server's pixels per request and in flight) refuses there by raising.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{field}: expected encoded image bytes; got {type(data).__name__}", field)
    data = bytes(data)
    if not data:
        raise InvalidInputError(f"{field}: the image is empty (0 bytes); send a {_accepted_formats()} file", field)
    reader = _reader_for(data)
    if reader is None:
        also = " (WebP is accepted too)" if webp_supported() else ""
        raise InvalidInputError(
            f"{field}: the {len(data)} bytes are not a PNG or JPEG image{also}; they start with {data[:8]!r}. "
            "Send the image file's bytes unchanged, or a typed uint8 array", field)
    kind, reader_class = reader
    try:
        # Reads the header only; pixel data is decoded by load() below.
        image = reader_class(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        # Only the WebP reader checks Pillow's own (larger) limit while reading the header.
        raise InputTooLargeError(f"{field}: {e}; this server's limit is {max_pixels} pixels ({PIXEL_LIMIT_SETTING})"
                                 "; send a smaller image", field) from e
    except _DECODE_ERRORS as e:
        raise InvalidInputError(f"{field}: starts like a {kind} file but its header cannot be read ({e}); "
                                f"send a complete {_accepted_formats()} file", field) from e
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidInputError(f"{field}: the {kind} header says {width}x{height} pixels; an image needs at "
                                    "least one pixel", field)
        if width * height > max_pixels:
            raise _too_large(field, width, height, max_pixels, f"the {kind} header says")
        if claim is not None:
            claim(width * height)
        try:
            image.load()
            # ImageFile.load() raises on a short file only while LOAD_TRUNCATED_IMAGES is False; that
            # flag is process-wide and someone else may have set it, so refuse a partial decode here too.
            if ImageFile.LOAD_TRUNCATED_IMAGES and _looks_truncated(kind, data):
                raise OSError("image file is truncated")
            rgb = _to_rgb(ImageOps.exif_transpose(image))
        except _DECODE_ERRORS as e:
            raise InvalidInputError(f"{field}: a {kind} image that cannot be decoded ({_reason(e)}); send a complete, "
                                    f"uncorrupted {_accepted_formats()} file", field) from e
    return rgb


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _looks_truncated(kind: str, data: bytes) -> bool:
    """Whether a PNG's or JPEG's pixel data was cut short (what Pillow refuses while LOAD_TRUNCATED_IMAGES is off):
    a PNG's compressed stream (its IDAT chunks joined) does not reach its end; a JPEG has no EOI marker after its
    first scan (no coded byte can make one: 0xFF is stuffed there). What follows the image (a phone's trailer after
    EOI, anything after IEND) and a PNG's missing IEND alone are no cut."""
    if kind == "PNG":
        stream, offset = zlib.decompressobj(), 8
        while offset + 8 <= len(data):
            length, chunk = struct.unpack(">I4s", data[offset:offset + 8])
            body = data[offset + 8:offset + 8 + length]
            if chunk == b"IDAT":
                while body and not stream.eof:  # (64 KiB of pixels at a time, none kept: only whether it ends)
                    stream.decompress(body, 1 << 16)
                    body = stream.unconsumed_tail
                if stream.eof:
                    return False
            elif chunk == b"IEND":
                break
            offset += 12 + length
        return not stream.eof
    if kind == "JPEG":
        scan = data.find(b"\xff\xda")
        return scan < 0 or data.find(b"\xff\xd9", scan) < 0
    return False


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") would clip 16-bit values at 255; scale the full range to 8 bits instead.
        gray = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        if image.mode in ("P", "PA") or "transparency" in image.info:
            # Palette transparency must go through RGBA; Pillow warns on a direct P → RGB conversion.
            image = image.convert("RGBA")
        image = image.convert("RGB")
    array = np.array(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"unexpected decoded shape {array.shape}")
    return array


def image_from_array(array: np.ndarray, *, max_pixels: int, field: str = "image",
                     claim: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """An image sent as an array → a new, C-contiguous (H, W, 3) uint8 array.

    Accepted: uint8 of shape (H, W, 3), (H, W, 1) or (H, W) (gray is repeated to RGB), and
    float16/float32/float64 of the same shapes with finite values in [0, 1] (× 255, rounded).
    Four channels are refused rather than cut to three: an array's fourth channel may be
    alpha, depth or BGRA, and guessing would feed the model the wrong picture silently.
    Channels-first (3, H, W) arrays are refused with a hint to transpose them.
    Over ``max_pixels`` → ``InputTooLargeError``; anything else not accepted → ``InvalidInputError``.
    """
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"{field}: expected an array; got {type(array).__name__}", field)
    dtype, shape = array.dtype, tuple(array.shape)
    if dtype != np.uint8 and dtype.name not in _FLOAT_DTYPES:
        raise InvalidInputError(f"{field}: array dtype {dtype.name} is not accepted; send {_ALLOWED_ARRAYS}", field)
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3))):
        hint = ""
        if array.ndim == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3, 4):
            hint = "; it looks channels-first: transpose it to (H, W, C)"
        elif array.ndim == 3 and shape[2] == 4:
            hint = "; 4 channels (alpha, depth?) are not accepted: drop the fourth channel"
        raise InvalidInputError(f"{field}: array shape {list(shape)} is not an image{hint}; send {_ALLOWED_ARRAYS}",
                                field)
    height, width = shape[0], shape[1]
    if height == 0 or width == 0:
        raise InvalidInputError(f"{field}: array shape {list(shape)} has no pixels; an image needs at least one",
                                field)
    if height * width > max_pixels:
        raise _too_large(field, width, height, max_pixels, "the array is")
    if claim is not None:  # as decode_image_bytes: before the copy below
        claim(width * height)
    if array.ndim == 2:
        array = array[:, :, None]
    if dtype != np.uint8:
        array = _unit_floats_to_uint8(array, field)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    # A fresh, writable copy: arrays decoded from a request body are read-only views of it.
    return np.array(array, dtype=np.uint8, order="C", copy=True)


def _unit_floats_to_uint8(array: np.ndarray, field: str) -> np.ndarray:
    values = array.astype(np.float64 if array.dtype == np.float64 else np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        raise InvalidInputError(f"{field}: the {array.dtype.name} array has {int((~finite).sum())} NaN or infinite "
                                "values; send finite values in [0, 1]", field)
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        hint = " (it looks like 0-255 pixel values: send them as uint8)" if high > 1.0 and high <= 255.0 else ""
        raise InvalidInputError(f"{field}: float image values must be in [0, 1]; got values from {low:g} to "
                                f"{high:g}{hint}", field)
    return np.rint(values * 255.0).astype(np.uint8)
