"""msgpack typed values in both key spellings: ours (str keys) and openpi's ``msgpack_numpy`` (bytes keys).

``tests.openpi.msgpack_numpy`` behaves as ``openpi_client.msgpack_numpy`` does, so these tests run without
the side environment; ``test_openpi_client.py`` drives a live server with the real package.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from service.codecs import (DecodeError, encode_response, pack_msgpack, preferred_media_type, unpack_message,
                            wants_msgpack)
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


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_our_client_sends_a_0d_array_with_its_shape_as_openpi_does(binary):
    """A 0-d array (a gripper width read as ``np.asarray(x)``) went out as shape [1]."""
    import json

    from vla_foundry_client import pack

    value = np.asarray(3.5, np.float32)
    wire = msgpack.packb(pack({"x": value}, binary=True)) if binary else json.dumps(pack({"x": value}, binary=False))
    back = unpack(msgpack.unpackb(wire) if binary else json.loads(wire))["x"]
    assert back.shape == () and back == value


def test_encode_response_spelling_follows_the_flag_and_json_is_unchanged():
    payload = {"v": np.ones(2, np.float32)}
    as_bytes = msgpack.unpackb(encode_response(payload, "application/msgpack", bytes_keys=True).body)
    assert set(as_bytes["v"]) == {b"__ndarray__", b"data", b"dtype", b"shape"}
    as_str = msgpack.unpackb(encode_response(payload, "application/msgpack").body)
    assert set(as_str["v"]) == {"__ndarray__", "data", "dtype", "shape"}
    as_json = encode_response(payload, "application/json", bytes_keys=True).body
    assert b'"dtype":"<f4"' in as_json and b"__ndarray__" not in as_json


# ----------------------------------------------------------------------------- where a refused value is

BAD_DTYPE = {"__ndarray__": True, "data": b"", "dtype": ",", "shape": [0]}
NAN_SCALAR = {"__npgeneric__": True, "data": float("nan"), "dtype": "<f8"}
WHERE_REFUSED = {  # body → the field its refusal names, as a JSON body's refusal names fields
    "array in a list of lists": ({"images": [[ours(FRAME)], [BAD_DTYPE]], "prompt": "a"}, "images[1][0]"),
    "array under map keys": ({"observation": {"images": {"front": [ours(FRAME), BAD_DTYPE]}}},
                             "observation.images.front[1]"),
    "number at the top": ({"prompt": "a", "temperature": float("nan")}, "temperature"),
    "number in nested lists": ({"observation": {"lowdim": {"arm__pos": [[0.1, 0.2], [float("inf"), 0.4]]}}},
                               "observation.lowdim.arm__pos[1][0]"),
    "numpy scalar": ({"seed": NAN_SCALAR}, "seed"),
    "openpi flat key": ({"observation/front": BAD_DTYPE, "prompt": "a"}, "observation/front"),
    "int key": ({"logit_bias": {50256: float("-inf")}}, "logit_bias.50256"),
}


@pytest.mark.parametrize("case", list(WHERE_REFUSED))
@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str keys", "openpi bytes keys"])
def test_a_refused_value_names_its_path_in_the_body(case, bytes_keys):
    body, field = WHERE_REFUSED[case]

    def spell(value):  # typed values in openpi's bytes-key spelling, the body's own keys as sent
        if isinstance(value, dict):
            typed = "__ndarray__" in value or "__npgeneric__" in value
            return {(k.encode() if typed and bytes_keys else k): spell(v) for k, v in value.items()}
        return [spell(v) for v in value] if isinstance(value, list) else value

    with pytest.raises(DecodeError) as refused:
        unpack_message(msgpack.packb(spell(body), use_bin_type=True))
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field}: ")  # as a JSON body's message reads: the field first


def test_refusals_of_the_body_as_a_whole_name_no_field():
    for body in (b"\xc1", msgpack.packb({"k": msgpack.ExtType(5, b"zz")}),
                 msgpack.packb({"a": {f"k{i}": 0 for i in range(20)}}), msgpack.packb(float("nan"))):
        with pytest.raises(DecodeError) as refused:
            unpack_message(body, max_keys=10)
        assert refused.value.field is None and not str(refused.value).startswith(":"), body[:20]


# ----------------------------------------------------------------------------- Accept

REPLIES = ("application/json", "application/msgpack", "image/png")  # the server's order of preference


@pytest.mark.parametrize("accept, chosen", [
    ("", "application/json"),  # no header: anything, and JSON is the server's first
    ("*/*", "application/json"),
    ("application/msgpack", "application/msgpack"),
    ("application/msgpack;q=0", None),  # q=0: not acceptable, and nothing else is asked for
    ("application/msgpack;q=0, application/json", "application/json"),
    ("application/MsgPack ; q=0 , */*", "application/json"),  # case and spaces do not matter
    ("application/msgpack;q=0.5, application/json", "application/json"),
    ("application/json;q=0.5, application/msgpack", "application/msgpack"),
    ("image/png;q=0, application/json", "application/json"),
    ("image/png;q=0, */*", "application/json"),  # the specific range decides for PNG, the wildcard for the rest
    ("image/png", "image/png"),
    ("image/*", "image/png"),
    ("image/png, */*", "image/png"),  # named beats let in by a wildcard, at equal q
    ("image/png;q=0.9, */*;q=0.1", "image/png"),
    ("image/png, application/json", "application/json"),  # named alike, equal q: the server's order
    ("*/*;q=0.1, application/json;q=0", "application/msgpack"),
    ("text/html", None),
    ("application/msgpack;q=2, application/json;q=0.1", "application/json"),  # q over 1: left out
    ("application/msgpack;q=nan, application/json;q=0.1", "application/json"),
    ("application/msgpack;q=x, application/json;q=0.1", "application/json"),
    ("*; q=.2", "application/json"),  # Java's old spelling of */*
    ("application/json;charset=utf-8;q=0.5, application/msgpack;q=0.4", "application/json"),
])
def test_preferred_media_type_reads_q_values(accept, chosen):
    assert preferred_media_type(accept, REPLIES) == chosen


@pytest.mark.parametrize("accept, msgpack_reply", [
    ("application/msgpack", True), ("application/x-msgpack", True), ("application/vnd.msgpack", True),
    ("application/msgpack;q=0", False), ("application/msgpack;q=0, application/json", False),
    ("application/json, application/msgpack;q=0.9", False), ("application/json;q=0.9, application/msgpack", True),
    ("application/*", False), ("*/*", False), ("", False), ("image/png", False),
])
def test_msgpack_replies_only_when_preferred(accept, msgpack_reply):
    assert wants_msgpack(accept) is msgpack_reply
    reply = encode_response({"ok": True}, accept)
    assert reply.media_type == ("application/msgpack" if msgpack_reply else "application/json")
