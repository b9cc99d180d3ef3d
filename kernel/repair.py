"""Dump and restore an endpoint through TCP_REPAIR: the thin, ordered syscall layer.

The order is the contract (docs/repair-order.md has it with the reasons). Every syscall
failure raises KernelError naming the step, so a failed restore says where it stopped.

Dump (socket already in repair mode, see ``repair_on``)::

    TCP_INFO                 state, negotiated options, both window scales
    TCP_MAXSEG               mss_clamp (repair mode returns rx_opt.mss_clamp)
    TCP_TIMESTAMP            ts_val (bit 0: microsecond clock), wall clock beside it
    SIOCINQ SIOCOUTQ SIOCOUTQNSD                     queue lengths, before
    TCP_REPAIR_QUEUE=SEND  TCP_QUEUE_SEQ  recv(PEEK)  write_seq, send queue bytes
    TCP_REPAIR_QUEUE=RECV  TCP_QUEUE_SEQ  recv(PEEK)  rcv_nxt, receive queue bytes
    SIOCINQ SIOCOUTQ SIOCOUTQNSD                     again: equal, or dump again
    TCP_REPAIR_WINDOW        snd_wl1 snd_wnd max_window rcv_wnd rcv_wup (after the peeks)

Restore (new socket)::

    TCP_REPAIR=1
    TCP_REPAIR_QUEUE=SEND TCP_QUEUE_SEQ=snd_una     (advanced by writing the sent queue)
    TCP_REPAIR_QUEUE=RECV TCP_QUEUE_SEQ=copied_seq  (advanced by writing the recv queue)
    IP_FREEBIND + IP_TRANSPARENT (if asked), buffers, bind(local)  (no SO_REUSEADDR: it would undo the
                                                  SK_FORCE_REUSE that repair mode sets)
    TCP_MAXSEG=mss_clamp                            before connect, or MSS starts at 524
    connect(remote)                                 no SYN in repair mode: ESTABLISHED
    TCP_REPAIR_OPTIONS  MSS, WINDOW(snd|rcv<<16), SACK_PERM, TIMESTAMP
    TCP_TIMESTAMP=ts_val advanced by elapsed wall clock + skew, bit 0 kept
    TCP_REPAIR_QUEUE=RECV send(recv_queue)          chunked, halving on ENOMEM
    TCP_REPAIR_QUEUE=SEND send(sent bytes)          count as already sent
    TCP_REPAIR_WINDOW                               after rcv_nxt is final (kernel checks it)
    -- activate --
    TCP_REPAIR=OFF (window probe) or OFF_NO_WP
    send(not-yet-sent bytes) as ordinary data       they leave at once
"""

from __future__ import annotations

import errno
import fcntl
import functools
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

from . import constants as C
from .errors import ICIError, InconsistentSnapshot, KernelError, PrivilegeError
from .ici import F_SACK, F_TIMESTAMP, F_WINDOW, F_WSCALE, ICI, _seq_diff

_WINDOW = struct.Struct("=5I")  # struct tcp_repair_window (host byte order)
_REPAIR_OPT = struct.Struct("=II")  # struct tcp_repair_opt { __u32 opt_code; __u32 opt_val; }
_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")

DEFAULT_TS_SKEW_NS = 5_000_000  # a restored clock runs at least this far ahead (PAWS)


def _fail(step: str, exc: OSError) -> KernelError:
    err = exc.errno or errno.EIO
    cls = PrivilegeError if err == errno.EPERM and step.startswith("TCP_REPAIR") else KernelError
    return cls(step, err)


def _setint(sock: socket.socket, level: int, opt: int, value: int, step: str) -> None:
    try:
        sock.setsockopt(level, opt, value)
    except OSError as exc:
        raise _fail(step, exc) from None


def _getint(sock: socket.socket, opt: int, step: str, unsigned: bool = False) -> int:
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, opt, 4)
    except OSError as exc:
        raise _fail(step, exc) from None
    return (_UINT if unsigned else _INT).unpack(raw)[0]


def _ioctl(sock: socket.socket, request: int, step: str) -> int:
    try:
        return _INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    except OSError as exc:
        raise _fail(step, exc) from None


def repair_on(sock: socket.socket) -> None:
    """Enter repair mode: the socket's send/recv now serve the dump, not the application."""
    _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR, C.TCP_REPAIR_ON, "TCP_REPAIR on")


def repair_off(sock: socket.socket, window_probe: bool = True) -> None:
    """Leave repair mode. The window probe makes the peer answer at once with its ACK."""
    value = C.TCP_REPAIR_OFF if window_probe else C.TCP_REPAIR_OFF_NO_WP
    _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR, value, "TCP_REPAIR off")


