"""Wire formats: JSON by default, msgpack on request (DESIGN §6).

Arrays travel as ``{"dtype", "shape", "data"}``: in JSON ``data`` is base64, in msgpack it
is raw bytes under the ``__ndarray__`` key convention robot clients already use. Incoming
msgpack is unpacked into the same Python values JSON gives, except that bytes stay bytes
(array data, encoded images): one schema serves both, and a camera frame is never
base64-encoded only to be decoded again.

msgpack arrays come in two spellings, both accepted: str keys (``"__ndarray__"``, ``"data"``,
``"dtype"``, ``"shape"``) and openpi's ``msgpack_numpy`` spelling, the same keys as msgpack
*bytes* (``b"__ndarray__"``, ...), with numpy scalars as ``{b"__npgeneric__", b"data",
b"dtype"}``. Both unpack to the same values. openpi's unpacker recognizes arrays only by the
bytes keys, so replies to such a peer are packed in its spelling (``bytes_keys=True``).
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import msgpack
import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

MSGPACK = "application/msgpack"
MSGPACK_TYPES = (MSGPACK, "application/x-msgpack", "application/vnd.msgpack")
REFUSED_DTYPE_KINDS = {"O": "object", "V": "void", "c": "complex"}
ACCEPTED_DTYPE_KINDS = "biuf"  # bool, signed and unsigned integers, floats
MAX_ARRAY_DIMS = 32
MAX_NESTING = 64  # maps and lists inside each other, in a msgpack body
# msgpack bodies up to this size are unpacked on the event loop (three 224x224 cameras in raw bytes take
# 0.03 ms); larger ones in the thread pool, because a body of many tiny values costs about 0.2 s per MiB.
UNPACK_ON_LOOP_BYTES = 512 * 1024
# Map keys in one body (JSON or msgpack) or websocket frame, in all. The request models refuse unknown keys one
# error object each, so a body of 600k keys would hold the event loop for seconds; no request needs near this.
MAX_BODY_KEYS = 10_000


class DecodeError(ValueError):
    """A body, or a value in it, that no request can take. ``field``: where the value is in a msgpack body or
    websocket frame (``observation.images.front[1]``, as a JSON body's errors name fields); None for the body as
    a whole, and where the caller names the field itself (``decode_array``)."""

    field: Optional[str] = None


class NotMsgpack(DecodeError):
    """A body that does not parse as msgpack at all: malformed (400), not an invalid value (422)."""


class TooManyKeys(DecodeError):
    """A body with more map keys than its cap: refused (413) before anything validates it."""

    def __init__(self, max_keys: int):
        super().__init__(f"the body has more than {max_keys} map keys in all; send fewer fields "
                         "(setting VLA_MAX_BODY_KEYS)")


class TooDeep(DecodeError):
    """A body nested deeper than any request: a JSON one deeper than the parser recurses (400), a msgpack one
    deeper than ``MAX_NESTING`` (422); refused as a whole (no field) before anything validates it."""

    def __init__(self, message: str = "the body nests maps and lists thousands deep; no request does: send a "
                                      "flatter body") -> None:
        super().__init__(message)


class InvalidText(DecodeError):
    """A string of the body that is not Unicode text (a lone UTF-16 surrogate, which JSON's ``\\uD800``
    escapes can spell and no tokenizer takes): refused with 422 naming where it is."""

    def __init__(self, field: str):
        super().__init__(f"{field} is not valid Unicode text (it holds a lone UTF-16 surrogate, \\uD800-\\uDFFF "
                         "without its pair); send UTF-8 text")
        self.field = field


# A \uD800-\uDFFF escape: only then can a parsed string hold a lone surrogate (UTF-8 bytes cannot spell one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Escaped backslashes and well-formed pairs (an emoji, as json.dumps writes it): what is left after removing them
# holds a surrogate escape only where the body holds a lone surrogate.
_NOT_LONE = re.compile(rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def loads_json(body: bytes, max_keys: int = MAX_BODY_KEYS) -> Any:
    """``json.loads``, refusing a body with more than ``max_keys`` object keys in all (``TooManyKeys``) as soon
    as it has read them, and one with a string that is not Unicode text (``InvalidText``)."""
    count = 0

    def pairs(items: list) -> dict:
        nonlocal count
        count += len(items)
        if count > max_keys:
            raise TooManyKeys(max_keys)
        return dict(items)

    try:
        value = json.loads(body, object_pairs_hook=pairs)
    except RecursionError:  # nested deeper than the interpreter recurses: no request is that deep
        raise TooDeep() from None
    if _SURROGATE_ESCAPE.search(body) and _SURROGATE_ESCAPE.search(_NOT_LONE.sub(b"", body)):  # rare
        _check_text(value, "")
    return value


def _check_text(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidText(where or "the body") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where or "a key")
            _check_text(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")


def preferred_media_type(accept: str, offered: tuple[str, ...]) -> Optional[str]:
    """The type of ``offered`` (the server's types, most preferred first) that an ``Accept`` header prefers, as
    RFC 9110 §12.5.1 reads it: each type takes the q of the most specific range that matches it (``image/png``
    over ``image/*`` over ``*/*``); q=0, or no range matching, means not acceptable. The highest q wins; at equal q
    a type the client named over one a wildcard let in (``image/png, */*`` asks for PNG), then the server's order.
    No header (or an empty one) is ``*/*``. None when no offered type is acceptable."""
    q_of_range = _accepted_ranges(accept.strip() or "*/*")
    best, best_rank = None, None
    for preference, media_type in enumerate(offered):
        main_type = media_type.split("/")[0]
        for specificity, media_range in ((2, media_type), (1, f"{main_type}/*"), (0, "*/*")):
            if media_range in q_of_range:
                q = q_of_range[media_range]
                rank = (q, specificity, -preference)
                if q > 0 and (best_rank is None or rank > best_rank):
                    best, best_rank = media_type, rank
                break  # the most specific range decides, even when it says q=0
    return best


def _accepted_ranges(accept: str) -> dict[str, float]:
    """An ``Accept`` header's media ranges (lowercase, parameters other than q dropped) → their q (1 when not
    given). A range whose q is not a number in [0, 1] is left out; of a range given twice, the first counts."""
    q_of_range: dict[str, float] = {}
    for media_range in accept.lower().split(","):
        name, *params = (part.strip() for part in media_range.split(";"))
        name = "*/*" if name == "*" else name  # an old spelling of */* (Java's HttpURLConnection sends it)
        q_values = [value.strip() for key, _, value in (p.partition("=") for p in params) if key.strip() == "q"]
        try:
            q = float(q_values[0]) if q_values else 1.0
        except ValueError:
            continue
        if "/" in name and 0.0 <= q <= 1.0:  # NaN fails this too
            q_of_range.setdefault(name, q)
    return q_of_range


JSON = "application/json"
# What any reply of the API can be, in the server's order of preference (JSON when the client has none).
REPLY_TYPES = (JSON, *MSGPACK_TYPES)


def wants_msgpack(accept: str) -> bool:
    """Whether the client's ``Accept`` prefers msgpack to JSON (``preferred_media_type``)."""
    return preferred_media_type(accept or "", REPLY_TYPES) in MSGPACK_TYPES


def is_msgpack(content_type: str) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in MSGPACK_TYPES


# ----------------------------------------------------------------------------- arrays


def array_dtype(name: Any) -> np.dtype:
    """A wire dtype name → numpy dtype; only bool, integer and float dtypes are accepted."""
    if not isinstance(name, str):
        raise DecodeError(f"array dtype must be a string such as '<f4' or '|u1'; got {type(name).__name__}")
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError, SyntaxError) as e:  # numpy parses some strings (",") as Python: SyntaxError
        raise DecodeError(f"unknown array dtype {name!r}; send a numeric dtype such as '<f4' or '|u1'") from e
    if dtype.kind not in ACCEPTED_DTYPE_KINDS or dtype.itemsize == 0:
        kind = REFUSED_DTYPE_KINDS.get(dtype.kind, dtype.name)
        raise DecodeError(f"{kind} arrays are refused (dtype {name!r}); send numeric arrays (bool, int, uint or "
                          "float)")
    return dtype


def decode_array(obj: dict) -> np.ndarray:
    """An array in the wire convention → numpy (validated: dtype, shape, byte count)."""
    dtype = array_dtype(obj.get("dtype"))
    shape = obj.get("shape")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_ARRAY_DIMS or \
            not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(f"array shape must be a list of at most {MAX_ARRAY_DIMS} non-negative ints; got "
                          f"{str(shape)[:80]}")
    data = obj.get("data")
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError as e:
            raise DecodeError("array data is not valid base64") from e
    if not isinstance(data, (bytes, bytearray)):
        raise DecodeError("array data must be bytes (msgpack) or base64 (JSON)")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on absurd shapes
    if len(data) != expected:
        raise DecodeError(f"array data has {len(data)} bytes; dtype {dtype.str} and shape {list(shape)} need "
                          f"{expected}")
    try:
        return np.frombuffer(bytes(data), dtype=dtype).reshape(shape)
    except ValueError as e:  # a zero-size shape with a dimension numpy cannot index, e.g. [0, 2**63]
        raise DecodeError(f"array shape {list(shape)} is not a valid shape ({e})") from e


def encode_array(array: np.ndarray, *, binary: bool, bytes_keys: bool = False) -> dict[str, Any]:
    """An array in the wire convention: base64 ``data`` for JSON, raw bytes for msgpack (``binary``), with
    openpi's bytes keys when ``bytes_keys``."""
    array = np.ascontiguousarray(array)
    data = array.tobytes()
    if bytes_keys:
        return {b"__ndarray__": True, b"data": data, b"dtype": array.dtype.str, b"shape": list(array.shape)}
    if binary:
        return {"__ndarray__": True, "data": data, "dtype": array.dtype.str, "shape": list(array.shape)}
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(data).decode()}


