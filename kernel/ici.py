"""The ICI (Internal Connection Information): plain data, root-free.

The paper's Section 4 (Table 1) lists what defines a TCP endpoint; this is that list as
today's kernel exposes it through TCP_REPAIR. An ``ICI`` is frozen data you can store,
compare and send between hosts; it holds no socket. ``kernel.repair`` produces and
consumes it, and nothing here touches the kernel, so encoding and validation are tested
without root.

Derivation of the sequence fields from kernel variables (see docs/ici.md)::

    snd_una ........ snd_nxt ........ write_seq        (send side, sequence space)
       |<-- sent_q -->|<-- unsent_q -->|
       sent_q   = snd_nxt  - snd_una   = SIOCOUTQ - SIOCOUTQNSD
       unsent_q = write_seq - snd_nxt  = SIOCOUTQNSD
       write_seq = TCP_QUEUE_SEQ (repair queue TCP_SEND_QUEUE)

    copied_seq ....... rcv_nxt                         (receive side)
       |<-- recv_q ---->|
       recv_q  = rcv_nxt - copied_seq = SIOCINQ
       rcv_nxt = TCP_QUEUE_SEQ (repair queue TCP_RECV_QUEUE)

Encoding (version 1): big-endian, fixed header then the three queues, CRC-32 trailer.
The header length is stored, so a newer version may append fixed fields and an older
record (shorter header) stays readable: missing fields take their documented defaults.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
import zlib
from dataclasses import dataclass
from typing import Union

from .errors import ICIError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAGIC = b"TCPI"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Presence flags for optional parts (libsoccr's SOCCR_FLAGS_WINDOW is the model: a part is
# flagged only when the kernel gave it, so older kernels degrade instead of failing).
F_WSCALE = 1 << 0      # window scaling negotiated; snd_wscale/rcv_wscale meaningful
F_SACK = 1 << 1        # SACK permitted
F_TIMESTAMP = 1 << 2   # timestamps negotiated; ts_val meaningful
F_WINDOW = 1 << 3      # TCP_REPAIR_WINDOW values present
F_ALL = F_WSCALE | F_SACK | F_TIMESTAMP | F_WINDOW

# From include/net/tcp_states.h: only established endpoints are passed in this version.
TCP_ESTABLISHED = 1
STATE_NAMES = {1: "ESTABLISHED", 8: "CLOSE_WAIT"}

TCP_MIN_MSS = 88         # include/net/tcp.h
TCP_MAX_WSCALE = 14      # RFC 7323, include/net/tcp.h
MAX_QUEUE = 1 << 30      # sanity bound on any queue in a record (1 GiB)

# magic, version, header length, flags, family, state, snd_wscale, rcv_wscale,
# mss_clamp, local_port, remote_port, local_addr, remote_addr,
# snd_una, snd_nxt, write_seq, rcv_nxt, copied_seq,
# snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup,
# ts_val, dump_time_ns, recv_len, sent_len, unsent_len
_HEADER_V1 = struct.Struct(">4sHHIBBBBHHH16s16s5I5IIQIII")
HEADER_SIZE = _HEADER_V1.size
_TRAILER = struct.Struct(">I")
OVERHEAD = HEADER_SIZE + _TRAILER.size


_WORDS = ("snd_una", "snd_nxt", "write_seq", "rcv_nxt", "copied_seq",
          "snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup", "ts_val")


def _seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit sequence space, as a signed number (RFC 1982 serial arithmetic)."""
    d = (a - b) & 0xFFFFFFFF
    return d - (1 << 32) if d >= (1 << 31) else d