def _queue_lengths(sock: socket.socket) -> tuple[int, int, int]:
    return (_ioctl(sock, C.SIOCINQ, "SIOCINQ"), _ioctl(sock, C.SIOCOUTQ, "SIOCOUTQ"),
            _ioctl(sock, C.SIOCOUTQNSD, "SIOCOUTQNSD"))


def _queue_seq(sock: socket.socket, queue: int, name: str) -> int:
    _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR_QUEUE, queue, f"TCP_REPAIR_QUEUE {name}")
    return _getint(sock, C.TCP_QUEUE_SEQ, f"TCP_QUEUE_SEQ {name}", unsigned=True)


def _peek(sock: socket.socket, length: int, name: str) -> bytes:
    """Copy a queue without consuming it; the caller has selected the queue."""
    if length == 0:
        return b""
    try:
        return sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    except OSError as exc:
        raise _fail(f"peek {name} queue", exc) from None


@functools.lru_cache(maxsize=4096)
def _ip(text: str):
    """Parsed address, cached: a pass of a thousand connections repeats a few addresses."""
    return ipaddress.ip_address(text.split("%")[0])


def _addresses(sock: socket.socket):
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError as exc:
        raise _fail("getpeername", exc) from None
    family = 6 if sock.family == socket.AF_INET6 else 4
    return family, _ip(local[0]), local[1], _ip(remote[0]), remote[1]


def dump(sock: socket.socket, *, attempts: int = 8, clock=time.time_ns) -> ICI:
    """Snapshot a socket that is in repair mode into an ICI.

    Queues move under a live socket (ACKs shrink the send queue, data grows the receive
    queue even in repair mode), so lengths and sequence numbers are read before and after
    the peeks and the dump is repeated until both readings agree.
    """
    family, laddr, lport, raddr, rport = _addresses(sock)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, C.TCP_INFO, 8)
    except OSError as exc:
        raise _fail("TCP_INFO", exc) from None
    state, options, wscale = info[0], info[5], info[6]
    flags = 0
    if options & C.TCPI_OPT_WSCALE:
        flags |= F_WSCALE
    if options & C.TCPI_OPT_SACK:
        flags |= F_SACK
    if options & C.TCPI_OPT_TIMESTAMPS:
        flags |= F_TIMESTAMP
    mss = _getint(sock, C.TCP_MAXSEG, "TCP_MAXSEG")
    for _ in range(attempts):
        ts_val = _getint(sock, C.TCP_TIMESTAMP, "TCP_TIMESTAMP get", unsigned=True) \
            if flags & F_TIMESTAMP else 0
        now = clock()
        before = _queue_lengths(sock)
        write_seq = _queue_seq(sock, C.TCP_SEND_QUEUE, "send")
        send_q = _peek(sock, before[1], "send")
        rcv_nxt = _queue_seq(sock, C.TCP_RECV_QUEUE, "recv")
        recv_q = _peek(sock, before[0], "recv")
        # The window after the peeks: a MSG_PEEK of the receive queue can itself send a
        # window update (tcp_cleanup_rbuf), moving rcv_wup and rcv_wnd. Read here, the
        # restored right edge is never left of one the peer may have seen; and it is
        # still inside the before/after check.
        window = _window(sock)
        after = _queue_lengths(sock)
        inq, outq, unsent = before
        # In repair mode the application can neither read nor write, so write_seq and
        # copied_seq are fixed; rcv_nxt, snd_una and snd_nxt move only with the lengths.
        if before == after and len(send_q) == outq and len(recv_q) == inq:
            break
    else:
        raise InconsistentSnapshot(f"queues kept moving during {attempts} dump attempts")
    if window is not None:
        flags |= F_WINDOW
    else:
        window = (0, 0, 0, 0, 0)
    snd_nxt = (write_seq - unsent) & 0xFFFFFFFF
    snd_una = (write_seq - outq) & 0xFFFFFFFF
    snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = window
    return ICI(
        family=family, local_addr=laddr, local_port=lport, remote_addr=raddr, remote_port=rport,
        state=state, flags=flags, mss_clamp=mss,
        snd_wscale=(wscale & 0x0F) if flags & F_WSCALE else 0,
        rcv_wscale=(wscale >> 4) if flags & F_WSCALE else 0,
        snd_una=snd_una, snd_nxt=snd_nxt, write_seq=write_seq,
        rcv_nxt=rcv_nxt, copied_seq=(rcv_nxt - inq) & 0xFFFFFFFF,
        snd_wl1=snd_wl1, snd_wnd=snd_wnd, max_window=max_window, rcv_wnd=rcv_wnd, rcv_wup=rcv_wup,
        ts_val=ts_val, dump_time_ns=now,
        recv_queue=recv_q, sent_queue=send_q[:outq - unsent], unsent_queue=send_q[outq - unsent:],
    )


