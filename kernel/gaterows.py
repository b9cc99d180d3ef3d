"""The ACK gate's table rows as plain data: keys, entries, counters (root-free).

The C structs they mirror are in kernel/ackgate.bpf.c; kernel/ackgate.py checks at load
time that the compiled object declares maps of exactly these sizes, so the two cannot
drift apart silently. Also here: the rewind of an ICI to the commit offset, the one
piece of the gate a resurrection needs.

::

    struct gate_key   { u8 laddr[16]; u8 raddr[16]; be16 lport, rport; }         36 bytes
    struct gate_conn  { u32 commit_seq; u8 rcv_wscale; u8 flags; u16 pad; }       8 bytes
    struct gate_stats { u64 clamped, sack_stripped, fin_rst_dropped, packets;
                        u32 snd_end, kernel_ack, right_edge, ts_val, ts_ecr, seen; } 56 bytes
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .ici import ICI, _seq_diff
from .tcpseg import RELEASED

KEY_SIZE = 36
CONN = struct.Struct("=IBBH")            # struct gate_conn
STATS = struct.Struct("=QQQQIIIIII")     # struct gate_stats
SEEN_ANY, SEEN_TS, SEEN_ACK = 0x1, 0x2, 0x4

Tuple4 = tuple[str, int, str, int]  # local address, local port, remote address, remote port


def _ip16(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def normalize(tup: Tuple4) -> Tuple4:
    """Addresses as the family the wire uses (an IPv4-mapped address becomes IPv4)."""
    laddr, lport, raddr, rport = tup
    out = []
    for a in (laddr, raddr):
        ip = ipaddress.ip_address(str(a).split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        out.append(str(ip))
    if ipaddress.ip_address(out[0]).version != ipaddress.ip_address(out[1]).version:
        raise ValueError(f"mixed address families in {fmt(tup)}")
    return (out[0], int(lport), out[1], int(rport))


def key_of(tup: Tuple4) -> bytes:
    """The 36-byte map key (struct gate_key): local and remote address as 16 bytes each
    (IPv4 mapped into ::ffff:0:0/96), local and remote port in network byte order."""
    laddr, lport, raddr, rport = tup
    for p in (lport, rport):
        if not 0 < int(p) < 65536:
            raise ValueError(f"port {p} out of range in {fmt(tup)}")
    return _ip16(laddr) + _ip16(raddr) + struct.pack("!HH", int(lport), int(rport))


def tuple_of(key: bytes) -> Tuple4:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a gate key is {KEY_SIZE} bytes, not {len(key)}")
    lport, rport = struct.unpack_from("!HH", key, 32)
    return normalize((str(ipaddress.IPv6Address(key[:16])), lport,
                      str(ipaddress.IPv6Address(key[16:32])), rport))


def fmt(tup) -> str:
    laddr, lport, raddr, rport = tup
    def one(a, p):
        return f"[{a}]:{p}" if ":" in str(a) else f"{a}:{p}"
    return f"{one(laddr, lport)} -> {one(raddr, rport)}"


@dataclass(frozen=True)
class Entry:
    """One connection's row in ackgate_conns."""

    tuple: Tuple4
    commit_seq: int
    rcv_wscale: int
    flags: int

    @property
    def released(self) -> bool:
        return bool(self.flags & RELEASED)


@dataclass(frozen=True)
class Stats:
    """One connection's row in ackgate_stats (struct gate_stats)."""

    clamped: int
    sack_stripped: int
    fin_rst_dropped: int
    packets: int
    snd_end: int
    kernel_ack: int
    right_edge: int
    ts_val: int
    ts_ecr: int
    seen: int

    @classmethod
    def decode(cls, raw: bytes) -> "Stats":
        return cls(*STATS.unpack_from(raw))


ZERO_STATS = bytes(STATS.size)


def rewind_receive(ici: ICI, commit_seq: int) -> ICI:
    """The ICI to resurrect from after a crash: the receive side at the commit offset.

    The application's state stops at ``commit_seq``; everything after it the peer still
    holds (the gate never acknowledged it) and will send again. So copied_seq = rcv_nxt =
    commit offset with an empty receive queue, and the receive window keeps the right
    edge the peer was shown (the gate widened every window to the kernel's right edge;
    shrinking it now would make the peer's in-flight data look out of window).
    """
    commit_seq &= 0xFFFFFFFF
    if _seq_diff(commit_seq, ici.rcv_nxt) > 0:
        raise ValueError(f"commit offset {commit_seq} is beyond what was received "
                         f"(rcv_nxt {ici.rcv_nxt})")
    changes = dict(rcv_nxt=commit_seq, copied_seq=commit_seq, recv_queue=b"")
    if ici.has_window:
        right = (ici.rcv_wup + ici.rcv_wnd) & 0xFFFFFFFF
        if _seq_diff(right, commit_seq) < 0:
            right = commit_seq
        wl1 = ici.snd_wl1 if _seq_diff(ici.snd_wl1, commit_seq) <= 0 else commit_seq
        changes.update(rcv_wup=commit_seq, rcv_wnd=(right - commit_seq) & 0xFFFFFFFF,
                       snd_wl1=wl1)
    return ici.replace(**changes).validate()