def is_array_dict(value: Any) -> bool:
    return isinstance(value, dict) and {"dtype", "shape", "data"} <= set(value)


# ----------------------------------------------------------------------------- msgpack → values


ARRAY_MARKER, SCALAR_MARKER = "__ndarray__", "__npgeneric__"
# openpi's msgpack_numpy spelling of the typed-value keys → ours.
_OPENPI_KEYS = {b"__ndarray__": ARRAY_MARKER, b"__npgeneric__": SCALAR_MARKER, b"data": "data", b"dtype": "dtype",
                b"shape": "shape"}


@dataclass(frozen=True)
class Unpacked:
    value: Any
    bytes_keys: bool  # an array or scalar came in openpi's bytes-key spelling: answer in it


class _Checker:
    """Walks a value unpacked from msgpack and checks it as JSON would be (finite numbers, string keys);
    bytes are kept. Typed arrays and scalars in either key spelling come out in one form: an array as
    ``{"dtype", "shape", "data"}`` (its dtype checked at once), a scalar as its plain value."""

    def __init__(self, max_keys: int = MAX_BODY_KEYS) -> None:
        self.bytes_keys = False
        self.keys_left = max_keys
        self.max_keys = max_keys

    def check(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, (dict, list)) and depth >= MAX_NESTING:
            raise TooDeep(f"the body nests maps and lists more than {MAX_NESTING} deep; send a flatter body")
        if isinstance(value, dict):
            self.keys_left -= len(value)
            if self.keys_left < 0:
                raise TooManyKeys(self.max_keys)
            value = self._typed_value(value)
            if not isinstance(value, dict):  # a numpy scalar, now its plain value
                return self.check(value, depth)
            checked = {}
            for key, item in value.items():
                name = key if type(key) is str else str(key)
                try:  # costs nothing unless raised: the path is built only for a refused value
                    checked[name] = self.check(item, depth + 1)
                except (TooManyKeys, TooDeep):  # the body as a whole is at fault, not this key
                    raise
                except DecodeError as e:
                    _inside(e, "." + name)
                    raise
            return checked
        if isinstance(value, list):
            checked_items = []
            for index, item in enumerate(value):
                try:
                    checked_items.append(self.check(item, depth + 1))
                except (TooManyKeys, TooDeep):
                    raise
                except DecodeError as e:
                    _inside(e, f"[{index}]")
                    raise
            return checked_items
        if isinstance(value, float) and not math.isfinite(value):
            raise DecodeError(f"non-finite number {value!r}; send finite numbers")
        if value is None or isinstance(value, (str, int, float, bool, bytes)):
            return value
        raise DecodeError(f"msgpack value of type {type(value).__name__} is not accepted; send maps, lists, "
                          "numbers, str and bytes")

    def _typed_value(self, value: dict) -> Any:
        """A map marked ``__ndarray__`` or ``__npgeneric__`` (str or bytes keys) → the array map without its
        marker, or the scalar's value; any other map unchanged."""
        if not any(k in _OPENPI_KEYS or k in (ARRAY_MARKER, SCALAR_MARKER) for k in value):
            return value
        fields: dict[Any, Any] = {}
        for key, item in value.items():
            name = _OPENPI_KEYS.get(key, key) if type(key) is bytes else key
            if name in fields:
                raise DecodeError(f"a typed value has the key {name!r} twice (as str and as bytes); send one")
            fields[name] = item
        if ARRAY_MARKER in fields and SCALAR_MARKER in fields:
            raise DecodeError(f"a map marked both {ARRAY_MARKER} and {SCALAR_MARKER}; send one")
        if ARRAY_MARKER not in fields and SCALAR_MARKER not in fields:
            return value  # bytes keys such as b"data" without a marker: not a typed value
        self.bytes_keys = self.bytes_keys or any(type(k) is bytes for k in value)
        dtype = array_dtype(fields.get("dtype"))  # refuse object/void/complex before anything else
        if ARRAY_MARKER in fields:
            del fields[ARRAY_MARKER]
            return fields
        scalar = fields.get("data")
        if type(scalar) not in (bool, int, float) or set(fields) - {SCALAR_MARKER, "data", "dtype"}:
            raise DecodeError(f"a {SCALAR_MARKER} scalar is {{dtype, data}} with a number as data; got "
                              f"{type(scalar).__name__} data")
        if (dtype.kind == "b") != (type(scalar) is bool):
            raise DecodeError(f"a {SCALAR_MARKER} scalar of dtype {dtype.str!r} cannot hold {scalar!r}")
        return scalar