def _window(sock: socket.socket):
    """TCP_REPAIR_WINDOW, or None on kernels before 4.8 (the restore then skips it)."""
    try:
        return _WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, C.TCP_REPAIR_WINDOW, _WINDOW.size))
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return None
        raise _fail("TCP_REPAIR_WINDOW get", exc) from None


def advanced_timestamp(ts_val: int, elapsed_ns: int) -> int:
    """The TCP_TIMESTAMP value to restore after ``elapsed_ns`` of wall clock.

    The peer drops segments whose timestamp is older than the newest it saw (PAWS), so the
    destination's clock must run at least as far as the origin's could have. Bit 0 selects
    the microsecond clock on 6.7+ kernels and is kept as dumped.
    """
    elapsed_ns = max(0, elapsed_ns)
    step = elapsed_ns // 1000 if ts_val & 1 else elapsed_ns // 1_000_000
    value = ts_val + step
    if (value ^ ts_val) & 1:  # round up, never down, to keep the dumped bit 0
        value += 1
    return value & 0xFFFFFFFF


@dataclass
class Restored:
    """A socket rebuilt in repair mode, plus the bytes to write once it is activated."""

    sock: socket.socket
    ici: ICI
    pending: bytes  # never-sent (or, with peer_acked, not-yet-acknowledged) bytes


def _send_queue(sock: socket.socket, queue: int, data: bytes, name: str) -> None:
    """Write a queue in repair mode, in chunks that halve on ENOMEM (as libsoccr does)."""
    _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR_QUEUE, queue, f"TCP_REPAIR_QUEUE {name}")
    view = memoryview(data)
    chunk = max(1, min(len(view), 1 << 20))
    while view:
        try:
            sent = sock.send(view[:chunk])
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN) and chunk > 1:
                chunk //= 2
                continue
            raise _fail(f"write {name} queue", exc) from None
        view = view[sent:]


