"""Request values → images: data: URLs, base64 PNG/JPEG strings and typed arrays.

The wire forms are the service's business (DESIGN: "images may be base64 PNG/JPEG strings
or ``data:`` URLs" or ``{"dtype", "shape", "data"}`` arrays); the pixels are the model
package's, so the decoding and its limits live in ``vla_foundry.image_io``. msgpack
bodies reach here unpacked, with encoded images and array data as bytes (``service.codecs.unpack_msgpack``).

Remote URLs and file paths are never fetched or read: a server that fetches on a
client's behalf can be pointed at its own network or disk.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextvars
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np

from service.codecs import DecodeError, decode_array, is_array_dict
from service.errors import ApiError
from vla_foundry.errors import InputTooLargeError, InvalidInputError
from vla_foundry.image_io import decode_image_bytes, image_from_array, webp_supported

_DATA_URL_TYPES = {"image/png", "image/jpeg", "image/jpg"}  # image/jpg is not registered, but common
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_REMOTE_SCHEMES = ("http", "https", "ftp", "ftps", "s3", "gs")
_WHITESPACE = re.compile(r"\s+")

SEND_INSTEAD = "send the image as a data: URL, base64 PNG/JPEG or a typed array"
_FORMS = 'a data: URL, a base64 PNG/JPEG string or a typed array {"dtype", "shape", "data"}'


class PixelBudget:
    """Bounds the decoded image pixels the server holds: at most ``per_request`` for one request (more: 413),
    at most ``in_flight`` for all the requests holding decoded images at once (more: 503 with Retry-After).

    A request (an HTTP request with a body, a websocket frame) holds a ``lease`` while it is served; each of
    its images claims its width × height from its header, before a pixel is decoded, and the claims return
    when the request ends. Without a lease (a caller outside a request) nothing is counted. Encoded bytes
    are bounded elsewhere (the body cap); this bounds what they decode to, which for a compressible image
    is thousands of times more: 49 KB of PNG zeros are 50 MB of pixels.
    """

    def __init__(self, per_request: int, in_flight: int):
        self.per_request, self.in_flight = per_request, in_flight
        self._used = 0
        self._lock = threading.Lock()  # claims come from the thread pool, releases from the event loop

    @property
    def used(self) -> int:
        """Pixels claimed by the requests now in flight."""
        return self._used

    @contextmanager
    def lease(self) -> Iterator["PixelLease"]:
        lease = PixelLease(self)
        token = _current_lease.set(lease)  # copied into the thread pool's context with the request's
        try:
            yield lease
        finally:
            _current_lease.reset(token)
            lease.release()

    def _take(self, pixels: int, field: str) -> None:
        with self._lock:
            if self._used + pixels > self.in_flight:
                raise ApiError(503, f"{field}: the requests in flight hold {self._used} decoded image pixels, and "
                                    f"this image's {pixels} would pass this server's limit of {self.in_flight} "
                                    "(VLA_MAX_PIXELS_IN_FLIGHT); retry shortly", field, retry_after=1,
                               type="overloaded")
            self._used += pixels

    def _give_back(self, pixels: int) -> None:
        with self._lock:
            self._used -= pixels


class PixelLease:
    """One request's claims on a ``PixelBudget``."""

    def __init__(self, budget: PixelBudget):
        self.budget, self.held = budget, 0

    def claim(self, pixels: int, field: str) -> None:
        total = self.held + pixels
        if total > self.budget.per_request:
            raise InputTooLargeError(f"{field}: the request's images come to {total} pixels, over this server's "
                                     f"limit of {self.budget.per_request} per request (VLA_MAX_REQUEST_PIXELS); "
                                     "send fewer or smaller images", field)
        self.budget._take(pixels, field)
        self.held = total

    def release(self) -> None:
        held, self.held = self.held, 0
        self.budget._give_back(held)


_current_lease: contextvars.ContextVar[Optional[PixelLease]] = contextvars.ContextVar("pixel_lease", default=None)


def release_pixels() -> None:
    """Gives back what the current request's images claimed (a refused request that waits before its reply)."""
    lease = _current_lease.get()
    if lease is not None:
        lease.release()


