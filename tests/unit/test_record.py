"""Root-free tests of checkpoint records: encoding, sealing, every refusal reason, the key file."""

import base64
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointd.store import record as rec
from checkpointd.store.errors import REASONS, KeyringError, RecordError
from checkpointd.store.keyring import Keyring, new_key_line
from checkpointd.store.layout import Layout
from checkpointd.store.record import CheckpointRecord, check_fresh, conn_key, open_, open_many, seal
from kernel.errors import TcpcpError

LAYOUT = Layout("test")
NOW = 1_700_000_000 * 10**9
KEY_A = b"A" * 32
KEY_B = b"B" * 32


def keyring(*names_keys):
    return Keyring(tuple(names_keys or (("k1", KEY_A),)))


def make(**changes) -> CheckpointRecord:
    fields = dict(conn_key=conn_key(("10.0.0.1", 80), ("10.0.0.2", 5555)), ici=b"\x01" * 120,
                  app_state=b"state", input_offset=1000, output_offset=2000, write_offset=2500,
                  ts_val=0x12345679, wall_ns=NOW, epoch=7, seq=3, unacked=b"")
    fields.update(changes)
    return CheckpointRecord(**fields)


def sealed(record=None, ring=None):
    record = record or make()
    return seal(record, ring or keyring(), LAYOUT.conn(record.conn_key))


def refusal(reason, fn, *args, **kwargs) -> RecordError:
    with pytest.raises(RecordError) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    return info.value


# -- round trips ------------------------------------------------------------------------------
def test_seal_open_round_trip():
    r = make(unacked=b"logged output")
    assert open_(sealed(r), keyring(), LAYOUT.conn(r.conn_key), expected_epoch=7) == r


def test_errors_are_tcpcp_errors_with_a_known_reason():
    err = refusal("authentication", open_, sealed(), keyring(("k1", KEY_B)), LAYOUT.conn(make().conn_key))
    assert isinstance(err, TcpcpError)
    assert err.reason in REASONS
    assert err.key_name == LAYOUT.conn(make().conn_key)


def test_two_seals_of_one_record_differ():
    """Fresh salt and nonce each time: nothing repeats under one key."""
    assert sealed() != sealed()


def test_conn_key_from_the_4_tuple():
    assert conn_key(("10.0.0.1", 80), ("10.0.0.2", 5555)) == "10.0.0.1:80-10.0.0.2:5555"
    assert conn_key(("2001:db8::1", 80), ("2001:db8::2", 1)) == "[2001:db8::1]:80-[2001:db8::2]:1"


def test_encoding_is_versioned_big_endian():
    raw = make().encode()
    assert raw[:4] == b"TCPK"
    assert struct.unpack(">H", raw[4:6]) == (1,)
    assert CheckpointRecord.decode(raw) == make()


def test_longer_record_header_from_a_newer_writer_still_decodes():
    raw = make().encode()
    header_len = struct.unpack(">H", raw[6:8])[0]
    # a writer two extensions ahead: extension 1 (acked_input) and 8 unknown bytes
    rec = make(acked_input=make().input_offset - 1)
    raw = rec.encode()
    header_len = struct.unpack(">H", raw[6:8])[0]
    longer = raw[:6] + struct.pack(">H", header_len + 8) + raw[8:header_len] + b"\0" * 8 + raw[header_len:]
    assert CheckpointRecord.decode(longer) == rec


def test_acked_input_is_an_optional_header_extension():
    """Records without it (older writers) decode with the gate assumed at input_offset;
    with it, the header is 8 bytes longer and the value round-trips."""
    plain = make()
    assert plain.peer_acked_from == plain.input_offset
    ext = make(acked_input=plain.input_offset - 5)
    raw_plain, raw_ext = plain.encode(), ext.encode()
    assert len(raw_ext) == len(raw_plain) + 8
    assert CheckpointRecord.decode(raw_ext).peer_acked_from == plain.input_offset - 5


def test_acked_input_beyond_the_input_offset_is_refused():
    with pytest.raises(RecordError) as err:
        make(acked_input=make().input_offset + 1).encode()
    assert err.value.reason == "format" and "acked_input" in str(err.value)