def restore(ici: ICI, *, sock: socket.socket | None = None, port: int | None = None,
            freebind: bool = False, peer_acked: int | None = None, now_ns: int | None = None,
            ts_skew_ns: int = DEFAULT_TS_SKEW_NS, validated: bool = False) -> Restored:
    """Rebuild ``ici`` as a socket in repair mode (not yet active: it sends nothing).

    ``sock``: an already-bound socket to use (the paper's second port choice); otherwise a
    new one is bound to ``port`` (``None``: the ICI's port; ``0``: any free port).
    ``peer_acked``: the peer's acknowledged position, when learned; bytes from there on are
    then written as ordinary data after activation, so they leave at once instead of
    waiting for a retransmission timer that has no RTT history.
    """
    if not validated:  # ICI.decode() has just validated what it returns
        ici.validate()
    family = socket.AF_INET6 if ici.family == 6 else socket.AF_INET
    sent_q, una = ici.sent_queue, ici.snd_una
    if peer_acked is not None:
        ahead = _seq_diff(peer_acked, ici.snd_una)
        if ahead < 0 or _seq_diff(ici.snd_nxt, peer_acked) < 0:
            raise ICIError("peer_acked", f"{peer_acked} outside snd_una..snd_nxt "
                           f"({ici.snd_una}..{ici.snd_nxt})")
        sent_q, una = b"", peer_acked
        pending = ici.send_queue[ahead:]
    else:
        pending = ici.unsent_queue
    own = sock is None
    if own:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise _fail("socket", exc) from None
    try:
        _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR, C.TCP_REPAIR_ON, "TCP_REPAIR on")
        _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR_QUEUE, C.TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE send")
        _setint(sock, socket.IPPROTO_TCP, C.TCP_QUEUE_SEQ, _signed(una), "TCP_QUEUE_SEQ send")
        _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR_QUEUE, C.TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE recv")
        _setint(sock, socket.IPPROTO_TCP, C.TCP_QUEUE_SEQ, _signed(ici.copied_seq), "TCP_QUEUE_SEQ recv")
        if own:
            if freebind:
                # FREEBIND lets bind() take the address; connect() still needs a route from
                # a non-local source, which only TRANSPARENT (FLOWI_FLAG_ANYSRC) gives.
                if ici.family == 6:
                    _setint(sock, socket.IPPROTO_IPV6, C.IPV6_FREEBIND, 1, "IPV6_FREEBIND")
                    _setint(sock, socket.IPPROTO_IPV6, C.IPV6_TRANSPARENT, 1, "IPV6_TRANSPARENT")
                else:
                    _setint(sock, socket.IPPROTO_IP, C.IP_FREEBIND, 1, "IP_FREEBIND")
                    _setint(sock, socket.IPPROTO_IP, C.IP_TRANSPARENT, 1, "IP_TRANSPARENT")
            _size_buffers(sock, ici, len(pending))
            bind_port = ici.local_port if port is None else port
            try:
                sock.bind((str(ici.local_addr), bind_port))
            except OSError as exc:
                raise _fail("bind", exc) from None
        # user_mss is capped at MAX_TCP_WINDOW (32767); TCP_REPAIR_OPTIONS below sets the full clamp.
        _setint(sock, socket.IPPROTO_TCP, C.TCP_MAXSEG, min(ici.mss_clamp, 32767), "TCP_MAXSEG")
        try:
            sock.connect((str(ici.remote_addr), ici.remote_port))
        except OSError as exc:
            raise _fail("connect", exc) from None
        opts = [(C.TCPOPT_MAXSEG, ici.mss_clamp)]
        if ici.wscale:
            opts.append((C.TCPOPT_WINDOW, ici.snd_wscale | (ici.rcv_wscale << 16)))
        if ici.sack:
            opts.append((C.TCPOPT_SACK_PERM, 0))
        if ici.timestamps:
            opts.append((C.TCPOPT_TIMESTAMP, 0))
        _setbytes(sock, C.TCP_REPAIR_OPTIONS, b"".join(_REPAIR_OPT.pack(*o) for o in opts),
                  "TCP_REPAIR_OPTIONS")
        if ici.timestamps:
            now = time.time_ns() if now_ns is None else now_ns
            ts = advanced_timestamp(ici.ts_val, now - ici.dump_time_ns + ts_skew_ns)
            _setbytes(sock, C.TCP_TIMESTAMP, _UINT.pack(ts), "TCP_TIMESTAMP set")
        if ici.recv_queue:
            _send_queue(sock, C.TCP_RECV_QUEUE, ici.recv_queue, "recv")
        if sent_q:
            _send_queue(sock, C.TCP_SEND_QUEUE, sent_q, "send")
        if ici.has_window:
            snd_wl1 = ici.snd_wl1
            _setbytes(sock, C.TCP_REPAIR_WINDOW, _WINDOW.pack(
                snd_wl1, ici.snd_wnd, ici.max_window, ici.rcv_wnd, ici.rcv_wup), "TCP_REPAIR_WINDOW set")
        _setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR_QUEUE, C.TCP_NO_QUEUE, "TCP_REPAIR_QUEUE none")
    except BaseException:
        if own:
            _close_silently(sock)
        raise
    return Restored(sock=sock, ici=ici, pending=pending)


def activate(restored: Restored, *, window_probe: bool = True, timeout: float = 5.0) -> None:
    """Bring a restored endpoint to life, then hand it the bytes it still has to send."""
    repair_off(restored.sock, window_probe)
    if restored.pending:
        old = restored.sock.gettimeout()
        restored.sock.settimeout(timeout)
        try:
            restored.sock.sendall(restored.pending)
        except OSError as exc:
            raise _fail("write pending send queue", exc) from None
        finally:
            restored.sock.settimeout(old)
        restored.pending = b""


def close_silently(sock: socket.socket) -> None:
    """Close an endpoint without FIN or RST: in repair mode tcp_close() sends nothing."""
    _close_silently(sock)


def _close_silently(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, C.TCP_REPAIR, C.TCP_REPAIR_ON)
    except OSError:
        pass
    sock.close()


def _setbytes(sock: socket.socket, opt: int, value: bytes, step: str) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError as exc:
        raise _fail(step, exc) from None


def _signed(value: int) -> int:
    """setsockopt(int) takes a C int; sequence numbers above 2^31 go in as negatives."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _size_buffers(sock: socket.socket, ici: ICI, pending: int) -> None:
    """Make the buffers hold the restored queues, or the repair-mode writes fail with ENOMEM."""
    need_snd = 2 * (len(ici.sent_queue) + pending)
    need_rcv = 2 * len(ici.recv_queue)
    for opt, force, need in ((socket.SO_SNDBUF, C.SO_SNDBUFFORCE, need_snd),
                             (socket.SO_RCVBUF, C.SO_RCVBUFFORCE, need_rcv)):
        if need and sock.getsockopt(socket.SOL_SOCKET, opt) < need:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, need)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, need)
