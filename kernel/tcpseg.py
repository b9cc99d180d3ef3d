"""TCP segments as bytes: build, parse, checksum, and the ACK gate's rules as plain Python.

Pure (no sockets, no root). The agent uses :func:`build` for the pure ACK it sends after
a commit; the tests use :func:`parse` and :func:`checksum_ok` on what they capture, and
:func:`gate` (the reference model of kernel/ackgate.bpf.c) to say byte for byte what the
program must have made of a segment.

Checksums on a capture: a segment handed across a veth with checksum offload still
carries CHECKSUM_PARTIAL (AF_PACKET reports TP_STATUS_CSUMNOTREADY): its check field
holds the folded pseudo-header sum, not the full checksum. :func:`checksum_ok` takes that
into account, so a wrong in-place "fix" of a partial checksum is caught too.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TCPOPT_EOL, TCPOPT_NOP, TCPOPT_MSS, TCPOPT_WINDOW = 0, 1, 2, 3
TCPOPT_SACK_PERM, TCPOPT_SACK, TCPOPT_TIMESTAMP = 4, 5, 8
IPPROTO_TCP = 6
GUARDED, RELEASED, KEEP_SACK = 0x1, 0x2, 0x4  # gate_conn.flags in kernel/ackgate.bpf.c
MAX_WSCALE = 14


def seq_after(a: int, b: int) -> bool:
    """a is after b in 32-bit sequence space (RFC 1982 serial comparison)."""
    return 0 < ((a - b) & 0xFFFFFFFF) < (1 << 31)


def ones_sum(data: bytes, start: int = 0) -> int:
    """16-bit ones'-complement sum, folded (not inverted)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    """Sum of the TCP pseudo-header (RFC 793 for IPv4, RFC 8200 8.1 for IPv6)."""
    if len(src) == 4:
        return ones_sum(src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, length))
    return ones_sum(src + dst + struct.pack("!I3xB", length, IPPROTO_TCP))


def tcp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """The check field for ``segment`` (whose own check field is ignored)."""
    body = segment[:16] + b"\0\0" + segment[18:]
    return ~ones_sum(body, pseudo_sum(src, dst, len(segment))) & 0xFFFF


def _same(a: int, b: int) -> bool:
    return a == b or {a, b} == {0, 0xFFFF}  # +0 and -0 in ones' complement


@dataclass(frozen=True)
class Segment:
    """One captured or built IP packet carrying TCP."""

    family: int
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    check: int
    header: bytes      # the TCP header with options
    payload: bytes
    ip_src: bytes
    ip_dst: bytes

    @property
    def options(self) -> bytes:
        return self.header[20:]

    @property
    def segment(self) -> bytes:
        return self.header + self.payload

    def checksum_ok(self, partial: bool = False) -> bool:
        return checksum_ok(self.ip_src, self.ip_dst, self.segment, partial)

    def sack_blocks(self) -> list[tuple[int, int]]:
        return sack_blocks(self.options)


def checksum_ok(src: bytes, dst: bytes, segment: bytes, partial: bool = False) -> bool:
    """Is the check field right? ``partial``: the segment is still CHECKSUM_PARTIAL, so the
    field must hold exactly the folded pseudo-header sum."""
    check = struct.unpack_from("!H", segment, 16)[0]
    if partial:
        return _same(check, pseudo_sum(src, dst, len(segment)))
    return _same(ones_sum(segment, pseudo_sum(src, dst, len(segment))), 0xFFFF)


