"""The switchover's pass message (checkpointd/passwire.py): seal and open_.

Round trips with real ICIs (IPv4 and IPv6, empty and large queues and state), and every
refusal open_ makes, checked by its ``reason``: tampering anywhere, another target or
cluster, unknown or rotated keys, age, size, truncation, magic, version, and the
consistency checks of each passed connection (duplicate keys, a key that is not its
ICI's, offsets that contradict each other). Messages that ``seal`` would never produce
(an authenticated header that lies, lengths past the end) are built with the same key
derivation so that they authenticate and reach the format checks. Pure and root-free.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest

from checkpointd import passwire
from checkpointd.passwire import (MAGIC, NONCE_BYTES, SALT_BYTES, TAG_BYTES, VERSION, Pass,
                                  PassedConn, PassRefused, open_, seal, summary)
from checkpointd.store.keyring import Keyring, new_key_line
from checkpointd.store.record import _subkey, conn_key
from kernel.ici import F_SACK, F_TIMESTAMP, F_WINDOW, F_WSCALE, ICI

from ici_cases import CASES

NOW = 1_750_000_000 * 10**9
MAX_AGE = 10.0
CLUSTER, ORIGIN, TARGET = "prod", "host-a", "host-b"
LINE_K1, LINE_OLD, LINE_NEW = new_key_line("k1"), new_key_line("old"), new_key_line("new")
RING = Keyring.parse(LINE_K1)


def ring(*lines: str) -> Keyring:
    return Keyring.parse("\n".join(lines))


def make_ici(port: int, *, recv: bytes = b"", sent: bytes = b"", unsent: bytes = b"",
             v6: bool = False) -> ICI:
    """An ESTABLISHED endpoint with these queues; sequence numbers wrap across 2^32."""
    una, rcv = 0xFFFFFF00, 0xFFFFFFF0
    snd_nxt = (una + len(sent)) & 0xFFFFFFFF
    if v6:
        local, remote, family = IPv6Address("fd00::10"), IPv6Address("fd00::99"), 6
    else:
        local, remote, family = IPv4Address("10.0.0.10"), IPv4Address("10.0.0.99"), 4
    return ICI(family=family, local_addr=local, local_port=8080, remote_addr=remote,
               remote_port=port, flags=F_WSCALE | F_SACK | F_TIMESTAMP | F_WINDOW,
               mss_clamp=1448, snd_wscale=7, rcv_wscale=7, snd_una=una, snd_nxt=snd_nxt,
               write_seq=(snd_nxt + len(unsent)) & 0xFFFFFFFF,
               rcv_nxt=(rcv + len(recv)) & 0xFFFFFFFF, copied_seq=rcv,
               snd_wl1=rcv, snd_wnd=65535, max_window=65535, rcv_wnd=65535, rcv_wup=rcv,
               ts_val=4242, dump_time_ns=NOW, recv_queue=recv, sent_queue=sent,
               unsent_queue=unsent)


def key_of(ici: ICI) -> str:
    return conn_key(ici.local, ici.remote)


def passed(ici: ICI, state: bytes = b"state", *, input: int = 100, output: int = 50,
           write: int = 50, durable_input: int = 90, regenerable: bool = False,
           key: str | None = None) -> PassedConn:
    return PassedConn(key=key or key_of(ici), ici=ici.encode(), state=state, input=input,
                      output=output, write=write, durable_input=durable_input,
                      regenerable=regenerable)


def make_pass(*conns: PassedConn, **changes) -> Pass:
    fields = dict(cluster=CLUSTER, origin=ORIGIN, target=TARGET, epoch=7, wall_ns=NOW,
                  conns=conns, by_checkpoint=("10.0.0.10:8080-10.0.0.99:1",))
    fields.update(changes)
    return Pass(**fields)


def opened(blob: bytes, keyring: Keyring = RING, **kwargs):
    args = dict(cluster=CLUSTER, target=TARGET, now_ns=NOW, max_age_s=MAX_AGE)
    args.update(kwargs)
    return open_(blob, keyring, **args)


def refused(reason: str, blob: bytes, keyring: Keyring = RING, **kwargs) -> str:
    with pytest.raises(PassRefused) as info:
        opened(blob, keyring, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value).startswith(f"pass refused: {reason}: ")
    return str(info.value)


def fixed_len(blob: bytes) -> int:
    (kid_len,) = struct.unpack_from(">H", blob, 10)
    return 12 + kid_len + SALT_BYTES + NONCE_BYTES


def forge(plain: bytes, keyring: Keyring = RING, *, cluster: str = CLUSTER,
          target: str = TARGET, version: int = VERSION) -> bytes:
    """Seal arbitrary plaintext the way ``seal`` does: it authenticates, so open_ reaches
    the checks that come after the authentication."""
    key_id, key = keyring.current
    kid = key_id.encode()
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    fixed = struct.pack(">8sHH", MAGIC, version, len(kid)) + kid + salt + nonce
    aad = fixed + f"pass:{cluster}->{target}".encode()
    return fixed + _subkey(key, salt).encrypt(nonce, plain, aad)


def plaintext(header: dict, *parts: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + b"".join(parts)


def good_header(*conns: PassedConn, **changes) -> dict:
    header = {"origin": ORIGIN, "target": TARGET, "cluster": CLUSTER, "epoch": 7,
              "wall_ns": NOW, "nonce": "ab" * 12, "by_checkpoint": [],
              "conns": [dict(key=c.key, input=c.input, output=c.output, write=c.write,
                             durable_input=c.durable_input, regenerable=c.regenerable,
                             ici_len=len(c.ici), state_len=len(c.state)) for c in conns]}
    header.update(changes)
    return header


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_several_connections_ipv4_ipv6_and_golden_shapes():
    icis = [make_ici(1001, recv=b"req", sent=b"SENT", unsent=b"UNSENT"),
            make_ici(1002, v6=True, recv=b"six", sent=b"6"),
            make_ici(1003),                                      # empty queues
            CASES["v4_full"], CASES["v6_usec_ts"], CASES["v4_wrapping"], CASES["v6_no_window"]]
    conns = (passed(icis[0], b"state-0", input=10, output=20, write=20, durable_input=3),
             passed(icis[1], b"", input=0, output=0, write=0, durable_input=0),   # empty state
             passed(icis[2], b"\x00\xff" * 50, input=5, output=1, write=9, durable_input=5,
                    regenerable=True),
             *(passed(i, f"s{n}".encode(), input=n, output=n, write=n, durable_input=0)
               for n, i in enumerate(icis[3:], 1)))
    p = make_pass(*conns, by_checkpoint=("10.0.0.10:8080-10.0.0.99:7", "[fd00::10]:8080-[fd00::99]:7"))
    blob = seal(p, RING)
    assert blob.startswith(MAGIC)
    got, got_icis = opened(blob)
    assert got == p                                   # every field, the nonce included
    assert got_icis == icis                           # decoded, in order
    assert [c.key for c in got.conns] == [key_of(i) for i in icis]
    assert got.conns[1].state == b"" and got.conns[2].regenerable is True
    assert got.conns[1].key.startswith("[fd00::10]:8080-[fd00::99]:")
    for c in got.conns:                               # plain types, ready for the kernel
        assert type(c.ici) is bytes and type(c.state) is bytes and type(c.input) is int


def test_round_trip_large_state_and_queues():
    big_recv, big_sent, big_unsent = os.urandom(1 << 20), os.urandom(3 << 19), os.urandom(1 << 16)
    state = os.urandom(4 << 20)
    i1 = make_ici(2001, recv=big_recv, sent=big_sent, unsent=big_unsent)
    i2 = make_ici(2002, v6=True, recv=big_recv[:12345])
    p = make_pass(passed(i1, state, input=1 << 40, output=1 << 41, write=1 << 41,
                         durable_input=(1 << 40) - 7),
                  passed(i2, b""))
    blob = seal(p, RING)
    assert len(blob) > len(state) + len(big_recv) + len(big_sent)
    assert state not in blob and big_recv not in blob            # encrypted, not just signed
    got, (g1, g2) = opened(blob)
    assert got == p and (g1, g2) == (i1, i2)
    assert g1.recv_queue == big_recv and g1.send_queue == big_sent + big_unsent
    assert got.conns[0].state == state and got.conns[0].input == 1 << 40


def test_round_trip_nothing_live_only_by_checkpoint():
    keys = ("10.0.0.10:8080-10.0.0.99:1", "10.0.0.10:8080-10.0.0.99:2", "[fd00::1]:80-[fd00::2]:3")
    p = make_pass(by_checkpoint=keys)
    got, icis = opened(seal(p, RING))
    assert got == p and got.by_checkpoint == keys and got.conns == () and icis == []


def test_each_seal_is_fresh():
    p = make_pass(passed(make_ici(3001)))
    a, b = seal(p, RING), seal(p, RING)
    assert a != b                                      # random salt and nonce
    assert opened(a)[0] == opened(b)[0] == p
    assert make_pass().nonce != make_pass().nonce       # each Pass its own replay nonce


# -- authentication ----------------------------------------------------------------------------

def test_every_tampered_byte_is_refused():
    blob = seal(make_pass(passed(make_ici(4001, recv=b"abc", sent=b"xy")),
                          passed(make_ici(4002, v6=True), b"st")), RING)
    fl = fixed_len(blob)
    for pos in range(len(blob)):
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= mask
            with pytest.raises(PassRefused) as info:
                opened(bytes(bad))
            reason = info.value.reason
            if pos < 8:
                assert reason == "format" and "magic" in str(info.value), (pos, mask)
            elif pos < 10:
                assert reason == "version", (pos, mask)
            elif pos < 12:                              # key id length: truncated, or unknown id
                assert reason in ("format", "authentication"), (pos, mask, reason)
            else:                                      # key id, salt, nonce, ciphertext, tag
                assert reason == "authentication", (pos, mask, reason)
    assert fl < len(blob) - TAG_BYTES


def test_appended_bytes_are_refused():
    blob = seal(make_pass(passed(make_ici(4101))), RING)
    refused("authentication", blob + b"\0")
    refused("authentication", blob + blob)


def test_wrong_target_or_cluster_does_not_authenticate():
    blob = seal(make_pass(passed(make_ici(4201))), RING)
    assert "another cluster or host" in refused("authentication", blob, target="host-c")
    refused("authentication", blob, cluster="staging")
    refused("authentication", blob, cluster="staging", target="host-c")
    # a target that is a prefix or extension of the right one is not the right one
    refused("authentication", blob, target="host-b2")
    refused("authentication", blob, target="host-")
    opened(blob)                                         # the right one still opens


def test_authenticated_header_naming_another_target_is_refused():
    """Belt and braces: a header that lies about its target or cluster, under an AAD
    that names this host (only a broken origin can produce it)."""
    ici = make_ici(4301)
    c = passed(ici)
    blob = forge(plaintext(good_header(c, target="host-z"), c.ici, c.state))
    assert "addressed to host-z in prod" in refused("target", blob)
    blob = forge(plaintext(good_header(c, cluster="other"), c.ici, c.state))
    refused("target", blob)
    # the same forged plaintext with a truthful header opens: the forge is faithful
    p, icis = opened(forge(plaintext(good_header(c), c.ici, c.state)))
    assert icis == [ici] and p.conns == (c,)


def test_unknown_key_id_and_foreign_key_material():
    blob = seal(make_pass(passed(make_ici(4401))), RING)
    msg = refused("authentication", blob, ring(LINE_OLD))
    assert "'k1'" in msg and "does not have" in msg
    # the same key name with other key material: the tag does not verify
    foreign = ring("k1:" + new_key_line("x").split(":", 1)[1])
    refused("authentication", blob, foreign)


def test_key_rotation():
    p = make_pass(passed(make_ici(4501)))
    by_old = seal(p, ring(LINE_OLD))
    # step 1: the new key prepended; messages of the old one still open, new ones use "new"
    both = ring(LINE_NEW, LINE_OLD)
    assert opened(by_old, both)[0] == p
    by_new = seal(p, both)
    assert by_new[12:12 + 3] == b"new" and by_old[12:12 + 3] == b"old"
    assert opened(by_new, both)[0] == p
    assert opened(by_new, ring(LINE_NEW))[0] == p
    # a host that has not rotated yet cannot open the new key's messages
    refused("authentication", by_new, ring(LINE_OLD))
    # step 3: the old key dropped; its messages are refused
    assert "'old'" in refused("authentication", by_old, ring(LINE_NEW))


# -- freshness ---------------------------------------------------------------------------------

def test_stale_and_future_messages_are_refused():
    ns = 10**9
    for wall, ok in ((NOW, True), (NOW - int(MAX_AGE * ns), True), (NOW + int(MAX_AGE * ns), True),
                     (NOW - int(MAX_AGE * ns) - ns // 1000, False), (NOW - 3600 * ns, False),
                     (NOW + int(MAX_AGE * ns) + ns // 1000, False), (NOW + 3600 * ns, False),
                     (0, False)):
        blob = seal(make_pass(passed(make_ici(5001)), wall_ns=wall), RING)
        if ok:
            assert opened(blob)[0].wall_ns == wall
        else:
            assert "at most 10 s accepted" in refused("stale", blob), wall
    # the same message is fresh for a receiver whose clock agrees
    old = seal(make_pass(wall_ns=NOW - 60 * ns), RING)
    refused("stale", old)
    assert opened(old, now_ns=NOW - 59 * ns)[0].wall_ns == NOW - 60 * ns
    assert opened(old, max_age_s=61)[0].wall_ns == NOW - 60 * ns


# -- size, truncation, magic, version -----------------------------------------------------------

def test_oversized_messages():
    p = make_pass(passed(make_ici(6001, recv=b"r" * 1000), b"s" * 5000))
    blob = seal(p, RING)
    n = len(blob)
    with pytest.raises(PassRefused) as info:
        seal(p, RING, max_size=n - 1)
    assert info.value.reason == "size"
    assert len(seal(p, RING, max_size=n)) == n           # exactly the limit is fine
    refused("size", blob, max_size=n - 1)
    assert opened(blob, max_size=n)[0] == p
    refused("size", b"\0" * 100, max_size=99)            # checked before anything else


def test_truncated_messages():
    blob = seal(make_pass(passed(make_ici(6101, sent=b"abc"))), RING)
    fl = fixed_len(blob)
    for n in (0, 1, 7, 8, 11, 12, fl - 1, fl, fl + TAG_BYTES - 1):
        assert "truncated" in refused("format", blob[:n]), n
    for n in (fl + TAG_BYTES, fl + TAG_BYTES + 1, len(blob) - 1, len(blob) - TAG_BYTES):
        refused("authentication", blob[:n])


def test_bad_magic():
    blob = seal(make_pass(passed(make_ici(6201))), RING)
    assert "TCPCPASS" in refused("format", b"TCPCPASX" + blob[8:])
    refused("format", b"\0" * 8 + blob[8:])
    # a sealed record or an ICI is not a pass
    refused("format", make_ici(6202).encode())


def test_bad_version():
    blob = seal(make_pass(passed(make_ici(6301))), RING)
    for version in (0, 2, 0xFFFF):
        bad = blob[:8] + struct.pack(">H", version) + blob[10:]
        assert f"version {version}" in refused("version", bad)
    # a future version sealed properly is refused for its version, not its tag
    c = passed(make_ici(6302))
    refused("version", forge(plaintext(good_header(c), c.ici, c.state), version=2))


# -- the connections ---------------------------------------------------------------------------

def test_duplicate_connection_keys():
    ici = make_ici(7001)
    refused("format", seal(make_pass(passed(ici), passed(ici, b"other")), RING))
    # passed live and announced by checkpoint at once
    msg = refused("format", seal(make_pass(passed(ici), by_checkpoint=(key_of(ici),)), RING))
    assert "named twice" in msg


def test_key_not_matching_its_ici():
    a, b = make_ici(7101), make_ici(7102, v6=True)
    msg = refused("format", seal(make_pass(passed(a, key=key_of(b))), RING))
    assert key_of(a) in msg and key_of(b) in msg
    refused("format", seal(make_pass(passed(a, key="10.0.0.10:8080-10.0.0.99:1")), RING))
    # two connections whose ICIs were swapped
    refused("format", seal(make_pass(replace(passed(a), ici=b.encode()),
                                     replace(passed(b), ici=a.encode())), RING))


def test_ici_that_does_not_decode():
    ici = make_ici(7201)
    raw = bytearray(ici.encode())
    raw[-1] ^= 1                                          # its CRC
    refused("format", seal(make_pass(replace(passed(ici), ici=bytes(raw))), RING))
    refused("format", seal(make_pass(replace(passed(ici), ici=b"")), RING))
    refused("format", seal(make_pass(replace(passed(ici), ici=b"garbage" * 20)), RING))


@pytest.mark.parametrize("fields, ok", [
    (dict(input=100, durable_input=100), True),                    # durable at R
    (dict(input=100, durable_input=0), True),
    (dict(input=100, durable_input=101), False),                   # durable input > input
    (dict(input=0, durable_input=1), False),
    (dict(input=100, durable_input=-1), False),
    (dict(output=51, write=50), False),                           # output > write
    (dict(output=-1, write=50), False),
    (dict(output=0, write=0), True),
    (dict(output=49, write=50), False),                           # logged output < write
    (dict(output=0, write=50), False),
    (dict(output=49, write=50, regenerable=True), True),          # regenerable: fine
    (dict(output=0, write=1 << 31, regenerable=True), True),      # exactly the bound
    (dict(output=0, write=(1 << 31) + 1, regenerable=True), False),
    (dict(output=5, write=(1 << 32) + 5, regenerable=True), False),
    (dict(output=1 << 40, write=(1 << 40) + (1 << 31), regenerable=True), True),
])
def test_offsets_are_checked(fields, ok):
    ici = make_ici(7301)
    p = make_pass(passed(ici, **fields))
    blob = seal(p, RING)
    if ok:
        got, icis = opened(blob)
        assert got == p and icis == [ici]
    else:
        refused("format", blob)


def test_one_bad_connection_refuses_the_whole_pass():
    good = [passed(make_ici(7400 + n)) for n in range(5)]
    bad = passed(make_ici(7499), output=1, write=2)         # logged, output < write
    refused("format", seal(make_pass(*good[:3], bad, *good[3:]), RING))


@pytest.mark.parametrize("build", [
    pytest.param(lambda c: plaintext(good_header(c), c.ici, c.state, b"x"), id="trailing-byte"),
    pytest.param(lambda c: plaintext(good_header(c), c.ici, c.state[:-1]), id="short-state"),
    pytest.param(lambda c: plaintext(good_header(c), c.ici), id="no-state"),
    pytest.param(lambda c: plaintext(good_header(c)), id="no-parts"),
    pytest.param(lambda c: b"\0\0\0\x05" + b"{}", id="header-longer-than-message"),
    pytest.param(lambda c: b"\0\0", id="no-length"),
    pytest.param(lambda c: b"", id="empty"),
    pytest.param(lambda c: struct.pack(">I", 3) + b"nope", id="not-json"),
    pytest.param(lambda c: struct.pack(">I", 2) + b"\xff\xfe", id="not-utf8"),
    pytest.param(lambda c: plaintext([1, 2]), id="header-a-list"),
    pytest.param(lambda c: plaintext({k: v for k, v in good_header(c).items() if k != "nonce"},
                                     c.ici, c.state), id="missing-nonce"),
    pytest.param(lambda c: plaintext(good_header(c, epoch="seven"), c.ici, c.state), id="bad-epoch"),
    pytest.param(lambda c: plaintext(good_header(c, conns=[{"key": c.key}]), c.ici, c.state),
                 id="conn-fields-missing"),
    pytest.param(lambda c: plaintext(good_header(c, conns=[dict(good_header(c)["conns"][0],
                                                                ici_len=-1)]), c.ici, c.state),
                 id="negative-length"),
    pytest.param(lambda c: plaintext(good_header(c, conns=[dict(good_header(c)["conns"][0],
                                                                state_len=10**9)]), c.ici, c.state),
                 id="length-past-the-end"),
    pytest.param(lambda c: plaintext(good_header(c, conns=["x"]), c.ici, c.state), id="conn-not-object"),
])
def test_authenticated_but_malformed_plaintext(build):
    c = passed(make_ici(7501), b"the-state")
    refused("format", forge(build(c)))


# -- what may be logged ------------------------------------------------------------------------

def test_summary_has_no_state_and_no_ici():
    secret = b"SECRET-APPLICATION-STATE-" + os.urandom(8)
    ici = make_ici(8001, recv=b"RECEIVED-BYTES", sent=b"SENT-BYTES")
    p = make_pass(passed(ici, secret), passed(make_ici(8002, v6=True), secret * 3),
                  by_checkpoint=("10.0.0.10:8080-10.0.0.99:9",))
    s = summary(p)
    assert s == {"cluster": CLUSTER, "origin": ORIGIN, "target": TARGET, "epoch": 7,
                 "wall_ns": NOW, "by_checkpoint": ("10.0.0.10:8080-10.0.0.99:9",),
                 "nonce": p.nonce, "connections": 2}

    def walk(value):
        assert not isinstance(value, (bytes, bytearray, memoryview)), value
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
    walk(s)
    text = repr(s) + json.dumps(s)
    for needle in (secret.hex(), "SECRET", "RECEIVED", "SENT-BYTES", ici.encode().hex()[:40]):
        assert needle not in text
    # and the summary of an opened message says the same
    assert summary(opened(seal(p, RING))[0]) == s


def test_refusal_is_a_value_error_with_a_metric_reason():
    with pytest.raises(ValueError) as info:
        opened(b"")
    assert isinstance(info.value, PassRefused) and info.value.reason == "format"
    assert passwire.PassRefused("replay", "x").reason == "replay"
