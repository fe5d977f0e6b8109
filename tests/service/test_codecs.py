"""msgpack typed values in both key spellings: ours (str keys) and openpi's ``msgpack_numpy`` (bytes keys).

``tests.openpi.msgpack_numpy`` behaves as ``openpi_client.msgpack_numpy`` does, so these tests run without
the side environment; ``test_openpi_client.py`` drives a live server with the real package.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from service.codecs import DecodeError, encode_response, pack_msgpack, unpack_message
from tests.openpi.msgpack_numpy import openpi_pack_array, openpi_unpack_array
from vla_foundry_client import unpack


def ours(array: np.ndarray) -> dict:
    return {"__ndarray__": True, "data": array.tobytes(), "dtype": array.dtype.str, "shape": list(array.shape)}


FRAME = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
STATE = np.array([0.25, -1.5], np.float32)


def test_bytes_and_str_keyed_arrays_unpack_to_the_same_values():
    body = {"observation": {"images": {"front": [FRAME, FRAME]}, "lowdim": {"arm__pos": STATE}}, "seed": 3}
    as_openpi = unpack_message(msgpack.packb(body, default=openpi_pack_array, use_bin_type=True))
    as_ours = unpack_message(msgpack.packb({"observation": {"images": {"front": [ours(FRAME), ours(FRAME)]},
                                                            "lowdim": {"arm__pos": ours(STATE)}}, "seed": 3},
                                           use_bin_type=True))
    assert as_openpi.value == as_ours.value
    assert as_openpi.value["observation"]["lowdim"]["arm__pos"] == {"data": STATE.tobytes(), "dtype": "<f4",
                                                                     "shape": [2]}
    assert as_openpi.bytes_keys and not as_ours.bytes_keys


@pytest.mark.parametrize("scalar", [np.float32(0.5), np.int64(-7), np.bool_(True), np.uint8(200)])
def test_numpy_scalars_in_either_spelling_become_plain_numbers(scalar):
    packed = unpack_message(msgpack.packb({"seed": scalar}, default=openpi_pack_array, use_bin_type=True))
    assert packed.value == {"seed": scalar.item()} and type(packed.value["seed"]) is type(scalar.item())
    str_keyed = {"__npgeneric__": True, "data": scalar.item(), "dtype": scalar.dtype.str}
    assert unpack_message(msgpack.packb({"seed": str_keyed})).value == packed.value


def spelled(value: dict, bytes_keys: bool) -> dict:
    return {k.encode(): v for k, v in value.items()} if bytes_keys else value


BAD_VALUES = {
    "object dtype": ({"__ndarray__": True, "data": b"", "dtype": "|O", "shape": [0]}, "object arrays are refused"),
    "void dtype": ({"__ndarray__": True, "data": b"\0", "dtype": "|V1", "shape": [1]}, "void arrays are refused"),
    "complex dtype": ({"__ndarray__": True, "data": b"\0" * 8, "dtype": "<c8", "shape": [1]},
                      "complex arrays are refused"),
    "numpy parses it as Python": ({"__ndarray__": True, "data": b"", "dtype": ",", "shape": [0]},
                                  "unknown array dtype ','"),
    "dtype not a string": ({"__ndarray__": True, "data": b"", "dtype": {"a": 1}, "shape": [0]},
                           "array dtype must be a string"),
    "complex scalar": ({"__npgeneric__": True, "data": 1.0, "dtype": "<c8"}, "complex arrays are refused"),
    "scalar without a number": ({"__npgeneric__": True, "data": "x", "dtype": "<f4"}, "with a number as data"),
    "non-finite scalar": ({"__npgeneric__": True, "data": float("nan"), "dtype": "<f4"}, "non-finite number"),
    "both markers": ({"__ndarray__": True, "__npgeneric__": True, "data": b"", "dtype": "<f4", "shape": [0]},
                     "marked both"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_typed_values_are_refused_alike_in_both_spellings(case):
    value, message = BAD_VALUES[case]
    errors = []
    for bytes_keys in (False, True):
        with pytest.raises(DecodeError) as refused:
            unpack_message(msgpack.packb({"x": spelled(value, bytes_keys)}, use_bin_type=True))
        errors.append(str(refused.value))
    assert errors[0] == errors[1] and message in errors[0]


def test_a_key_given_in_both_spellings_is_refused():
    value = {b"__ndarray__": True, b"data": b"\0", "data": b"\0", b"dtype": "|u1", b"shape": [1]}
    with pytest.raises(DecodeError, match="twice"):
        unpack_message(msgpack.packb(value, use_bin_type=True))


def test_bytes_keys_without_a_marker_are_not_an_array():
    value = unpack_message(msgpack.packb({b"data": b"\0", b"dtype": "|u1", b"shape": [1]}, use_bin_type=True))
    assert value.value == {"b'data'": b"\0", "b'dtype'": "|u1", "b'shape'": [1]} and not value.bytes_keys


def test_replies_in_openpi_spelling_unpack_to_numpy_with_openpi_and_with_our_client():
    reply = {"actions": np.arange(6, dtype=np.float32).reshape(3, 2), "step": np.int64(4)}
    packed = pack_msgpack(reply, bytes_keys=True)
    theirs = msgpack.unpackb(packed, object_hook=openpi_unpack_array)
    assert isinstance(theirs["actions"], np.ndarray) and theirs["actions"].dtype == np.float32
    np.testing.assert_array_equal(theirs["actions"], reply["actions"])
    assert theirs["step"] == 4
    np.testing.assert_array_equal(unpack(msgpack.unpackb(packed))["actions"], reply["actions"])
    # str keys (the default) are not arrays to openpi's unpacker, but are to our client
    default = pack_msgpack(reply)
    assert isinstance(msgpack.unpackb(default, object_hook=openpi_unpack_array)["actions"], dict)
    np.testing.assert_array_equal(unpack(msgpack.unpackb(default))["actions"], reply["actions"])


def test_our_client_reads_openpi_scalars():
    packed = msgpack.packb({"x": np.float32(0.5)}, default=openpi_pack_array, use_bin_type=True)
    value = unpack(msgpack.unpackb(packed))["x"]
    assert value == np.float32(0.5) and isinstance(value, np.float32)


def test_encode_response_spelling_follows_the_flag_and_json_is_unchanged():
    payload = {"v": np.ones(2, np.float32)}
    as_bytes = msgpack.unpackb(encode_response(payload, "application/msgpack", bytes_keys=True).body)
    assert set(as_bytes["v"]) == {b"__ndarray__", b"data", b"dtype", b"shape"}
    as_str = msgpack.unpackb(encode_response(payload, "application/msgpack").body)
    assert set(as_str["v"]) == {"__ndarray__", "data", "dtype", "shape"}
    as_json = encode_response(payload, "application/json", bytes_keys=True).body
    assert b'"dtype":"<f4"' in as_json and b"__ndarray__" not in as_json