def parse(packet: bytes) -> Segment | None:
    """An IPv4 or IPv6 packet (no link header) carrying TCP, or None."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0] or len(packet)
        if packet[9] != IPPROTO_TCP or len(packet) < ihl + 20:
            return None
        src, dst, l4, end, family = packet[12:16], packet[16:20], ihl, min(total, len(packet)), 4
    elif version == 6 and len(packet) >= 60:
        if packet[6] != IPPROTO_TCP:
            return None
        plen = struct.unpack_from("!H", packet, 4)[0] or len(packet) - 40
        src, dst, l4, end, family = packet[8:24], packet[24:40], 40, min(40 + plen, len(packet)), 6
    else:
        return None
    tcp = packet[l4:end]
    sport, dport, seq, ack, off_flags, window, check = struct.unpack_from("!HHIIHHH", tcp)
    hlen = (off_flags >> 12) * 4
    if hlen < 20 or hlen > len(tcp):
        hlen = 20
    return Segment(family, str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)),
                   sport, dport, seq, ack, off_flags & 0x3F, window, check, bytes(tcp[:hlen]),
                   bytes(tcp[hlen:]), bytes(src), bytes(dst))


def walk_options(opts: bytes) -> tuple[list[tuple[int, int, int]], bool]:
    """(kind, offset, length) of each option, and whether the list ended cleanly.

    The rules are the program's: EOL ends the list (clean); NOP is one byte; any other
    option needs a length byte inside the header, a length of at least 2 (and at most 40)
    that stays inside the header. Anything else ends the walk as malformed.
    """
    out, i = [], 0
    while i < len(opts):
        kind = opts[i]
        if kind == TCPOPT_EOL:
            return out, True
        if kind == TCPOPT_NOP:
            out.append((kind, i, 1))
            i += 1
            continue
        if i + 1 >= len(opts):
            return out, False
        length = opts[i + 1]
        if length < 2 or length > 40 or i + length > len(opts):
            return out, False
        out.append((kind, i, length))
        i += length
    return out, True


def sack_blocks(opts: bytes) -> list[tuple[int, int]]:
    """Every (left, right) edge pair of every well-formed SACK option."""
    blocks = []
    for kind, at, length in walk_options(opts)[0]:
        if kind == TCPOPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            for b in range((length - 2) // 8):
                blocks.append(struct.unpack_from("!II", opts, at + 2 + 8 * b))
    return blocks


def timestamps(opts: bytes) -> tuple[int, int] | None:
    for kind, at, length in walk_options(opts)[0]:
        if kind == TCPOPT_TIMESTAMP and length == 10:
            return struct.unpack_from("!II", opts, at + 2)
    return None


def widened_window(right_edge: int, commit: int, wscale: int) -> int:
    """The window field that puts the right edge back where the kernel had it, once the
    ACK is clamped to ``commit``: ceil((right_edge - commit) / 2^wscale), at most 65535.
    Zero when the right edge is not after the commit offset."""
    span = (right_edge - commit) & 0xFFFFFFFF
    if span == 0 or span >= 1 << 31:
        return 0
    ws = min(wscale, MAX_WSCALE)
    return min((span + (1 << ws) - 1) >> ws, 0xFFFF)


def gate(header: bytes, segment_len: int, commit: int, wscale: int, flags: int
         ) -> tuple[bool, bytes]:
    """What the program does to one TCP header of a connection with this map entry:
    (passed, header after). ``segment_len`` is the TCP length (header + payload).

    The checksum field is left as it was: the caller checks it separately (it depends on
    the addresses and, under offload, on CHECKSUM_PARTIAL).
    """
    if not flags & GUARDED:
        return True, header
    if len(header) < 20:
        return True, header
    hlen = (header[12] >> 4) * 4
    if hlen < 20 or hlen > 60 or hlen > segment_len or hlen > len(header):
        return True, header
    tflags = header[13]
    if tflags & (TH_FIN | TH_RST) and not flags & RELEASED:
        return False, header
    if not tflags & TH_ACK or tflags & TH_SYN:
        return True, header
    out = bytearray(header[:hlen])
    ack, win = struct.unpack_from("!I", out, 8)[0], struct.unpack_from("!H", out, 14)[0]
    ws = min(wscale, MAX_WSCALE)
    if seq_after(ack, commit):
        right = (ack + (win << ws)) & 0xFFFFFFFF
        struct.pack_into("!I", out, 8, commit)
        struct.pack_into("!H", out, 14, widened_window(right, commit, ws))
    base = 20
    for kind, at, length in walk_options(bytes(out[20:hlen]))[0]:
        if kind == TCPOPT_SACK and not flags & KEEP_SACK:
            _strip_sack(out, base + at, length, commit)
    return True, bytes(out) + header[hlen:]


def _strip_sack(out: bytearray, at: int, length: int, commit: int) -> None:
    if length < 10 or length > 34 or (length - 2) % 8:
        out[at:at + length] = b"\x01" * length
        return
    blocks = [struct.unpack_from("!II", out, at + 2 + 8 * b) for b in range((length - 2) // 8)]
    kept = [b for b in blocks if not seq_after(b[1], commit)]
    if len(kept) == len(blocks):
        return
    new = b"".join(struct.pack("!II", *b) for b in kept)
    new = (bytes([TCPOPT_SACK, 2 + len(new)]) + new) if kept else b""
    out[at:at + length] = new.ljust(length, b"\x01")


def build(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, *,
          flags: int = TH_ACK, window: int = 0, options: bytes = b"", payload: bytes = b"",
          ttl: int = 64, check: int | None = None, doff: int | None = None) -> bytes:
    """An IP packet (IPv4 or IPv6 by the addresses) carrying one TCP segment, checksums
    filled in. ``check``/``doff`` override the computed values (for malformed tests)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"mixed families: {src} -> {dst}")
    if len(options) % 4 or len(options) > 40:
        raise ValueError("options must be whole 32-bit words, at most 40 bytes")
    hlen = 20 + len(options)
    off = doff if doff is not None else hlen // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      off << 4, flags, window, 0, 0) + options + payload
    csum = tcp_checksum(s.packed, d.packed, tcp) if check is None else check
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, ttl,
                         IPPROTO_TCP, 0, s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", ~ones_sum(ip) & 0xFFFF) + ip[12:]
        return ip + tcp
    return struct.pack("!IHBB16s16s", 6 << 28, len(tcp), IPPROTO_TCP, ttl,
                       s.packed, d.packed) + tcp


def timestamp_option(ts_val: int, ts_ecr: int) -> bytes:
    """NOP, NOP, TS: the layout Linux uses, 12 bytes."""
    return struct.pack("!BBBBII", TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10,
                       ts_val & 0xFFFFFFFF, ts_ecr & 0xFFFFFFFF)
