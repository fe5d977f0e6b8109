"""openpi's msgpack array convention, as ``openpi_client.msgpack_numpy`` (openpi-client 0.1.2) implements it.

The main test environment cannot hold ``openpi-client`` (it pins numpy below 2), so the unit tests use this
stand-in; ``tests/service/test_openpi_client.py`` checks the real package against a live server.
Arrays are maps with **bytes** keys; numpy scalars are ``__npgeneric__`` maps; unpacking recognizes
arrays by the bytes key ``b"__ndarray__"`` only.
"""

from __future__ import annotations

import numpy as np


def openpi_pack_array(obj):
    """``msgpack_numpy.pack_array``: the ``default`` hook of openpi's packer."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise ValueError(f"Unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def openpi_unpack_array(obj):
    """``msgpack_numpy.unpack_array``: the ``object_hook`` of openpi's unpacker."""
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj
