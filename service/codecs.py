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
from starlette.responses import Response

MSGPACK = "application/msgpack"
MSGPACK_TYPES = (MSGPACK, "application/x-msgpack", "application/vnd.msgpack")
REFUSED_DTYPE_KINDS = {"O": "object", "V": "void", "c": "complex"}


class DecodeError(ValueError):
    pass


def wants_msgpack(accept: str) -> bool:
    return any(t in (accept or "") for t in MSGPACK_TYPES)


def is_msgpack(content_type: str) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in MSGPACK_TYPES


# ----------------------------------------------------------------------------- arrays


def array_dtype(name: Any) -> np.dtype:
    try:
        dtype = np.dtype(str(name))
    except TypeError as e:
        raise DecodeError(f"unknown array dtype {name!r}") from e
    if dtype.kind in REFUSED_DTYPE_KINDS:
        raise DecodeError(f"{REFUSED_DTYPE_KINDS[dtype.kind]} arrays are refused (dtype {name!r}); send numeric arrays")
    return dtype


def decode_array(obj: dict) -> np.ndarray:
    """An array in the wire convention → numpy (validated: dtype, shape, byte count)."""
    dtype = array_dtype(obj.get("dtype"))
    shape = obj.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(f"array shape must be a list of non-negative ints; got {shape!r}")
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
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape)


def encode_array(array: np.ndarray, *, binary: bool) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    data = array.tobytes()
    if binary:
        return {"__ndarray__": True, "data": data, "dtype": array.dtype.str, "shape": list(array.shape)}
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(data).decode()}


def is_array_dict(value: Any) -> bool:
    return isinstance(value, dict) and {"dtype", "shape", "data"} <= set(value)


# ----------------------------------------------------------------------------- msgpack → values


def _checked(value: Any) -> Any:
    """A value unpacked from msgpack, checked as JSON would be (finite numbers, string keys); bytes are kept."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            value = {k: v for k, v in value.items() if k != "__ndarray__"}
            array_dtype(value.get("dtype"))  # refuse object/void/complex before anything else
        return {k if type(k) is str else str(k): _checked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_checked(v) for v in value]
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