def _inside(error: DecodeError, step: str) -> None:
    """``error`` was raised for a value inside the map key or list index ``step`` (``".images"``, ``"[1]"``):
    its field gets ``step`` in front."""
    error.field = step + (error.field or "")


def _name_field(error: DecodeError) -> None:
    """``error``'s field in the form request errors name fields (``images[0][0]``, not ``.images[0][0]``), and at
    the head of its message, as a JSON body's error has it."""
    if error.field is not None:
        error.field = error.field.removeprefix(".") or None  # (a key "" at the top names nothing useful)
        if error.field:
            error.args = (f"{error.field}: {error}",)


def unpack_message(body: bytes, max_keys: int = MAX_BODY_KEYS) -> Unpacked:
    """A msgpack body or websocket frame → checked Python values (maps, lists, str, bytes, finite numbers),
    and whether its typed values used openpi's bytes keys.

    ``__ndarray__`` markers are dropped once their dtype is checked (the array dict itself
    is the convention); numpy scalars become plain numbers; extension types, non-finite floats
    and object/complex dtypes are refused with ``DecodeError``. Bytes are returned as the
    unpacker made them: no copy.
    """
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
    except DecodeError:
        raise
    except Exception as e:
        raise NotMsgpack(f"the body is not valid msgpack ({type(e).__name__})") from e
    checker = _Checker(max_keys)
    try:
        return Unpacked(checker.check(value), checker.bytes_keys)
    except (TooManyKeys, TooDeep):
        raise
    except DecodeError as e:
        _name_field(e)
        raise