# -- refusals: one test per reason --------------------------------------------------------------
def test_tampered_byte_fails_authentication():
    blob = bytearray(sealed())
    blob[-20] ^= 0x01
    refusal("authentication", open_, bytes(blob), keyring(), LAYOUT.conn(make().conn_key))


def test_tampered_header_epoch_fails_authentication():
    """The epoch is in the clear but authenticated: editing it is caught."""
    blob = bytearray(sealed())
    blob[6:14] = (8).to_bytes(8, "big")
    refusal("authentication", open_, bytes(blob), keyring(), LAYOUT.conn(make().conn_key), 8)


def test_record_moved_to_another_key_name_fails_authentication():
    blob = sealed()
    other = LAYOUT.conn("10.0.0.1:80-10.0.0.3:6666")
    refusal("authentication", open_, blob, keyring(), other)
    refusal("authentication", open_, blob, keyring(), Layout("other").conn(make().conn_key))


def test_unknown_key_fails_authentication():
    err = refusal("authentication", open_, sealed(), keyring(("k2", KEY_B)), LAYOUT.conn(make().conn_key))
    assert "'k1'" in str(err) and KEY_A.decode() not in str(err)


def test_record_of_another_epoch_is_refused_as_epoch():
    err = refusal("epoch", open_, sealed(), keyring(), LAYOUT.conn(make().conn_key), expected_epoch=8)
    assert "epoch 7" in str(err)


def test_stale_record_is_refused_after_the_msl():
    r = make(wall_ns=NOW)
    assert check_fresh(r, now_ns=NOW + 120 * 10**9, msl_s=120) == r
    err = refusal("stale", check_fresh, r, now_ns=NOW + 121 * 10**9, msl_s=120)
    assert "121.0 s old" in str(err)


def test_oversized_record_is_refused_both_ways():
    big = make(app_state=b"x" * rec.MAX_RECORD_BYTES)
    refusal("size", seal, big, keyring(), LAYOUT.conn(big.conn_key))
    small_limit = len(sealed()) - 1
    refusal("size", open_, sealed(), keyring(), LAYOUT.conn(make().conn_key), max_size=small_limit)


def test_unknown_sealed_version_is_refused_as_version():
    blob = bytearray(sealed())
    blob[4:6] = (2).to_bytes(2, "big")
    refusal("version", open_, bytes(blob), keyring(), LAYOUT.conn(make().conn_key))


def test_unknown_record_version_inside_is_refused_as_version():
    raw = bytearray(make().encode())
    raw[4:6] = (9).to_bytes(2, "big")
    refusal("version", CheckpointRecord.decode, bytes(raw))


@pytest.mark.parametrize("blob", [b"", b"TCPS", b"XXXX" + bytes(40), b"TCPS\x00\x01" + bytes(8) + b"\x05ab"])
def test_garbage_is_refused_as_format(blob):
    refusal("format", open_, blob, keyring(), LAYOUT.conn(make().conn_key))


def test_record_sealed_under_the_wrong_name_is_refused():
    refusal("format", seal, make(), keyring(), LAYOUT.conn("1.2.3.4:1-5.6.7.8:2"))


@pytest.mark.parametrize("field, value", [("input_offset", -1), ("seq", 1 << 64), ("ts_val", 1 << 32),
                                          ("conn_key", "a/b"), ("ici", "text")])
def test_out_of_range_field_is_refused_as_format(field, value):
    err = refusal("format", make(**{field: value}).encode)
    assert field.split("_")[0] in str(err)


def test_open_many_counts_refusals_by_reason():
    ring = keyring()
    good = make()
    old = make(conn_key="a:1-b:2", wall_ns=NOW - 200 * 10**9)
    other_epoch = make(conn_key="a:1-b:3", epoch=6)
    blobs = {good.conn_key: sealed(good), old.conn_key: sealed(old), other_epoch.conn_key: sealed(other_epoch),
             "a:1-b:4": sealed(good)}     # good's record copied under another key
    opened = open_many(blobs, ring, LAYOUT.conn, expected_epoch=7, now_ns=NOW)
    assert set(opened.records) == {good.conn_key}
    assert opened.counts == {"stale": 1, "epoch": 1, "authentication": 1}
    assert opened.refused["a:1-b:4"].key_name == LAYOUT.conn("a:1-b:4")


