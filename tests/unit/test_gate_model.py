"""Root-free tests of the ACK gate's pure parts: keys, window arithmetic, the reference
model of the program (against hand-derived headers), the rewind of an ICI to the commit
offset, the segment builder, and the object reader."""

import errno
import shutil
import struct

import pytest

from kernel import ackgate, bpfobj, tcpseg
from kernel.ackgate import key_of, normalize, rewind_receive, tuple_of
from kernel.tcpseg import GUARDED, KEEP_SACK, RELEASED, TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN

from ici_cases import CASES


# --- keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("tup", [
    ("10.77.0.100", 7000, "10.77.0.1", 40000),
    ("fd77::100", 443, "fd77::1", 51234),
    ("192.0.2.1", 65535, "198.51.100.2", 1),
])
def test_key_is_36_bytes_and_round_trips(tup):
    key = key_of(tup)
    assert len(key) == ackgate.KEY_SIZE == 36
    assert tuple_of(key) == tup


def test_ipv4_key_is_ipv4_mapped_and_ports_big_endian():
    key = key_of(("10.0.0.1", 0x1234, "10.0.0.2", 0xABCD))
    assert key[:16] == b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert key[16:32] == b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 2])
    assert key[32:] == b"\x12\x34\xab\xcd"


def test_a_dual_stack_sockets_mapped_address_is_the_same_connection():
    assert normalize(("::ffff:10.0.0.1", 1, "::ffff:10.0.0.2", 2)) == ("10.0.0.1", 1, "10.0.0.2", 2)
    assert key_of(("::ffff:10.0.0.1", 1, "::ffff:10.0.0.2", 2)) == key_of(("10.0.0.1", 1, "10.0.0.2", 2))
    assert normalize(("fe80::1%eth0", 1, "fe80::2", 2)) == ("fe80::1", 1, "fe80::2", 2)


@pytest.mark.parametrize("tup", [("10.0.0.1", 0, "10.0.0.2", 1), ("10.0.0.1", 1, "10.0.0.2", 65536)])
def test_bad_ports_are_refused(tup):
    with pytest.raises(ValueError, match="port"):
        key_of(tup)


def test_mixed_families_are_refused():
    with pytest.raises(ValueError, match="mixed"):
        normalize(("10.0.0.1", 1, "fd77::1", 2))


# --- window arithmetic ------------------------------------------------------------------

@pytest.mark.parametrize("right,commit,wscale,want", [
    (1000, 0, 0, 1000),
    (1000, 0, 7, 8),              # ceil(1000 / 128): the right edge never moves back
    (1024, 0, 7, 8),              # exact
    (1025, 0, 7, 9),
    (100, 100, 7, 0),             # no room
    (50, 100, 7, 0),              # right edge before the commit: nothing to widen
    (10 << 20, 0, 0, 65535),      # capped: the field has 16 bits
    (5, 0xFFFFFFFE, 0, 7),        # across the wrap
    (1 << 29, 0, 14, 32768),
    (1 << 29, 0, 15, 32768),      # a scale above 14 counts as 14 (RFC 7323)
])
def test_widened_window(right, commit, wscale, want):
    assert tcpseg.widened_window(right, commit, wscale) == want


# --- the reference model ------------------------------------------------------------------

