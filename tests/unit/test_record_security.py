"""What a sealed record resists, and what it does not, case by case (docs/security.md).

test_record.py has one test per refusal reason; here each attack or accident an operator
could meet has its own test, and each checks the reason *and* that the message names what
failed: which part was tampered with, which key is unknown, which epoch was expected. The
last tests pin down the known limit (an older record of the same connection put back
within one epoch opens) and what bounds it, so the docs and the code cannot drift apart.
"""

from __future__ import annotations

import struct

import pytest

from checkpointd.store import record as rec
from checkpointd.store.errors import RecordError
from checkpointd.store.keyring import Keyring
from checkpointd.store.layout import Layout
from checkpointd.store.record import CheckpointRecord, conn_key, open_, open_many, seal

LAYOUT = Layout("prod")
NOW = 1_700_000_000 * 10**9
KEY_OLD, KEY_NEW, KEY_FOREIGN = b"o" * 32, b"n" * 32, b"f" * 32
CONN = conn_key(("10.0.0.1", 80), ("10.0.0.2", 5555))
NAME = LAYOUT.conn(CONN)


def ring(*pairs) -> Keyring:
    return Keyring(tuple(pairs or (("k1", KEY_OLD),)))


def make(**changes) -> CheckpointRecord:
    fields = dict(conn_key=CONN, ici=b"\x01" * 120, app_state=b"state", input_offset=1000,
                  output_offset=2000, write_offset=2500, ts_val=7, wall_ns=NOW, epoch=7, seq=3)
    fields.update(changes)
    return CheckpointRecord(**fields)


