"""Wire formats: JSON by default, msgpack on request (DESIGN §6).

Arrays travel as ``{"dtype", "shape", "data"}``: in JSON ``data`` is base64, in msgpack it
is raw bytes under the ``__ndarray__`` key convention robot clients already use. Incoming
msgpack is unpacked into the same Python values JSON gives, except that bytes stay bytes
(array data, encoded images): one schema serves both, and a camera frame is never
base64-encoded only to be decoded again.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Optional

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


class DecodeError(ValueError):
    pass


def wants_msgpack(accept: str) -> bool:
    return any(t in (accept or "") for t in MSGPACK_TYPES)


def is_msgpack(content_type: str) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in MSGPACK_TYPES


# ----------------------------------------------------------------------------- arrays


def array_dtype(name: Any) -> np.dtype:
    """A wire dtype name → numpy dtype; only bool, integer and float dtypes are accepted."""
    try:
        dtype = np.dtype(str(name))
    except (TypeError, ValueError) as e:
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
        raise DecodeError(f"array data has {len(data)} bytes; dtype {dtype.str} and shape {list(shape)} need {expected}")
    try:
        return np.frombuffer(bytes(data), dtype=dtype).reshape(shape)
    except ValueError as e:  # a zero-size shape with a dimension numpy cannot index, e.g. [0, 2**63]
        raise DecodeError(f"array shape {list(shape)} is not a valid shape ({e})") from e


def encode_array(array: np.ndarray, *, binary: bool) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    data = array.tobytes()
    if binary:
        return {"__ndarray__": True, "data": data, "dtype": array.dtype.str, "shape": list(array.shape)}
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(data).decode()}


def is_array_dict(value: Any) -> bool:
    return isinstance(value, dict) and {"dtype", "shape", "data"} <= set(value)


# ----------------------------------------------------------------------------- msgpack → values


def _checked(value: Any, depth: int = 0) -> Any:
    """A value unpacked from msgpack, checked as JSON would be (finite numbers, string keys); bytes are kept."""
    if isinstance(value, (dict, list)) and depth >= MAX_NESTING:
        raise DecodeError(f"the body nests maps and lists more than {MAX_NESTING} deep; send a flatter body")
    if isinstance(value, dict):
        if "__ndarray__" in value:
            value = {k: v for k, v in value.items() if k != "__ndarray__"}
            array_dtype(value.get("dtype"))  # refuse object/void/complex before anything else
        return {k if type(k) is str else str(k): _checked(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_checked(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError(f"non-finite number {value!r} in the body; send finite numbers")
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    raise DecodeError(f"msgpack value of type {type(value).__name__} is not accepted; send maps, lists, numbers, "
                      "str and bytes")


def unpack_msgpack(body: bytes) -> Any:
    """A msgpack body or websocket frame → checked Python values (maps, lists, str, bytes, finite numbers).

    ``__ndarray__`` markers are dropped once their dtype is checked (the array dict itself
    is the convention); extension types, non-finite floats and object/complex dtypes are
    refused with ``DecodeError``. Bytes are returned as the unpacker made them: no copy.
    """
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"the body is not valid msgpack ({type(e).__name__})") from e
    return _checked(value)


async def unpack_msgpack_off_loop(body: bytes) -> Any:
    """``unpack_msgpack`` on the event loop for bodies up to ``UNPACK_ON_LOOP_BYTES``, else in the thread pool."""
    if len(body) <= UNPACK_ON_LOOP_BYTES:
        return unpack_msgpack(body)
    return await run_in_threadpool(unpack_msgpack, body)


def _refuse_ext(code: int, data: bytes):
    raise DecodeError(f"msgpack extension type {code} is not accepted; send plain maps, lists, numbers, str and bytes")


# ----------------------------------------------------------------------------- responses


def _array_default(binary: bool):
    """The serializers' hook for what they do not know: numpy arrays in the wire convention, numpy scalars
    as numbers. Called only for such values, so a reply is never walked in Python beforehand."""

    def default(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return encode_array(value, binary=binary)
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"a reply value of type {type(value).__name__} cannot be serialized")

    return default


_MSGPACK_DEFAULT, _JSON_DEFAULT = _array_default(True), _array_default(False)


def encode_response(payload: Any, accept: str, status_code: int = 200,
                    headers: Optional[dict[str, str]] = None) -> Response:
    """msgpack when the client accepts it, else JSON. numpy arrays use the wire convention."""
    if wants_msgpack(accept):
        body = msgpack.packb(payload, use_bin_type=True, default=_MSGPACK_DEFAULT)
        return Response(body, status_code=status_code, media_type=MSGPACK, headers=headers)
    body = json.dumps(payload, allow_nan=False, separators=(",", ":"), default=_JSON_DEFAULT).encode()
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)
