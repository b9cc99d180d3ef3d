"""Root-free tests of the ICI: golden vectors, every validation error, a property round trip."""

import struct
import zlib
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import ici as ici_mod
from kernel.errors import ICIError
from kernel.ici import F_SACK, F_TIMESTAMP, F_WINDOW, F_WSCALE, HEADER_SIZE, ICI, OVERHEAD
from kernel.repair import advanced_timestamp

from ici_cases import CASES

GOLDEN = Path(__file__).parent.parent / "golden"


def golden(name: str) -> bytes:
    return bytes.fromhex((GOLDEN / f"{name}.hex").read_text().replace("\n", ""))


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_encode(name):
    assert CASES[name].encode() == golden(name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_decode(name):
    assert ICI.decode(golden(name)) == CASES[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_size_known_up_front(name):
    ici = CASES[name]
    assert ici.size() == len(ici.encode())
    assert ici_mod.size(len(ici.recv_queue), len(ici.sent_queue), len(ici.unsent_queue)) == ici.size()


def test_every_golden_file_has_a_case():
    assert {p.stem for p in GOLDEN.glob("*.hex")} == set(CASES)


def test_byte_order_is_fixed():
    raw = golden("v4_full")
    assert raw[:4] == b"TCPI"
    assert struct.unpack(">H", raw[4:6]) == (1,)
    # local port 7000 big-endian at its fixed offset, whatever the CPU
    assert raw[18:20] == (7000).to_bytes(2, "big")


def _recrc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def test_longer_header_from_a_newer_writer_still_decodes():
    """A later version may append fixed fields; the header length lets this code skip them."""
    raw = golden("v4_full")[:-4]
    extra = b"\x99" * 8
    body = raw[:6] + struct.pack(">H", HEADER_SIZE + 8) + raw[8:HEADER_SIZE] + extra + raw[HEADER_SIZE:]
    assert ICI.decode(_recrc(body)) == CASES["v4_full"]


# -- every validation error, by field ------------------------------------------------
BASE = CASES["v4_full"]

INVALID = [
    ("family", dict(family=5)),
    ("local_addr", dict(local_addr=IPv6Address("::1"))),
    ("remote_addr", dict(remote_addr=IPv4Address("0.0.0.0"))),
    ("local_port", dict(local_port=0)),
    ("remote_port", dict(remote_port=70000)),
    ("state", dict(state=10)),
    ("flags", dict(flags=0x100)),
    ("mss_clamp", dict(mss_clamp=87)),
    ("mss_clamp", dict(mss_clamp=65536)),
    ("snd_wscale", dict(snd_wscale=15)),
    ("rcv_wscale", dict(rcv_wscale=20)),
    ("snd_wscale", dict(flags=F_SACK | F_TIMESTAMP | F_WINDOW)),  # scale without F_WSCALE
    ("rcv_nxt", dict(rcv_nxt=1 << 32)),
    ("ts_val", dict(flags=F_WSCALE | F_SACK | F_WINDOW)),  # ts value without F_TIMESTAMP
    ("snd_una", dict(snd_una=105, sent_queue=b"")),  # snd_una beyond snd_nxt
    ("snd_nxt", dict(snd_nxt=111, sent_queue=b"x" * 11, unsent_queue=b"")),  # beyond write_seq
    ("copied_seq", dict(copied_seq=2004, recv_queue=b"")),
    ("recv_queue", dict(recv_queue=b"abcd")),
    ("sent_queue", dict(sent_queue=b"SEN")),
    ("unsent_queue", dict(unsent_queue=b"UNSENTX")),
    ("max_window", dict(max_window=100)),
    ("snd_wl1", dict(snd_wl1=2003 + 131072 + 1)),
    ("rcv_wup", dict(rcv_wup=2004)),
    ("flags", dict(flags=F_WSCALE | F_SACK | F_TIMESTAMP)),  # window values without F_WINDOW
    ("dump_time_ns", dict(dump_time_ns=-1)),
]


@pytest.mark.parametrize("field,changes", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_validation_names_the_field(field, changes):
    bad = BASE.replace(**changes)
    with pytest.raises(ICIError) as err:
        bad.validate()
    assert err.value.field == field
    with pytest.raises(ICIError):  # encode never writes an invalid record
        bad.encode()


def test_oversized_queue_is_refused(monkeypatch):
    monkeypatch.setattr(ici_mod, "MAX_QUEUE", 2)
    with pytest.raises(ICIError) as err:
        BASE.validate()
    assert err.value.field == "recv_queue"


@pytest.mark.parametrize("mutate,field", [
    (lambda b: b[:5], "length"),                          # truncated inside the prefix
    (lambda b: b[:40], "length"),                         # truncated inside the header
    (lambda b: b[:-1], "length"),                         # truncated inside the trailer
    (lambda b: b + b"\0", "length"),                      # trailing byte
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + b"\x00\x02" + b[6:], "version"),   # unknown version
    (lambda b: b[:6] + b"\x00\x10" + b[8:], "header_len"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "crc"),  # a flipped queue byte
])
def test_decode_rejects_damaged_records(mutate, field):
    with pytest.raises(ICIError) as err:
        ICI.decode(mutate(golden("v4_full")))
    assert err.value.field == field


def test_decode_refuses_oversized_input_before_parsing():
    with pytest.raises(ICIError) as err:
        ICI.decode(golden("v4_full"), max_size=100)
    assert err.value.field == "length"


def test_decode_validates_content_after_crc():
    """A record with a valid CRC but inconsistent content (a forged one) is still refused."""
    raw = bytearray(golden("v4_full")[:-4])
    raw[9] = 0x10 | raw[9]  # unknown flag bit in the flags word (offset 8..11)
    with pytest.raises(ICIError) as err:
        ICI.decode(_recrc(bytes(raw)))
    assert err.value.field == "flags"


def test_ipv4_padding_must_be_zero():
    raw = bytearray(golden("v4_minimal")[:-4])
    raw[26] = 1  # inside the 16-byte local address, past the 4 IPv4 bytes
    with pytest.raises(ICIError) as err:
        ICI.decode(_recrc(bytes(raw)))
    assert err.value.field == "local_addr"


# -- property-based round trip ---------------------------------------------------------
u32 = st.integers(0, 0xFFFFFFFF)
small = st.binary(max_size=64)


@st.composite
def icis(draw):
    family = draw(st.sampled_from([4, 6]))
    addr = (st.builds(IPv4Address, st.integers(1, 0xFFFFFFFF)) if family == 4
            else st.builds(IPv6Address, st.integers(1, (1 << 128) - 1)))
    flags = draw(st.integers(0, 15))
    recv_q, sent_q, unsent_q = draw(small), draw(small), draw(small)
    snd_una, copied = draw(u32), draw(u32)
    snd_nxt = (snd_una + len(sent_q)) & 0xFFFFFFFF
    rcv_nxt = (copied + len(recv_q)) & 0xFFFFFFFF
    ws = st.integers(0, 14) if flags & F_WSCALE else st.just(0)
    window = (0, 0, 0, 0, 0)
    if flags & F_WINDOW:
        snd_wnd = draw(u32)
        rcv_wnd = draw(st.integers(0, 1 << 30))
        window = ((rcv_nxt - draw(st.integers(0, 1 << 20))) & 0xFFFFFFFF, snd_wnd,
                  draw(st.integers(snd_wnd, 0xFFFFFFFF)), rcv_wnd,
                  (rcv_nxt - draw(st.integers(0, 1 << 20))) & 0xFFFFFFFF)
    return ICI(
        family=family, local_addr=draw(addr), local_port=draw(st.integers(1, 65535)),
        remote_addr=draw(addr), remote_port=draw(st.integers(1, 65535)), flags=flags,
        mss_clamp=draw(st.integers(88, 65535)), snd_wscale=draw(ws), rcv_wscale=draw(ws),
        snd_una=snd_una, snd_nxt=snd_nxt, write_seq=(snd_nxt + len(unsent_q)) & 0xFFFFFFFF,
        rcv_nxt=rcv_nxt, copied_seq=copied,
        snd_wl1=window[0], snd_wnd=window[1], max_window=window[2], rcv_wnd=window[3], rcv_wup=window[4],
        ts_val=draw(u32) if flags & F_TIMESTAMP else 0, dump_time_ns=draw(st.integers(0, (1 << 64) - 1)),
        recv_queue=recv_q, sent_queue=sent_q, unsent_queue=unsent_q)


@settings(max_examples=300)
@given(icis())
def test_round_trip(ici):
    raw = ici.encode()
    assert len(raw) == ici.size()
    assert ICI.decode(raw) == ici


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_of_garbage_raises_only_icierror(data):
    try:
        ICI.decode(data)
    except ICIError:
        pass


@settings(max_examples=200)
@given(icis(), st.integers(0, 10_000))
def test_any_single_byte_flip_is_detected(ici, pos):
    raw = bytearray(ici.encode())
    raw[pos % len(raw)] ^= 0x40
    with pytest.raises(ICIError):
        ICI.decode(bytes(raw))


# -- timestamp arithmetic (pure) ----------------------------------------------------
@pytest.mark.parametrize("ts,elapsed_ns,want", [
    (1000, 0, 1000),                       # millisecond clock, bit 0 clear
    (1000, 1_500_000, 1002),               # 1.5 ms: +1 ms, rounded up to keep bit 0 clear
    (1000, 2_000_000, 1002),
    (1001, 2_000, 1003),                   # microsecond clock: +2 us, bit 0 kept set
    (0xFFFFFFFF, 4_000, 0x00000003),       # wraps, bit 0 kept
    (5000, -10, 5000),                     # a clock that went back never moves ts back
])
def test_advanced_timestamp(ts, elapsed_ns, want):
    assert advanced_timestamp(ts, elapsed_ns) == want