def hdr(seq=1000, ack=5000, flags=TH_ACK, window=100, options=b"", doff=None):
    n = 20 + len(options)
    return struct.pack("!HHIIBBHHH", 7000, 40000, seq, ack, (doff or n // 4) << 4, flags,
                       window, 0xBEEF, 0) + options


def sack(*blocks):
    return bytes([5, 2 + 8 * len(blocks)]) + b"".join(struct.pack("!II", *b) for b in blocks)


NOP2 = b"\x01\x01"
TS = b"\x01\x01\x08\x0a" + struct.pack("!II", 111, 222)


def test_ack_beyond_commit_is_clamped_and_the_window_widened():
    # wscale 2: right edge = 5000 + 100 * 4 = 5400; from 4000 that is 1400 = 350 * 4
    passed, out = tcpseg.gate(hdr(ack=5000, window=100), 20, 4000, 2, GUARDED)
    assert passed
    assert out == hdr(ack=4000, window=350)


def test_ack_at_or_before_commit_is_untouched():
    for commit in (5000, 6000):
        assert tcpseg.gate(hdr(ack=5000), 20, commit, 2, GUARDED) == (True, hdr(ack=5000))


def test_unguarded_entry_and_syn_are_untouched():
    h = hdr(ack=5000, flags=TH_SYN | TH_ACK)
    assert tcpseg.gate(h, 20, 4000, 2, GUARDED) == (True, h)
    assert tcpseg.gate(hdr(ack=5000), 20, 4000, 2, 0) == (True, hdr(ack=5000))


@pytest.mark.parametrize("flag", [TH_FIN | TH_ACK, TH_RST, TH_RST | TH_ACK, TH_FIN | TH_PSH | TH_ACK])
def test_fin_and_rst_are_dropped_unless_released(flag):
    assert tcpseg.gate(hdr(flags=flag), 20, 4000, 0, GUARDED)[0] is False
    assert tcpseg.gate(hdr(flags=flag), 20, 9000, 0, GUARDED | RELEASED)[0] is True


def test_sack_blocks_above_commit_go_the_rest_compacted():
    opts = NOP2 + sack((3000, 3500), (4500, 4800), (3600, 3900))  # keep 1st and 3rd
    passed, out = tcpseg.gate(hdr(ack=3000, options=opts), 20 + len(opts), 4000, 0, GUARDED)
    want = NOP2 + sack((3000, 3500), (3600, 3900)) + b"\x01" * 8
    assert out[20:] == want


def test_keep_sack_passes_every_block_but_still_clamps_the_ack():
    """A just-passed endpoint (switchover): the peer must see its holes at once."""
    opts = NOP2 + sack((4500, 4800), (3000, 3500))
    passed, out = tcpseg.gate(hdr(ack=5000, window=100, options=opts), 20 + len(opts), 4000, 2,
                              GUARDED | KEEP_SACK)
    assert passed and out == hdr(ack=4000, window=350, options=opts)
    assert tcpseg.gate(hdr(flags=TH_RST), 20, 4000, 0, GUARDED | KEEP_SACK)[0] is False


def test_all_blocks_above_commit_leave_only_nops():
    opts = TS + NOP2 + sack((4500, 4800))
    _, out = tcpseg.gate(hdr(ack=5000, options=opts), 20 + len(opts), 4000, 0, GUARDED)
    assert out[20:] == TS + NOP2 + b"\x01" * 10


def test_dsack_block_below_commit_stays():
    opts = NOP2 + sack((3500, 3900))           # a duplicate, below the commit offset
    passed, out = tcpseg.gate(hdr(ack=5000, options=opts), 20 + len(opts), 4000, 0, GUARDED)
    assert out[20:] == opts


def test_sack_at_an_odd_offset_without_padding_is_found():
    opts = b"\x01" + sack((4500, 4800)) + b"\x00"   # NOP, SACK, EOL: 12 bytes
    _, out = tcpseg.gate(hdr(ack=5000, options=opts), 32, 4000, 0, GUARDED)
    assert out[20:] == b"\x01" * 11 + b"\x00"


def test_a_sack_with_a_bad_length_becomes_nops_whole():
    opts = bytes([5, 11]) + b"x" * 9 + b"\x00"      # 11 is not 2 + 8n
    _, out = tcpseg.gate(hdr(ack=5000, options=opts), 32, 4000, 0, GUARDED)
    assert out[20:] == b"\x01" * 11 + b"\x00"


@pytest.mark.parametrize("opts", [
    b"\x00" + sack((4500, 4800))[:-1] + b"\x01\x01\x01\x01",   # EOL first: the rest is padding
    bytes([5, 0]) + b"\x01" * 10,                               # zero length
    bytes([5, 1]) + b"\x01" * 10,                               # length 1
    bytes([8, 30]) + b"\x01" * 10,                              # runs past the header
    b"\x01" * 11 + bytes([5]),                                  # kind without a length byte
])
def test_malformed_options_stop_the_parse_and_change_nothing_after(opts):
    h = hdr(ack=3000, options=opts)
    assert tcpseg.gate(h, len(h), 4000, 0, GUARDED) == (True, h)


def test_options_before_a_malformed_one_are_still_handled():
    opts = sack((4500, 4800)) + bytes([8, 0])       # SACK, then a zero-length option
    _, out = tcpseg.gate(hdr(ack=3000, options=opts), 32, 4000, 0, GUARDED)
    assert out[20:] == b"\x01" * 10 + bytes([8, 0])


def test_a_header_longer_than_the_segment_is_untouched():
    h = hdr(ack=5000, doff=15)   # claims 60 bytes, has 20
    assert tcpseg.gate(h, 20, 4000, 0, GUARDED) == (True, h)


# --- segments -------------------------------------------------------------------------

@pytest.mark.parametrize("src,dst", [("10.0.0.1", "10.0.0.2"), ("fd77::1", "fd77::2")])
def test_built_segments_parse_back_with_valid_checksums(src, dst):
    pkt = tcpseg.build(src, dst, 1, 2, 0xFFFFFFFF, 7, window=9, options=TS, payload=b"hello")
    seg = tcpseg.parse(pkt)
    assert (seg.src, seg.dst, seg.sport, seg.dport, seg.seq, seg.ack) == (src, dst, 1, 2, 0xFFFFFFFF, 7)
    assert seg.payload == b"hello" and seg.options == TS and seg.window == 9
    assert seg.checksum_ok()
    assert tcpseg.timestamps(seg.options) == (111, 222)
    bad = pkt[:-1] + bytes([pkt[-1] ^ 1])
    assert not tcpseg.parse(bad).checksum_ok()


def test_partial_checksum_means_the_pseudo_header_sum():
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    seg = tcpseg.build("10.0.0.1", "10.0.0.2", 1, 2, 3, 4)[20:]
    partial = seg[:16] + struct.pack("!H", tcpseg.pseudo_sum(src, dst, len(seg))) + seg[18:]
    assert tcpseg.checksum_ok(src, dst, partial, partial=True)
    assert not tcpseg.checksum_ok(src, dst, seg, partial=True)


# --- rewinding an ICI to the commit offset ------------------------------------------------

def test_rewind_puts_the_receive_side_at_the_commit_and_keeps_the_right_edge():
    ici = CASES["v4_full"]          # rcv_nxt 2003, copied_seq 2000, rcv_wup 2003, rcv_wnd 131072
    out = rewind_receive(ici, 1990)
    assert (out.rcv_nxt, out.copied_seq, out.recv_queue) == (1990, 1990, b"")
    assert out.rcv_wup == 1990
    assert out.rcv_wup + out.rcv_wnd == ici.rcv_wup + ici.rcv_wnd
    assert out.snd_wl1 == 1990                    # was 2000: not beyond the new rcv_nxt
    assert (out.snd_una, out.sent_queue, out.unsent_queue) == (ici.snd_una, ici.sent_queue, ici.unsent_queue)


def test_rewind_across_the_wrap():
    ici = CASES["v4_wrapping"]      # rcv_nxt 1, copied_seq 0xFFFFFFFD
    out = rewind_receive(ici, 0xFFFFFFFB)
    assert out.rcv_nxt == out.copied_seq == 0xFFFFFFFB
    assert (out.rcv_wup + out.rcv_wnd) & 0xFFFFFFFF == (ici.rcv_wup + ici.rcv_wnd) & 0xFFFFFFFF


def test_rewind_beyond_what_was_received_is_refused():
    with pytest.raises(ValueError, match="beyond"):
        rewind_receive(CASES["v4_full"], 2004)


def test_rewind_without_window_values():
    out = rewind_receive(CASES["v6_no_window"], 1)
    assert not out.has_window and out.rcv_nxt == 1


# --- the object file ------------------------------------------------------------------------

needs_clang = pytest.mark.skipif(shutil.which("clang") is None, reason="needs clang")


@needs_clang
def test_the_object_declares_the_maps_this_code_expects():
    prog = ackgate.program()
    assert prog.license == "GPL"
    assert {name for _, name in prog.relocs} == {ackgate.MAP_CONNS, ackgate.MAP_STATS}
    conns, stats = prog.maps[ackgate.MAP_CONNS], prog.maps[ackgate.MAP_STATS]
    assert (conns.key_size, conns.value_size) == (36, 8)
    assert (stats.key_size, stats.value_size) == (36, 56)
    patched = prog.patched({ackgate.MAP_CONNS: 7, ackgate.MAP_STATS: 9})
    for index, name in prog.relocs:
        insn = patched[index * 8:index * 8 + 8]
        assert insn[0] == 0x18 and insn[1] >> 4 == 1     # ld_imm64, BPF_PSEUDO_MAP_FD
        assert struct.unpack_from("<i", insn, 4)[0] == {ackgate.MAP_CONNS: 7, ackgate.MAP_STATS: 9}[name]


@needs_clang
def test_build_recompiles_only_when_the_source_is_newer(tmp_path):
    src = tmp_path / "g.bpf.c"
    src.write_text(ackgate.SOURCE.read_text())
    out = tmp_path / "g.bpf.o"
    ackgate.build(source=src, output=out)
    first = out.stat().st_mtime_ns
    ackgate.build(source=src, output=out)
    assert out.stat().st_mtime_ns == first


def test_build_failure_says_what_the_compiler_said(tmp_path):
    if shutil.which("clang") is None:
        pytest.skip("needs clang")
    src = tmp_path / "bad.bpf.c"
    src.write_text("this is not C\n")
    with pytest.raises(ackgate.GateError) as err:
        ackgate.build(source=src, output=tmp_path / "bad.o")
    assert err.value.errno == errno.EINVAL and "error" in str(err.value)


@pytest.mark.parametrize("data,match", [
    (b"not an elf", "not an ELF"),
    (b"\x7fELF" + b"\x01\x01" + b"\0" * 58, "ELF64"),
])
def test_object_reader_refuses_what_it_cannot_load(data, match):
    with pytest.raises(bpfobj.ObjectError, match=match):
        bpfobj.load(data, "tc")