@dataclass(frozen=True)
class ICI:
    """One TCP endpoint's state. Field names follow the kernel's ``struct tcp_sock``."""

    family: int                 # 4 or 6
    local_addr: IPAddress
    local_port: int
    remote_addr: IPAddress
    remote_port: int
    state: int = TCP_ESTABLISHED
    flags: int = 0
    mss_clamp: int = 1460
    snd_wscale: int = 0
    rcv_wscale: int = 0
    snd_una: int = 0
    snd_nxt: int = 0
    write_seq: int = 0
    rcv_nxt: int = 0
    copied_seq: int = 0
    snd_wl1: int = 0
    snd_wnd: int = 0
    max_window: int = 0
    rcv_wnd: int = 0
    rcv_wup: int = 0
    ts_val: int = 0             # TCP_TIMESTAMP value; bit 0 set = microsecond clock (6.7+)
    dump_time_ns: int = 0       # wall clock (CLOCK_REALTIME) at the dump
    recv_queue: bytes = b""     # received, not yet read by the application
    sent_queue: bytes = b""     # sent, not yet acknowledged by the peer
    unsent_queue: bytes = b""   # written by the application, never sent

    # -- convenient views -------------------------------------------------------
    @property
    def sack(self) -> bool:
        return bool(self.flags & F_SACK)

    @property
    def timestamps(self) -> bool:
        return bool(self.flags & F_TIMESTAMP)

    @property
    def wscale(self) -> bool:
        return bool(self.flags & F_WSCALE)

    @property
    def has_window(self) -> bool:
        return bool(self.flags & F_WINDOW)

    @property
    def usec_ts(self) -> bool:
        """The kernel (6.7+) marks a microsecond timestamp clock with bit 0 of ts_val."""
        return bool(self.ts_val & 1)

    @property
    def local(self) -> tuple[str, int]:
        return (str(self.local_addr), self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        return (str(self.remote_addr), self.remote_port)

    @property
    def send_queue(self) -> bytes:
        return self.sent_queue + self.unsent_queue

    def replace(self, **changes) -> "ICI":
        return dataclasses.replace(self, **changes)

    def size(self) -> int:
        """Bytes of ``encode()``, known without encoding (the paper's ``tcpcp_size``)."""
        return OVERHEAD + len(self.recv_queue) + len(self.sent_queue) + len(self.unsent_queue)

    # -- validation ----------------------------------------------------------------
    def validate(self) -> "ICI":
        """Check internal consistency; raise ICIError naming the first bad field.

        These are the checks the kernel would make half-way through a restore (and some it
        would not make at all), done before anything touches the kernel.
        """
        if self.family not in (4, 6):
            raise ICIError("family", f"must be 4 or 6, not {self.family}")
        want = ipaddress.IPv4Address if self.family == 4 else ipaddress.IPv6Address
        for name in ("local_addr", "remote_addr"):
            if not isinstance(getattr(self, name), want):
                raise ICIError(name, f"not an IPv{self.family} address: {getattr(self, name)!r}")
            if getattr(self, name).is_unspecified:
                raise ICIError(name, "unspecified address")
        for name in ("local_port", "remote_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ICIError(name, f"port {port} out of range 1..65535")
        if self.state != TCP_ESTABLISHED:
            raise ICIError("state", f"only ESTABLISHED (1) endpoints can be passed, not {self.state}")
        if self.flags & ~F_ALL:
            raise ICIError("flags", f"unknown flag bits 0x{self.flags & ~F_ALL:x}")
        if not TCP_MIN_MSS <= self.mss_clamp <= 65535:
            raise ICIError("mss_clamp", f"{self.mss_clamp} out of range {TCP_MIN_MSS}..65535")
        for name in ("snd_wscale", "rcv_wscale"):
            value = getattr(self, name)
            if not 0 <= value <= TCP_MAX_WSCALE:
                raise ICIError(name, f"window scale {value} above {TCP_MAX_WSCALE}")
            if value and not self.wscale:
                raise ICIError(name, "window scale set but window scaling not negotiated")
        words = (self.snd_una, self.snd_nxt, self.write_seq, self.rcv_nxt, self.copied_seq,
                 self.snd_wl1, self.snd_wnd, self.max_window, self.rcv_wnd, self.rcv_wup, self.ts_val)
        if not all(0 <= value <= 0xFFFFFFFF for value in words):  # fast path; name it below
            for name in _WORDS:
                value = getattr(self, name)
                if not 0 <= value <= 0xFFFFFFFF:
                    raise ICIError(name, f"{value} is not a 32-bit value")
        if not 0 <= self.dump_time_ns < 1 << 64:
            raise ICIError("dump_time_ns", "not a 64-bit value")
        if self.ts_val and not self.timestamps:
            raise ICIError("ts_val", "timestamp value set but timestamps not negotiated")
        if _seq_diff(self.snd_nxt, self.snd_una) < 0:
            raise ICIError("snd_una", "snd_una is beyond snd_nxt")
        if _seq_diff(self.write_seq, self.snd_nxt) < 0:
            raise ICIError("snd_nxt", "snd_nxt is beyond write_seq")
        if _seq_diff(self.rcv_nxt, self.copied_seq) < 0:
            raise ICIError("copied_seq", "copied_seq is beyond rcv_nxt")
        for name, data in (("recv_queue", self.recv_queue), ("sent_queue", self.sent_queue),
                           ("unsent_queue", self.unsent_queue)):
            if not isinstance(data, (bytes, bytearray)):
                raise ICIError(name, "not bytes")
            if len(data) > MAX_QUEUE:
                raise ICIError(name, f"{len(data)} bytes exceeds the {MAX_QUEUE}-byte bound")
        checks = (("recv_queue", len(self.recv_queue), self.rcv_nxt, self.copied_seq, "rcv_nxt - copied_seq"),
                  ("sent_queue", len(self.sent_queue), self.snd_nxt, self.snd_una, "snd_nxt - snd_una"),
                  ("unsent_queue", len(self.unsent_queue), self.write_seq, self.snd_nxt, "write_seq - snd_nxt"))
        for name, length, hi, lo, formula in checks:
            if length != (hi - lo) & 0xFFFFFFFF:
                raise ICIError(name, f"length {length} disagrees with {formula} = {(hi - lo) & 0xFFFFFFFF}")
        if self.has_window:
            # The same checks as tcp_repair_set_window() in net/ipv4/tcp.c.
            if self.max_window < self.snd_wnd:
                raise ICIError("max_window", "smaller than snd_wnd")
            if _seq_diff(self.snd_wl1, (self.rcv_nxt + self.rcv_wnd) & 0xFFFFFFFF) > 0:
                raise ICIError("snd_wl1", "beyond rcv_nxt + rcv_wnd")
            if _seq_diff(self.rcv_wup, self.rcv_nxt) > 0:
                raise ICIError("rcv_wup", "beyond rcv_nxt")
        elif any((self.snd_wl1, self.snd_wnd, self.max_window, self.rcv_wnd, self.rcv_wup)):
            raise ICIError("flags", "window values present but F_WINDOW not set")
        return self

    # -- encoding ----------------------------------------------------------------
    def encode(self) -> bytes:
        """Portable bytes: big-endian, fixed layout, independent of the CPU (the paper, 4)."""
        self.validate()
        header = _HEADER_V1.pack(
            MAGIC, VERSION, HEADER_SIZE, self.flags, self.family, self.state,
            self.snd_wscale, self.rcv_wscale, self.mss_clamp, self.local_port,
            self.remote_port, _addr16(self.local_addr), _addr16(self.remote_addr),
            self.snd_una, self.snd_nxt, self.write_seq, self.rcv_nxt, self.copied_seq,
            self.snd_wl1, self.snd_wnd, self.max_window, self.rcv_wnd, self.rcv_wup,
            self.ts_val, self.dump_time_ns, len(self.recv_queue), len(self.sent_queue),
            len(self.unsent_queue))
        parts = (header, self.recv_queue, self.sent_queue, self.unsent_queue)
        crc = 0
        for part in parts:  # one pass, one copy: queues can be megabytes under load
            crc = zlib.crc32(part, crc)
        return b"".join((*parts, _TRAILER.pack(crc)))

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = OVERHEAD + 3 * MAX_QUEUE) -> "ICI":
        """Parse and validate; any defect raises ICIError naming the field."""
        data = memoryview(data).cast("B")  # no copy: records can be megabytes
        if len(data) > max_size:
            raise ICIError("length", f"{len(data)} bytes exceeds the limit of {max_size}")
        if len(data) < 8:
            raise ICIError("length", f"truncated: {len(data)} bytes, need at least 8")
        magic, version, header_len = struct.unpack_from(">4sHH", data)
        if magic != MAGIC:
            raise ICIError("magic", f"{magic!r} is not {MAGIC!r}")
        if version not in SUPPORTED_VERSIONS:
            raise ICIError("version", f"unknown version {version}; this code reads {SUPPORTED_VERSIONS}")
        if header_len < HEADER_SIZE:
            raise ICIError("header_len", f"{header_len} shorter than version {version}'s {HEADER_SIZE}")
        if len(data) < header_len + _TRAILER.size:
            raise ICIError("length", f"truncated: {len(data)} bytes, header alone needs {header_len + 4}")
        (_, _, _, flags, family, state, snd_ws, rcv_ws, mss, lport, rport, laddr, raddr,
         snd_una, snd_nxt, write_seq, rcv_nxt, copied_seq,
         snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup,
         ts_val, dump_ns, recv_len, sent_len, unsent_len) = _HEADER_V1.unpack_from(data)
        total = header_len + recv_len + sent_len + unsent_len + _TRAILER.size
        if len(data) < total:
            raise ICIError("length", f"truncated: {len(data)} bytes, record needs {total}")
        if len(data) > total:
            raise ICIError("length", f"{len(data) - total} trailing bytes after the record")
        (crc,) = _TRAILER.unpack_from(data, total - _TRAILER.size)
        if crc != zlib.crc32(memoryview(data)[:total - _TRAILER.size]):
            raise ICIError("crc", "checksum mismatch: the record is corrupted")
        if family not in (4, 6):
            raise ICIError("family", f"must be 4 or 6, not {family}")
        pos = header_len
        queues = []
        for length in (recv_len, sent_len, unsent_len):
            queues.append(bytes(data[pos:pos + length]))
            pos += length
        return cls(
            family=family, local_addr=_addr(family, laddr, "local_addr"), local_port=lport,
            remote_addr=_addr(family, raddr, "remote_addr"), remote_port=rport, state=state,
            flags=flags, mss_clamp=mss, snd_wscale=snd_ws, rcv_wscale=rcv_ws,
            snd_una=snd_una, snd_nxt=snd_nxt, write_seq=write_seq, rcv_nxt=rcv_nxt,
            copied_seq=copied_seq, snd_wl1=snd_wl1, snd_wnd=snd_wnd, max_window=max_window,
            rcv_wnd=rcv_wnd, rcv_wup=rcv_wup, ts_val=ts_val, dump_time_ns=dump_ns,
            recv_queue=queues[0], sent_queue=queues[1], unsent_queue=queues[2],
        ).validate()


def size(recv_len: int, sent_len: int, unsent_len: int) -> int:
    """Encoded size of an ICI with these queue lengths (``tcpcp_size`` before a dump)."""
    return OVERHEAD + recv_len + sent_len + unsent_len


def _addr16(addr: IPAddress) -> bytes:
    packed = addr.packed
    return packed + b"\0" * (16 - len(packed))


def _addr(family: int, raw: bytes, field: str) -> IPAddress:
    if family == 4:
        if any(raw[4:]):
            raise ICIError(field, "IPv4 address with non-zero padding")
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)