def refused(reason: str, blob: bytes, keyring: Keyring, name: str = NAME, **kwargs) -> str:
    """Open ``blob``; it must be refused for ``reason``. Returns the message."""
    with pytest.raises(RecordError) as info:
        open_(blob, keyring, name, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert info.value.key_name == name
    return str(info.value)


def layout_of(blob: bytes) -> dict[str, slice]:
    """Where each part of a sealed record lies (docs/store.md, "Sealing")."""
    kid_len = blob[14]
    kid_end = 15 + kid_len
    header_end = kid_end + rec.SALT_BYTES + rec.NONCE_BYTES
    return {"magic": slice(0, 4), "version": slice(4, 6), "epoch": slice(6, 14),
            "key id": slice(15, kid_end), "salt": slice(kid_end, kid_end + rec.SALT_BYTES),
            "nonce": slice(kid_end + rec.SALT_BYTES, header_end),
            "ciphertext": slice(header_end, len(blob) - rec.TAG_BYTES),
            "tag": slice(len(blob) - rec.TAG_BYTES, len(blob))}


def flip(blob: bytes, where: slice, offset: int = 0) -> bytes:
    out = bytearray(blob)
    out[where.start + offset] ^= 0x40
    return bytes(out)


# -- tampering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["ciphertext", "tag"])
@pytest.mark.parametrize("offset", [0, -1])
def test_tampered_ciphertext_or_tag_fails_authentication(part, offset):
    blob = seal(make(), ring(), NAME)
    where = layout_of(blob)[part]
    at = offset % (where.stop - where.start)
    message = refused("authentication", flip(blob, where, at), ring())
    assert "tag mismatch" in message and "tampered" in message


@pytest.mark.parametrize("part", ["epoch", "salt", "nonce"])
def test_tampered_associated_data_fails_authentication(part):
    """The clear header is associated data: any edit to it breaks the tag."""
    blob = seal(make(), ring(), NAME)
    message = refused("authentication", flip(blob, layout_of(blob)[part]), ring())
    assert "tag mismatch" in message


def test_tampered_key_id_names_the_key_it_claims():
    blob = seal(make(), ring(), NAME)
    message = refused("authentication", flip(blob, layout_of(blob)["key id"]), ring())
    assert "sealed with key '+1'" in message and "not in the keyring" in message


def test_key_id_edited_to_another_key_of_the_ring_fails_authentication():
    """Pointing the record at another key we hold does not help: the tag is checked."""
    both = ring(("k1", KEY_OLD), ("k2", KEY_NEW))
    blob = bytearray(seal(make(), both, NAME))
    blob[layout_of(bytes(blob))["key id"]] = b"k2"
    assert "tag mismatch" in refused("authentication", bytes(blob), both)


@pytest.mark.parametrize("part, reason, words", [
    ("magic", "format", "magic"), ("version", "version", "sealed version")])
def test_tampered_framing_is_refused_by_what_it_broke(part, reason, words):
    blob = seal(make(), ring(), NAME)
    assert words in refused(reason, flip(blob, layout_of(blob)[part]), ring())


def test_every_single_byte_change_is_refused():
    """Exhaustive over one record: no byte of it can be changed unnoticed."""
    blob = seal(make(), ring(), NAME)
    for i in range(len(blob)):
        with pytest.raises(RecordError) as info:
            open_(flip(blob, slice(i, i + 1)), ring(), NAME)
        assert info.value.reason in ("authentication", "format", "version"), i


# -- moved or replayed ----------------------------------------------------------------------------
@pytest.mark.parametrize("other_name", [
    LAYOUT.conn("10.0.0.1:80-10.0.0.9:5555"),        # another connection, same cluster
    Layout("staging").conn(CONN),                   # the same connection, another cluster
    NAME + "x",                                     # the key name itself edited
])
def test_record_copied_to_another_key_name_fails_authentication(other_name):
    blob = seal(make(), ring(), NAME)
    assert "moved from another key name" in refused("authentication", blob, ring(), other_name)


def test_record_of_another_epoch_is_refused_naming_both_epochs():
    blob = seal(make(epoch=6), ring(), NAME)
    message = refused("epoch", blob, ring(), expected_epoch=7)
    assert "written in epoch 6, expected 7" in message


def test_record_of_a_later_epoch_is_refused_too():
    """A new leader restores the records of the epoch it replaces, not a later one."""
    assert "expected 7" in refused("epoch", seal(make(epoch=8), ring(), NAME), ring(), expected_epoch=7)


def test_replay_of_an_older_record_within_one_epoch_is_not_detected_by_the_aead():
    """The known limit (docs/security.md): same key name, same epoch, older seq opens.

    What bounds it is outside the AEAD: the MSL (below) and etcd auth keeping writers out.
    """
    old, new = make(seq=3, input_offset=1000), make(seq=4, input_offset=5000)
    old_blob, _ = seal(old, ring(), NAME), seal(new, ring(), NAME)
    assert open_(old_blob, ring(), NAME, expected_epoch=7) == old


def test_replayed_record_older_than_the_msl_is_refused_as_stale():
    blob = seal(make(wall_ns=NOW - 121 * 10**9), ring(), NAME)
    opened = open_many({CONN: blob}, ring(), LAYOUT.conn, expected_epoch=7, now_ns=NOW, msl_s=120)
    assert not opened.records and opened.counts == {"stale": 1}
    assert "121.0 s old, the MSL is 120 s" in str(opened.refused[CONN])


# -- keys: unknown, foreign, rotation ------------------------------------------------------------------
def test_record_sealed_with_an_unknown_key_names_that_key():
    blob = seal(make(), ring(("other-cluster", KEY_FOREIGN)), NAME)
    message = refused("authentication", blob, ring(("k1", KEY_OLD), ("k0", KEY_NEW)))
    assert "sealed with key 'other-cluster'" in message
    assert "ids=['k1', 'k0']" in message                      # what we do hold, by name


def test_foreign_key_under_a_name_we_use_fails_authentication():
    """Another cluster's key called "k1" too: the name matches, the tag does not."""
    blob = seal(make(), ring(("k1", KEY_FOREIGN)), NAME)
    message = refused("authentication", blob, ring(("k1", KEY_OLD)))
    assert "tag mismatch" in message
    for key in (KEY_OLD, KEY_FOREIGN):
        assert key.decode() not in message                    # never key material


def test_rotation_step_by_step():
    """docs/security.md, "Rotating the record key": at every step each host opens what the
    other seals, whichever of them is primary; at the end the old key's records are
    refused as an unknown key."""
    old_only = ring(("2024", KEY_OLD))
    step1 = ring(("2024", KEY_OLD), ("2025", KEY_NEW))     # new key added second: opens only
    step2 = ring(("2025", KEY_NEW), ("2024", KEY_OLD))     # moved to the top: seals
    step4 = ring(("2025", KEY_NEW))                         # old key removed
    sealed_by = {}
    # Hosts change one at a time: every adjacent pair of keyrings must interoperate.
    for a, b in ((old_only, step1), (step1, step2), (step2, step4)):
        for sealer, opener in ((a, b), (b, a)):
            blob = seal(make(), sealer, NAME)
            sealed_by[sealer.current_id] = blob
            assert open_(blob, opener, NAME, expected_epoch=7) == make(), (sealer, opener)
    assert step1.current_id == "2024"                       # step 1 changes no seal
    assert sealed_by["2025"][15:19] == b"2025"
    # Prepending on one host while the other has no new key would break a fail-over:
    blob = seal(make(), step2, NAME)
    assert "sealed with key '2025'" in refused("authentication", blob, old_only)
    # After step 4 a record sealed with the old key is refused, naming it.
    message = refused("authentication", sealed_by["2024"], step4)
    assert "sealed with key '2024'" in message and "not in the keyring" in message


def test_open_many_during_and_after_rotation_counts_by_reason():
    during = ring(("2025", KEY_NEW), ("2024", KEY_OLD))
    blobs = {"a:1-b:1": seal(make(conn_key="a:1-b:1"), ring(("2024", KEY_OLD)), LAYOUT.conn("a:1-b:1")),
             "a:1-b:2": seal(make(conn_key="a:1-b:2"), during, LAYOUT.conn("a:1-b:2"))}
    opened = open_many(blobs, during, LAYOUT.conn, expected_epoch=7, now_ns=NOW)
    assert set(opened.records) == set(blobs)
    opened = open_many(blobs, ring(("2025", KEY_NEW)), LAYOUT.conn, expected_epoch=7, now_ns=NOW)
    assert set(opened.records) == {"a:1-b:2"} and opened.counts == {"authentication": 1}


# -- size ------------------------------------------------------------------------------------------------
def test_every_truncation_is_refused():
    blob = seal(make(), ring(), NAME)
    for length in range(len(blob)):
        with pytest.raises(RecordError) as info:
            open_(blob[:length], ring(), NAME)
        reason = info.value.reason
        assert reason in ("format", "authentication"), (length, reason)
        if length < layout_of(blob)["ciphertext"].start + rec.TAG_BYTES:
            assert reason == "format" and "truncated" in str(info.value), length


def test_extended_record_fails_authentication():
    blob = seal(make(), ring(), NAME)
    assert "tag mismatch" in refused("authentication", blob + b"\0", ring())


def _overhead() -> int:
    """Bytes a sealed record adds around its app_state (for the boundary below)."""
    r = make(app_state=b"")
    return len(seal(r, ring(), NAME))


def test_record_of_exactly_the_limit_passes_and_one_byte_more_is_refused():
    room = rec.MAX_RECORD_BYTES - _overhead()
    at_limit = make(app_state=b"x" * room)
    blob = seal(at_limit, ring(), NAME)
    assert len(blob) == rec.MAX_RECORD_BYTES
    assert open_(blob, ring(), NAME) == at_limit
    over = make(app_state=b"x" * (room + 1))
    with pytest.raises(RecordError, match=f"exceeds {rec.MAX_RECORD_BYTES}") as info:
        seal(over, ring(), NAME)
    assert info.value.reason == "size"
    # A record over the limit is refused before any parsing or decryption.
    message = refused("size", blob + b"\0", ring())
    assert f"{rec.MAX_RECORD_BYTES + 1} bytes exceeds {rec.MAX_RECORD_BYTES}" in message


def test_inner_record_lengths_cannot_claim_more_than_there_is():
    """Even inside the authenticated record, lengths are checked against the data."""
    raw = bytearray(make().encode())
    struct.pack_into(">I", raw, 62, 1 << 30)       # ici length (offset 62), far beyond the record
    with pytest.raises(RecordError, match="field lengths") as info:
        CheckpointRecord.decode(bytes(raw))
    assert info.value.reason == "format"


def test_refused_record_is_never_in_the_restored_set():
    """open_many keeps every refused record out of what the agent restores."""
    good = make()
    blobs = {CONN: flip(seal(good, ring(), NAME), slice(-1, None)),
             "a:1-b:2": seal(make(conn_key="a:1-b:2"), ring(), LAYOUT.conn("a:1-b:2"))}
    opened = open_many(blobs, ring(), LAYOUT.conn, expected_epoch=7, now_ns=NOW)
    assert set(opened.records) == {"a:1-b:2"} and set(opened.refused) == {CONN}