def unpack_msgpack(body: bytes) -> Any:
    """``unpack_message``'s values alone."""
    return unpack_message(body).value


async def decode_off_loop(decode: Callable[[bytes, int], Any], body: bytes, max_keys: int = MAX_BODY_KEYS) -> Any:
    """``decode(body, max_keys)`` (``unpack_message``, ``loads_json``) on the event loop for bodies up to
    ``UNPACK_ON_LOOP_BYTES``, else in the thread pool."""
    if len(body) <= UNPACK_ON_LOOP_BYTES:
        return decode(body, max_keys)
    return await run_in_threadpool(decode, body, max_keys)


async def unpack_message_off_loop(body: bytes, max_keys: int = MAX_BODY_KEYS) -> Unpacked:
    return await decode_off_loop(unpack_message, body, max_keys)


def _refuse_ext(code: int, data: bytes):
    raise DecodeError(f"msgpack extension type {code} is not accepted; send plain maps, lists, numbers, str and bytes")


# ----------------------------------------------------------------------------- responses


def _array_default(binary: bool, bytes_keys: bool = False):
    """The serializers' hook for what they do not know: numpy arrays in the wire convention, numpy scalars
    as numbers. Called only for such values, so a reply is never walked in Python beforehand."""

    def default(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return encode_array(value, binary=binary, bytes_keys=bytes_keys)
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"a reply value of type {type(value).__name__} cannot be serialized")

    return default


_JSON_DEFAULT = _array_default(False)
_MSGPACK_DEFAULTS = {False: _array_default(True), True: _array_default(True, bytes_keys=True)}


def pack_msgpack(payload: Any, *, bytes_keys: bool = False) -> bytes:
    """A reply as msgpack; numpy arrays as typed arrays, with openpi's bytes keys when ``bytes_keys``."""
    return msgpack.packb(payload, use_bin_type=True, default=_MSGPACK_DEFAULTS[bytes_keys])


def encode_response(payload: Any, accept: str, status_code: int = 200,
                    headers: Optional[dict[str, str]] = None, *, bytes_keys: bool = False) -> Response:
    """msgpack when the client accepts it, else JSON. numpy arrays use the wire convention; in msgpack with
    openpi's bytes keys when ``bytes_keys`` (the request used them). ``Vary: Accept``: the format follows the
    request's Accept, so a cache must not answer one client with what it kept for another."""
    headers = {"Vary": "Accept", **(headers or {})}
    if wants_msgpack(accept):
        body = pack_msgpack(payload, bytes_keys=bytes_keys)
        return Response(body, status_code=status_code, media_type=MSGPACK, headers=headers)
    body = json.dumps(payload, allow_nan=False, separators=(",", ":"), default=_JSON_DEFAULT).encode()
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)