def hold_pixels_until(future: concurrent.futures.Future) -> None:
    """The current request's image pixels stay claimed until ``future`` is done, though the request ends now: its
    model call runs on after its client left (a call that has started is not stopped), with the decoded images."""
    lease = _current_lease.get()
    if lease is None or not lease.held:
        return
    kept = PixelLease(lease.budget)
    kept.held, lease.held = lease.held, 0
    future.add_done_callback(lambda _: kept.release())


def _claimer(field: str):
    """The ``claim`` callback for one image: its pixels go on the current request's lease, if any."""
    lease = _current_lease.get()
    return None if lease is None else (lambda pixels: lease.claim(pixels, field))


def decode_image_value(value: Any, *, max_pixels: int, max_bytes: Optional[int] = None, field: str) -> np.ndarray:
    """One request value → a (H, W, 3) uint8 RGB array.

    Accepted: ``data:image/png;base64,...`` or ``data:image/jpeg;base64,...`` (WebP too where
    Pillow has it), a bare base64 string of PNG/JPEG bytes, or an array dict
    (``service.codecs`` convention; see ``vla_foundry.image_io.image_from_array`` for the
    dtypes and shapes). ``max_bytes`` limits the encoded file's size (arrays are bounded
    by ``max_pixels``). Over a limit → ``InputTooLargeError`` (413); anything else not
    accepted → ``InvalidInputError`` (422), both with ``field`` set.
    """
    if isinstance(value, dict):
        if not is_array_dict(value):
            raise InvalidInputError(f"{field}: an image object must be a typed array with keys dtype, shape and data; "
                                    f"got keys {sorted(map(str, value))}", field)
        try:
            array = decode_array(value)
        except DecodeError as e:
            raise InvalidInputError(f"{field}: {e}", field) from e
        return image_from_array(array, max_pixels=max_pixels, field=field, claim=_claimer(field))
    if isinstance(value, (bytes, bytearray)):  # raw file bytes, for callers that already hold them
        _check_bytes(len(value), max_bytes, field)
        return decode_image_bytes(bytes(value), max_pixels=max_pixels, field=field, claim=_claimer(field))
    if not isinstance(value, str):
        raise InvalidInputError(f"{field}: an image must be {_FORMS}; got {type(value).__name__}", field)
    text = value.strip()
    if not text:
        raise InvalidInputError(f"{field}: the image string is empty; {SEND_INSTEAD}", field)
    if text[:5].lower() == "data:":
        return _decode_base64_image(_data_url_payload(text, field), max_pixels, max_bytes, field)
    if _url_scheme(text) in _REMOTE_SCHEMES:
        raise InvalidInputError(f"{field}: remote image URLs are not fetched; {SEND_INSTEAD}", field)
    if _url_scheme(text):
        raise InvalidInputError(f"{field}: {_url_scheme(text)}: URLs are not read; {SEND_INSTEAD}", field)
    if _looks_like_path(text):
        raise _path_error(text, field)
    # A path is asked about only once the text failed to decode: base64 holds '/' anywhere (a JPEG's starts with
    # "/9j/"). Text that is no base64 at all and names folders (etc/hosts) is a path; text that is base64 but no
    # image is one only when it starts at the root (/etc/passwd): the base64 of a GIF or a BMP holds '/' too.
    try:
        data = _b64decode(text, max_bytes, field)
    except InvalidInputError as e:
        if isinstance(e, InputTooLargeError) or not _may_be_unix_path(text):
            raise
        raise _path_error(text, field) from None
    try:
        return decode_image_bytes(data, max_pixels=max_pixels, field=field, claim=_claimer(field))
    except InvalidInputError as e:
        if isinstance(e, InputTooLargeError) or not (text.startswith("/") and _may_be_unix_path(text)):
            raise
        raise _path_error(text, field) from None


def _decode_base64_image(encoded: str, max_pixels: int, max_bytes: Optional[int], field: str) -> np.ndarray:
    return decode_image_bytes(_b64decode(encoded, max_bytes, field), max_pixels=max_pixels, field=field,
                              claim=_claimer(field))


