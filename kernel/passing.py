"""Passing many connections: the paper's ten steps, batched, with undo.

Origin side: ``export`` (isolate all in one nft transaction, enter repair mode, dump each),
then either ``finish`` (close silently, lift isolation) once the destination is active, or
``undo`` (leave repair mode, lift isolation) if it is not. Destination side: ``import_``
(validate and create every endpoint in repair mode) then ``activate_all``.

What crosses between hosts is ``pack(ici, app_state)``: bytes only, so the two sides can
be two processes, two hosts, or (in the demo) two namespaces of one process.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from dataclasses import dataclass, field

from . import repair
from .errors import ICIError, PassingError, TcpcpError
from .ici import ICI
from .isolate import Isolation, tuple_of
from .repair import Restored

# magic, flags (bit 0: peer_acked known), peer_acked, ICI length, application state length;
# then the ICI, the application state, and a CRC-32 of everything before it (the ICI has
# its own, but the header and the application state need one too: a flipped offset would
# otherwise resume the application silently wrong).
_RECORD = struct.Struct(">4sIIII")
_CRC = struct.Struct(">I")
_RECORD_MAGIC = b"TCPP"
_HAS_ACKED = 1


@dataclass(frozen=True)
class Record:
    """One connection as it travels from origin to destination."""

    ici: ICI
    app_state: bytes
    peer_acked: int | None = None  # the peer's rcv_nxt, learned by probing (kernel.probe)


def pack(ici: ICI, app_state: bytes, peer_acked: int | None = None) -> bytes:
    raw = ici.encode()
    flags = _HAS_ACKED if peer_acked is not None else 0
    head = _RECORD.pack(_RECORD_MAGIC, flags, peer_acked or 0, len(raw), len(app_state))
    crc = zlib.crc32(app_state, zlib.crc32(raw, zlib.crc32(head)))
    return b"".join((head, raw, app_state, _CRC.pack(crc)))


def unpack(blob: bytes) -> Record:
    """Inverse of ``pack``; any defect raises ICIError (``field`` "record" for the
    envelope, the ICI's own field names inside it), never restores."""
    if len(blob) < _RECORD.size + _CRC.size:
        raise ICIError("record", f"passing record truncated: {len(blob)} bytes")
    magic, flags, acked, ici_len, app_len = _RECORD.unpack_from(blob)
    if magic != _RECORD_MAGIC:
        raise ICIError("record", f"not a passing record: {magic!r}")
    if len(blob) != _RECORD.size + ici_len + app_len + _CRC.size:
        raise ICIError("record", f"length {len(blob)} disagrees with its header")
    view = memoryview(blob)
    ici = ICI.decode(view[_RECORD.size:_RECORD.size + ici_len])  # its own CRC: names the field
    (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    if crc != zlib.crc32(view[:-_CRC.size]):
        raise ICIError("record", "checksum mismatch: header or application state corrupted")
    if flags & ~_HAS_ACKED:
        raise ICIError("record", f"unknown flags 0x{flags:x}")
    app = bytes(view[_RECORD.size + ici_len:_RECORD.size + ici_len + app_len])
    return Record(ici, app, acked if flags & _HAS_ACKED else None)


@dataclass
class Exported:
    """Origin-side handle: the isolated socket in repair mode and what was dumped from it."""

    sock: socket.socket
    ici: ICI
    app_state: bytes


@dataclass
class Timings:
    dump_us: list[float] = field(default_factory=list)
    restore_us: list[float] = field(default_factory=list)
    activate_us: list[float] = field(default_factory=list)


def export(conns: list[tuple[socket.socket, bytes]], isolation: Isolation,
           timings: Timings | None = None, on_dump=None) -> list[Exported]:
    """Isolate and dump every connection. On any failure all of them are returned intact.

    ``on_dump(index, ici)`` runs right after each dump (the pass sends that peer its
    probe there, so answers come back while the next endpoints are dumped).
    """
    tuples = [_tuple(sock) for sock, _ in conns]
    isolation.isolate(tuples)
    done: list[Exported] = []
    try:
        for sock, state in conns:
            t0 = time.perf_counter()
            repair.repair_on(sock)
            try:
                ici = repair.dump(sock)
            except BaseException:
                repair.repair_off(sock, window_probe=True)
                raise
            if timings is not None:
                timings.dump_us.append((time.perf_counter() - t0) * 1e6)
            done.append(Exported(sock, ici, state))
            if on_dump is not None:
                on_dump(len(done) - 1, ici)
    except BaseException as exc:
        for item in done:
            _quietly(repair.repair_off, item.sock, True)
        isolation.release(tuples)
        if isinstance(exc, TcpcpError):
            raise PassingError(f"dump failed, {len(conns)} connections left intact: {exc}",
                               undone=True) from exc
        raise
    return done


def import_(records: list[bytes], *, freebind: bool = True,
            timings: Timings | None = None) -> list[tuple[Restored, bytes]]:
    """Create every endpoint in repair mode. All or nothing.

    Every record is decoded and validated before the first socket is made, so a bad
    record refuses the whole pass without touching the kernel; a kernel failure closes
    (silently) whatever was created.
    """
    decoded = [unpack(blob) for blob in records]
    made: list[tuple[Restored, bytes]] = []
    try:
        for rec in decoded:
            t0 = time.perf_counter()
            restored = repair.restore(rec.ici, freebind=freebind, peer_acked=rec.peer_acked,
                                      validated=True)
            if timings is not None:
                timings.restore_us.append((time.perf_counter() - t0) * 1e6)
            made.append((restored, rec.app_state))
    except BaseException:
        for restored, _ in made:
            repair.close_silently(restored.sock)
        raise
    return made


def activate_all(made: list[tuple[Restored, bytes]], timings: Timings | None = None) -> None:
    for restored, _ in made:
        t0 = time.perf_counter()
        repair.activate(restored)
        if timings is not None:
            timings.activate_us.append((time.perf_counter() - t0) * 1e6)


def finish(exported: list[Exported], isolation: Isolation) -> None:
    """The origin lets go: sockets closed in repair mode (no FIN, no RST), rules removed."""
    for item in exported:
        repair.close_silently(item.sock)
    isolation.release([tuple_of(item.ici) for item in exported])


def undo(exported: list[Exported], isolation: Isolation) -> None:
    """The pass failed after export: every origin connection resumes where it stopped."""
    for item in exported:
        _quietly(repair.repair_off, item.sock, True)
    isolation.release([tuple_of(item.ici) for item in exported])


def _tuple(sock: socket.socket):
    local, remote = sock.getsockname(), sock.getpeername()
    return (local[0].split("%")[0], local[1], remote[0].split("%")[0], remote[1])


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
