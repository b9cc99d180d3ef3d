"""The switchover ops of the application protocol (checkpointd/protocol.py), root-free.

``encode_frozen_many`` / ``decode_frozen_many``: round trips (none, one, many entries;
empty and large states; property-based with hypothesis) and every malformed payload
refused with ProtocolError: truncation anywhere, a count that disagrees, a state running
past the end, trailing bytes, an index that is not JSON (or not a list of rows), a row
with a bool, a negative, a too-large or a non-integer number, a missing field, a
non-string or empty conn. Then the ops freeze / frozen / frozen_many / passed / thaw and
resume (with ``unacked_len``) through ``protocol.encode`` / ``protocol.decode``, and
their refusals (missing or extra fields, wrong types, a descriptor where none belongs).

Defects these tests found were fixed; each test now guards against its return.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointd import protocol
from checkpointd.protocol import (FROZEN_FIELDS, MAX_MESSAGE, ProtocolError, decode,
                                  decode_frozen_many, encode, encode_frozen_many)

U64 = (1 << 64) - 1


def fields(conn: str = "10.0.0.100:80-10.0.0.1:5555", *, input: int = 10, output: int = 20,
           read: int = 10, write: int = 20, regenerable: int = 0) -> dict:
    return dict(conn=conn, input=input, output=output, read=read, write=write,
                regenerable=regenerable)


def raw_payload(index, *states: bytes, hlen: int | None = None) -> bytes:
    """A frozen_many payload built by hand: any JSON index, any states."""
    head = index if isinstance(index, bytes) else json.dumps(index).encode()
    return struct.pack(">I", len(head) if hlen is None else hlen) + head + b"".join(states)


def row(conn="k", input=1, output=2, read=1, write=2, regenerable=0, state_len=0) -> list:
    return [conn, input, output, read, write, regenerable, state_len]


def refused(payload: bytes, count: int) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_frozen_many(payload, count)
    assert str(info.value).startswith("frozen_many: ") or "frozen" in str(info.value)
    return str(info.value)


TWO = [(fields("a", input=1, read=1), b"state-a"),
       (fields("[fd00::100]:80-[fd00::1]:5555", regenerable=1, output=5, write=9), b"bb")]


# -- encode_frozen_many / decode_frozen_many: round trips ---------------------------------------

def test_round_trip_no_entries():
    payload = encode_frozen_many([])
    assert payload == struct.pack(">I", 2) + b"[]"
    assert decode_frozen_many(payload, 0) == []


def test_round_trip_one_entry_empty_state():
    entries = [(fields(), b"")]
    got = decode_frozen_many(encode_frozen_many(entries), 1)
    assert got == entries
    assert type(got[0][1]) is bytes and list(got[0][0]) == list(FROZEN_FIELDS)


def test_round_trip_many_entries_in_order():
    entries = [(fields(f"10.0.0.100:80-10.0.0.{n % 250 + 1}:{1024 + n}", input=n, output=2 * n,
                       read=n, write=2 * n, regenerable=n % 2), os.urandom(n % 37))
               for n in range(1000)]
    got = decode_frozen_many(encode_frozen_many(entries), len(entries))
    assert got == entries                                   # every field, every state, in order


def test_round_trip_large_states_and_extreme_offsets():
    big = os.urandom(6 << 20)
    entries = [(fields("big", input=U64, output=U64, read=U64, write=U64, regenerable=U64), big),
               (fields("empty", input=0, output=0, read=0, write=0), b""),
               (fields("zeros"), b"\0" * 100_000)]
    payload = encode_frozen_many(entries)
    assert decode_frozen_many(payload, 3) == entries
    # and as a whole message, under MAX_MESSAGE
    msg = decode(encode("frozen_many", payload, count=3))
    assert decode_frozen_many(msg.payload, msg["count"]) == entries


def test_round_trip_unicode_conn():
    entries = [(fields("conn-\u00e9\u4e2d-\U0001f600"), b"s")]
    assert decode_frozen_many(encode_frozen_many(entries), 1) == entries


_conn = st.text(min_size=1, max_size=40)
_u64 = st.integers(min_value=0, max_value=U64)
_entry = st.tuples(st.fixed_dictionaries({"conn": _conn, "input": _u64, "output": _u64,
                                          "read": _u64, "write": _u64, "regenerable": _u64}),
                   st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(st.lists(_entry, max_size=30))
def test_round_trip_property(entries):
    payload = encode_frozen_many(entries)
    assert decode_frozen_many(payload, len(entries)) == entries
    # through the whole message as well
    msg = decode(encode("frozen_many", payload, count=len(entries)))
    assert msg.op == "frozen_many" and msg.fd is None
    assert decode_frozen_many(msg.payload, msg["count"]) == entries


@settings(max_examples=200, deadline=None)
@given(st.lists(_entry, min_size=1, max_size=8), st.data())
def test_every_truncation_is_refused_property(entries, data):
    payload = encode_frozen_many(entries)
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    refused(payload[:cut], len(entries))


@settings(max_examples=200, deadline=None)
@given(st.lists(_entry, max_size=8), st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_refused_property(entries, extra):
    refused(encode_frozen_many(entries) + extra, len(entries))


# -- decode_frozen_many: malformed payloads ------------------------------------------------------

def test_every_truncation_of_a_two_entry_payload():
    payload = encode_frozen_many(TWO)
    for cut in range(len(payload)):
        refused(payload[:cut], 2)
    assert decode_frozen_many(payload, 2) == TWO


@pytest.mark.parametrize("count", [0, 1, 3, 1000])
def test_count_mismatch(count):
    assert "2 entries" in refused(encode_frozen_many(TWO), count)


def test_count_mismatch_empty():
    refused(encode_frozen_many([]), 1)
    refused(encode_frozen_many([(fields(), b"x")]), 0)


@pytest.mark.parametrize("state_len", [8, 100, 10**9, U64, 1 << 80])
def test_a_state_running_past_the_end(state_len):
    payload = raw_payload([row("a", state_len=state_len)], b"1234567")
    refused(payload, 1)


def test_a_later_state_running_past_the_end():
    payload = raw_payload([row("a", state_len=3), row("b", state_len=5)], b"aaa", b"bbbb")
    assert "runs past" in refused(payload, 2)
    # the lengths add up exactly: accepted
    assert [s for _, s in decode_frozen_many(
        raw_payload([row("a", state_len=3), row("b", state_len=5)], b"aaa", b"bbbbb"), 2)] \
        == [b"aaa", b"bbbbb"]


@pytest.mark.parametrize("extra", [b"x", b"\0", b"\0" * 4096])
def test_trailing_bytes(extra):
    assert "left over" in refused(encode_frozen_many(TWO) + extra, 2)
    refused(encode_frozen_many([]) + extra, 0)


@pytest.mark.parametrize("payload", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\0\0\0", id="short-length"),
    pytest.param(struct.pack(">I", 0), id="zero-length-index"),
    pytest.param(raw_payload(b"nope"), id="not-json"),
    pytest.param(raw_payload(b"[[\"a\",1,2,1,2,0,0]"), id="unterminated"),
    pytest.param(raw_payload(b"\xff\xfe"), id="not-utf8"),
    pytest.param(raw_payload(b"[]", hlen=3), id="index-longer-than-payload"),
    pytest.param(raw_payload(b"[]", hlen=U64 & 0xFFFFFFFF), id="index-length-huge"),
    pytest.param(raw_payload(b"[NaN]"), id="nan-row"),
    pytest.param(raw_payload(b"5"), id="index-a-number"),
    pytest.param(raw_payload(b"null"), id="index-null"),
    pytest.param(raw_payload(b"\"abcdefg\""), id="index-a-string"),
    pytest.param(raw_payload(b"{\"a\": 1}"), id="index-an-object"),
    pytest.param(raw_payload([5]), id="row-a-number"),
    pytest.param(raw_payload([None]), id="row-null"),
    pytest.param(raw_payload([{"conn": "a"}]), id="row-an-object"),
    pytest.param(raw_payload(["abcdefg"]), id="row-a-string"),
])
def test_bad_index(payload):
    refused(payload, 1)
    refused(payload, 0)


@pytest.mark.parametrize("position", range(1, 6))
@pytest.mark.parametrize("value", [True, False])
def test_a_row_with_a_bool_offset(position, value):
    r = row("a")
    r[position] = value
    refused(raw_payload([r]), 1)


@pytest.mark.parametrize("value, states", [(True, b"x"), (False, b"")])
def test_a_row_with_a_bool_state_length(value, states):
    refused(raw_payload([row("a", state_len=value)], states), 1)


@pytest.mark.parametrize("position", range(1, 7))
@pytest.mark.parametrize("value", [-1, -(1 << 63), 1 << 64, 1.0, 0.5, "1", None, [1], {"n": 1}])
def test_a_row_with_a_bad_number(position, value):
    r = row("a", state_len=0)
    r[position] = value
    refused(raw_payload([r]), 1)


@pytest.mark.parametrize("n", [0, 1, 5, 6])
def test_a_row_with_missing_fields(n):
    """A row shorter than the six fields plus the state length (6: no state length)."""
    refused(raw_payload([row("a")[:n]]), 1)
    refused(raw_payload([row("a", state_len=0), row("b")[:n]]), 2)


@pytest.mark.parametrize("conn", [5, 0, None, True, ["a"], {"a": 1}, 1.5, ""])
def test_a_row_with_a_non_string_or_empty_conn(conn):
    refused(raw_payload([row(conn)]), 1)


def test_a_row_with_extra_elements():
    refused(raw_payload([row("a", state_len=1) + ["junk"]], b"x"), 1)


@pytest.mark.parametrize("index", [b"{}", b"\"\""])
def test_an_index_that_is_not_a_list(index):
    refused(raw_payload(index), 0)


def test_a_deeply_nested_index():
    refused(raw_payload(b"[" * 100_000), 0)


# -- the ops through encode / decode -------------------------------------------------------------

def round_trip(op: str, payload: bytes = b"", fd: int | None = None, **fields):
    msg = decode(encode(op, payload, **fields), fd)
    assert msg.op == op and msg.fields == fields and msg.payload == payload and msg.fd == fd
    assert type(msg.payload) is bytes
    return msg


@pytest.mark.parametrize("op", ["freeze", "thaw"])
def test_freeze_and_thaw(op):
    msg = round_trip(op)
    assert msg.fields == {}
    raw = encode(op)
    assert json.loads(raw[4:]) == {"op": op}


@pytest.mark.parametrize("op", ["freeze", "thaw"])
def test_freeze_and_thaw_refusals(op):
    with pytest.raises(ProtocolError):
        encode(op, conn="k")                       # no fields
    with pytest.raises(ProtocolError):
        decode(encode(op), fd=5)                   # no descriptor
    head = json.dumps({"op": op, "conn": "k"}).encode()
    with pytest.raises(ProtocolError):
        decode(struct.pack(">I", len(head)) + head)


@pytest.mark.parametrize("state", [b"", b"s", os.urandom(1 << 20)])
def test_frozen(state):
    msg = round_trip("frozen", state, **fields(regenerable=1))
    assert msg["regenerable"] == 1 and msg.payload == state


@pytest.mark.parametrize("change", [
    dict(conn=""), dict(conn=5), dict(input=-1), dict(read=1 << 64), dict(regenerable=True),
    dict(write=1.0), dict(output="20"),
])
def test_frozen_refusals(change):
    f = fields() | change
    with pytest.raises(ProtocolError):
        encode("frozen", b"s", **f)
    head = json.dumps({"op": "frozen", **f}).encode()
    with pytest.raises(ProtocolError):
        decode(struct.pack(">I", len(head)) + head + b"s")


def test_frozen_missing_or_extra_field():
    f = fields()
    for k in FROZEN_FIELDS:
        with pytest.raises(ProtocolError):
            encode("frozen", **{x: v for x, v in f.items() if x != k})
    with pytest.raises(ProtocolError):
        encode("frozen", **f, seq=1)
    with pytest.raises(ProtocolError):
        decode(encode("frozen", **f), fd=3)


@pytest.mark.parametrize("entries", [[], TWO, [(fields(), b"")]])
def test_frozen_many(entries):
    payload = encode_frozen_many(entries)
    msg = round_trip("frozen_many", payload, count=len(entries))
    assert decode_frozen_many(msg.payload, msg["count"]) == entries


def test_frozen_many_refusals():
    with pytest.raises(ProtocolError):
        encode("frozen_many", encode_frozen_many(TWO))              # no count
    for count in (-1, True, "2", 1 << 64):
        with pytest.raises(ProtocolError):
            encode("frozen_many", encode_frozen_many(TWO), count=count)
    with pytest.raises(ProtocolError):
        decode(encode("frozen_many", encode_frozen_many(TWO), count=2), fd=4)
    # a count in the header that disagrees with the index
    msg = decode(encode("frozen_many", encode_frozen_many(TWO), count=3))
    with pytest.raises(ProtocolError):
        decode_frozen_many(msg.payload, msg["count"])


def test_frozen_many_past_max_message():
    entries = [(fields(), b"\0" * (MAX_MESSAGE // 2)), (fields("b"), b"\0" * (MAX_MESSAGE // 2))]
    payload = encode_frozen_many(entries)        # pure: no limit of its own
    assert decode_frozen_many(payload, 2) == entries
    with pytest.raises(ProtocolError) as info:
        encode("frozen_many", payload, count=2)
    assert "exceeds" in str(info.value)


@pytest.mark.parametrize("reason", ["passed to host-b", "x", "\u00e9t\u00e9"])
def test_passed(reason):
    round_trip("passed", conn="[fd00::100]:80-[fd00::1]:5555", reason=reason)


@pytest.mark.parametrize("f", [
    dict(conn="k"), dict(reason="r"), dict(conn="", reason="r"), dict(conn="k", reason=""),
    dict(conn="k", reason=5), dict(conn=None, reason="r"), dict(conn="k", reason="r", seq=1),
])
def test_passed_refusals(f):
    with pytest.raises(ProtocolError):
        encode("passed", **f)
    head = json.dumps({"op": "passed", **f}).encode()
    with pytest.raises(ProtocolError):
        decode(struct.pack(">I", len(head)) + head)


def test_passed_must_not_carry_a_descriptor():
    with pytest.raises(ProtocolError):
        decode(encode("passed", conn="k", reason="r"), fd=7)


@pytest.mark.parametrize("state, unacked", [
    (b"", b""), (b"state", b""), (b"", b"unacked"), (b"state", b"unacked-output"),
    (os.urandom(1 << 20), os.urandom(1 << 20)),
])
def test_resume_with_unacked_len(state, unacked):
    msg = round_trip("resume", state + unacked, fd=9, conn="10.0.0.100:80-10.0.0.1:5555",
                     input=100, output=50, discard=3, unacked_len=len(unacked))
    n = msg["unacked_len"]
    # how the library splits it (checkpointd/app.py): the last unacked_len bytes
    got_state, got_unacked = (msg.payload[:len(msg.payload) - n], msg.payload[len(msg.payload) - n:]) \
        if n else (msg.payload, b"")
    assert (got_state, got_unacked) == (state, unacked)


def test_resume_extreme_offsets():
    round_trip("resume", b"", fd=0, conn="k", input=U64, output=U64, discard=U64, unacked_len=0)


def test_resume_refusals():
    good = dict(conn="k", input=1, output=1, discard=0, unacked_len=0)
    with pytest.raises(ProtocolError):
        decode(encode("resume", **good))                             # needs a descriptor
    for k in good:
        with pytest.raises(ProtocolError):
            encode("resume", **{x: v for x, v in good.items() if x != k})
    for change in (dict(unacked_len=-1), dict(unacked_len=True), dict(discard=1 << 64),
                   dict(conn=""), dict(input=None)):
        with pytest.raises(ProtocolError):
            encode("resume", **(good | change))
    with pytest.raises(ProtocolError):
        encode("resume", **good, read=0)


@pytest.mark.parametrize("op", [[], {}, ["freeze"]])
def test_decode_unhashable_op(op):
    head = json.dumps({"op": op}).encode()
    with pytest.raises(ProtocolError):
        decode(struct.pack(">I", len(head)) + head)


def test_decode_deeply_nested_header():
    head = b'{"op":"thaw","x":' + b"[" * 100_000
    with pytest.raises(ProtocolError):
        decode(struct.pack(">I", len(head)) + head)


def test_decode_non_string_hashable_op_is_refused():
    for op in (5, None, True, 1.5):
        head = json.dumps({"op": op}).encode()
        with pytest.raises(ProtocolError):
            decode(struct.pack(">I", len(head)) + head)


def test_protocol_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode_frozen_many(b"", 0)
    assert issubclass(protocol.ProtocolError, ValueError)
