"""numpy arrays on the wire, in the two conventions the server reads and writes.

- msgpack: ``{"__ndarray__": True, "data": <raw bytes>, "dtype": "<f4", "shape": [2, 3]}``
  (the openpi convention robot clients already use); replies may spell these keys as msgpack
  bytes, as openpi's ``msgpack_numpy`` does (``b"__ndarray__"``, ...; numpy scalars as
  ``b"__npgeneric__"``), and ``unpack`` reads both;
- JSON: ``{"dtype": "<f4", "shape": [2, 3], "data": "<base64>"}``.

``pack`` and ``unpack`` walk dicts and lists, so a whole request or reply converts in one call.
Only bool, integer and float arrays travel, both ways: the server refuses the others too
(an object array would pickle arbitrary Python objects).
"""

from __future__ import annotations

import base64
import math
from typing import Any

import msgpack
import numpy as np

REFUSED_DTYPE_KINDS = {"O": "object", "V": "void", "c": "complex"}


def checked_dtype(name: Any) -> np.dtype:
    """``name`` as a numpy dtype; only bool, integer and float dtypes travel (as the server accepts)."""
    try:
        dtype = np.dtype(name if isinstance(name, np.dtype) else str(name))
    except (TypeError, ValueError) as e:
        raise ValueError(f"unknown array dtype {name!r}") from e
    if dtype.kind not in "biuf" or dtype.itemsize == 0:
        kind = REFUSED_DTYPE_KINDS.get(dtype.kind, dtype.name)
        raise ValueError(f"{kind} arrays cannot travel (dtype {dtype.str!r}); send numeric arrays (bool, int, "
                         "uint or float)")
    return dtype


def pack_array(array: np.ndarray, *, binary: bool) -> dict[str, Any]:
    """One array in the msgpack (``binary``) or JSON convention.

    The msgpack form's ``data`` is a view of ``array`` (no copy): pack the message before the array
    changes (the clients pack and send at once)."""
    checked_dtype(array.dtype)
    shape = list(np.shape(array))  # (before ascontiguousarray, which makes a 0-d array 1-d)
    array = np.ascontiguousarray(array)
    # A byte view, not a copy: msgpack copies it once into the message. (tobytes() first costs a fresh
    # allocation per frame: about 0.2 ms for a 224x224 camera, measured.) The view reads the array when packed.
    data = memoryview(array.reshape(-1)).cast("B")
    if binary:
        return {"__ndarray__": True, "data": data, "dtype": array.dtype.str, "shape": shape}
    return {"dtype": array.dtype.str, "shape": shape, "data": base64.b64encode(data).decode()}


_BYTES_KEYS = {b"__ndarray__": "__ndarray__", b"__npgeneric__": "__npgeneric__", b"data": "data",
               b"dtype": "dtype", b"shape": "shape"}


def _str_keys(value: dict) -> dict:
    """openpi's bytes keys (``b"__ndarray__"``, ``b"data"``, ...) spelled as str; other keys as they are."""
    return {_BYTES_KEYS.get(k, k) if type(k) is bytes else k: v for k, v in value.items()}


def is_packed_array(value: Any) -> bool:
    """A dict in either array convention, with str or bytes keys (the JSON one is recognized by exactly its
    three keys)."""
    if not isinstance(value, dict):
        return False
    keys = set(_str_keys(value))
    return keys == {"__ndarray__", "dtype", "shape", "data"} or keys == {"dtype", "shape", "data"}


def is_packed_scalar(value: Any) -> bool:
    """openpi's numpy scalar: ``{"__npgeneric__": True, "data": <number>, "dtype": ...}`` (str or bytes keys)."""
    return isinstance(value, dict) and set(_str_keys(value)) == {"__npgeneric__", "data", "dtype"}


def unpack_array(obj: dict[Any, Any]) -> np.ndarray:
    """An array in either convention → a writable numpy array (checked: dtype, shape, byte count)."""
    obj = _str_keys(obj)
    dtype = checked_dtype(obj.get("dtype"))
    shape = obj.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array shape must be a list of non-negative ints; got {shape!r}")
    data = obj.get("data")
    if isinstance(data, str):
        data = base64.b64decode(data, validate=True)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"array data must be bytes or base64; got {type(data).__name__}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"array data has {len(data)} bytes; dtype {dtype.str} and shape {list(shape)} need {expected}")
    # A copy: np.frombuffer over bytes is read-only, and callers expect to modify what they get.
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def pack(value: Any, *, binary: bool) -> Any:
    """``value`` with every numpy array packed (and numpy scalars made plain Python numbers).

    For JSON (``binary=False``) bytes become base64 strings, which is how the server reads encoded
    PNG/JPEG images; msgpack carries bytes as they are.
    """
    if isinstance(value, np.ndarray):
        return pack_array(value, binary=binary)
    if isinstance(value, np.generic):
        checked_dtype(value.dtype)
        return value.item()
    if isinstance(value, dict):
        return {key: pack(item, binary=binary) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [pack(item, binary=binary) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)) and not binary:
        return base64.b64encode(bytes(value)).decode()
    return value


def unpack_scalar(obj: dict[Any, Any]) -> np.generic:
    """openpi's numpy scalar → that numpy scalar (checked dtype)."""
    obj = _str_keys(obj)
    return checked_dtype(obj["dtype"]).type(obj["data"])


def unpack(value: Any) -> Any:
    """``value`` with every packed array (either convention, str or bytes keys) turned into numpy, and every
    packed numpy scalar into that scalar."""
    if is_packed_array(value):
        return unpack_array(value)
    if is_packed_scalar(value):
        return unpack_scalar(value)
    if isinstance(value, dict):
        return {key: unpack(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unpack(item) for item in value]
    return value


class MessagePacker:
    """msgpack messages packed into one buffer that is reused from message to message.

    A fresh buffer per message means a fresh allocation the size of the frames every
    control step, and the page faults that come with it: about 0.4 ms for three 224x224
    cameras on the 2-core dev host (measured inside ``bench/robot_latency.py``). The
    returned view is valid until the next ``pack`` (send it before packing again).
    """

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        self._view: memoryview | None = None

    def pack(self, message: Any) -> memoryview:
        if self._view is not None:
            self._view.release()  # the buffer cannot be reset while a view of it is exported
        self._packer.reset()
        self._packer.pack(message)
        self._view = self._packer.getbuffer()
        return self._view