def decode_image_list(values: Any, *, max_images: int, max_pixels: int, max_bytes: Optional[int] = None,
                      field: str = "images") -> list[np.ndarray]:
    """A request's list of images → (H, W, 3) uint8 arrays; each error names ``images[i]``.

    More than ``max_images`` → ``InvalidInputError`` (422), checked before anything is decoded.
    An empty list gives an empty list: whether images are required is the caller's rule.
    """
    if not isinstance(values, (list, tuple)):
        raise InvalidInputError(f"{field} must be a list of images ({_FORMS} each); got {type(values).__name__}"
                                "; wrap a single image in a list", field)
    if len(values) > max_images:
        raise InvalidInputError(f"{field}: {len(values)} images, over this server's limit of {max_images} per "
                                f"request; send at most {max_images}", field)
    return [decode_image_value(v, max_pixels=max_pixels, max_bytes=max_bytes, field=f"{field}[{i}]")
            for i, v in enumerate(values)]


def _data_url_payload(text: str, field: str) -> str:
    header, comma, payload = text[5:].partition(",")
    if not comma:
        raise InvalidInputError(f"{field}: a data: URL needs a comma before its data "
                                "(data:image/png;base64,<base64>)", field)
    media_type, *params = [p.strip().lower() for p in header.split(";")]
    allowed = _DATA_URL_TYPES | ({"image/webp"} if webp_supported() else set())
    if media_type not in allowed:
        raise InvalidInputError(f"{field}: data: URL media type {media_type or '(none)'!r} is not accepted; "
                                f"use one of {', '.join(sorted(allowed))}", field)
    if "base64" not in params:
        raise InvalidInputError(f"{field}: the data: URL is not base64-encoded; send "
                                f"data:{media_type};base64,<base64 of the file>", field)
    # The declared type is not matched against the bytes: the bytes' own magic number decides the format.
    return payload


def _b64decode(encoded: str, max_bytes: Optional[int], field: str) -> bytes:
    # Line breaks are common (base64 tools wrap at 76 columns) and carry no data.
    compact = _WHITESPACE.sub("", encoded)
    if max_bytes is not None:
        # Checked on the length before decoding, so an oversized string is never decoded.
        _check_bytes(len(compact) // 4 * 3 - compact[-2:].count("="), max_bytes, field)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{field}: the image string is not valid base64 ({e}); {SEND_INSTEAD}", field) from e
    if not data:
        raise InvalidInputError(f"{field}: the image data is empty; {SEND_INSTEAD}", field)
    return data


def _check_bytes(size: int, max_bytes: Optional[int], field: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise InputTooLargeError(f"{field}: the encoded image is {size} bytes, over this server's limit of "
                                 f"{max_bytes} bytes per image; send a smaller or more compressed image", field)


def _url_scheme(text: str) -> str:
    # ':' never occurs in base64, so a leading "scheme:" means a URL; one letter is a Windows drive.
    match = _SCHEME.match(text)
    return match.group(0)[:-1].lower() if match and match.end() > 2 else ""


def _looks_like_path(text: str) -> bool:
    # '.', ':', '\\' and '~' never occur in base64, so a string with them cannot be image data;
    # base64 JPEG starts with "/9j/", so a leading '/' alone proves nothing.
    return any(c in text for c in ".:\\~")


# The base64 of the formats' first bytes: a string that starts so is a (broken) image, not a path.
_IMAGE_BASE64_PREFIXES = ("/9j/", "iVBOR", "UklGR")  # JPEG, PNG, WebP (RIFF)
_MAX_PATH_CHARS = 4096  # PATH_MAX on Linux: longer strings are data


def _may_be_unix_path(text: str) -> bool:
    """A string that did not decode as an image could have been meant as a path without a dot (/etc/passwd,
    /dev/video0): it names folders with '/', and it is neither long nor the start of an encoded image."""
    return "/" in text and len(text) <= _MAX_PATH_CHARS and not text.startswith(_IMAGE_BASE64_PREFIXES)


def _path_error(text: str, field: str) -> InvalidInputError:
    return InvalidInputError(f"{field}: {text[:60]!r} looks like a file path, and the server reads no files: "
                             f"images travel in the request; {SEND_INSTEAD}", field)