# -- key rotation and the key file ---------------------------------------------------------------
def test_record_sealed_with_the_old_key_opens_during_rotation():
    old_ring = keyring(("old", KEY_A))
    blob = sealed(ring=old_ring)
    rotated = keyring(("new", KEY_B), ("old", KEY_A))
    assert open_(blob, rotated, LAYOUT.conn(make().conn_key)) == make()
    fresh = sealed(ring=rotated)
    assert open_(fresh, keyring(("new", KEY_B)), LAYOUT.conn(make().conn_key)) == make()
    refusal("authentication", open_, fresh, old_ring, LAYOUT.conn(make().conn_key))


def write_key_file(tmp_path, text, mode=0o600):
    path = tmp_path / "keys"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_key_file_loads_current_key_first(tmp_path):
    line_new, line_old = new_key_line("new"), new_key_line("old")
    ring = Keyring.from_file(write_key_file(tmp_path, f"# rotation\n{line_new}\n\n{line_old}\n"))
    assert ring.current_id == "new"
    assert [k for k, _ in ring.keys] == ["new", "old"]
    assert ring.get("old") == base64.b64decode(line_old.split(":", 1)[1])
    assert "old" in repr(ring) and line_old.split(":", 1)[1] not in repr(ring)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_accessible_by_group_or_others_is_refused(tmp_path, mode):
    path = write_key_file(tmp_path, new_key_line("k1"), mode)
    with pytest.raises(KeyringError) as info:
        Keyring.from_file(path)
    assert str(path) in str(info.value) and f"{mode:04o}" in str(info.value)
    assert info.value.mode == mode and info.value.path == str(path)


@pytest.mark.parametrize("text, words", [
    ("", "no key"), ("k1 AAAA", "line 1"), ("k1:not base64!", "base64"),
    ("k1:" + base64.b64encode(b"short").decode(), "5 bytes"),
    (new_key_line("k1") + "\n" + new_key_line("k1"), "duplicate"),
    ("bad name:" + base64.b64encode(KEY_A).decode(), "key name")])
def test_malformed_key_file_names_the_problem(tmp_path, text, words):
    with pytest.raises(KeyringError) as info:
        Keyring.from_file(write_key_file(tmp_path, text))
    assert words in str(info.value)


def test_missing_key_file_names_the_path(tmp_path):
    with pytest.raises(KeyringError, match="keys: cannot open"):
        Keyring.from_file(tmp_path / "keys")


# -- properties ---------------------------------------------------------------------------------------
u64 = st.integers(0, (1 << 64) - 1)
records = st.builds(
    CheckpointRecord, conn_key=st.from_regex(r"[A-Za-z0-9._:\[\]-]{1,40}", fullmatch=True),
    ici=st.binary(max_size=300), app_state=st.binary(max_size=300), input_offset=u64,
    output_offset=u64, write_offset=u64, ts_val=st.integers(0, (1 << 32) - 1), wall_ns=u64,
    epoch=u64, seq=u64, unacked=st.binary(max_size=100))


@settings(max_examples=200, deadline=None)
@given(records)
def test_any_record_round_trips_through_seal_and_open(r):
    ring = keyring(("k1", KEY_A), ("k0", KEY_B))
    assert CheckpointRecord.decode(r.encode()) == r
    assert open_(seal(r, ring, LAYOUT.conn(r.conn_key)), ring, LAYOUT.conn(r.conn_key), r.epoch) == r


@settings(max_examples=200, deadline=None)
@given(records, st.data())
def test_any_flipped_bit_is_refused(r, data):
    blob = bytearray(seal(r, keyring(), LAYOUT.conn(r.conn_key)))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordError) as info:
        open_(bytes(blob), keyring(), LAYOUT.conn(r.conn_key))
    assert info.value.reason in ("authentication", "format", "version")
