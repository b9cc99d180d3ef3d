"""The local protocol between an application and its host's checkpointd agent.

The application never needs CAP_NET_ADMIN: it hands each connection's socket to the
agent (SCM_RIGHTS), and the agent, which holds the privilege, dumps the endpoint once
while the application waits (``register``), guards it with the ACK gate, and writes the
application's commits to etcd. On the standby, the agent hands resurrected sockets back
to the application the same way (``resume``).

Transport: a Unix SOCK_SEQPACKET socket (message boundaries and file descriptors come
for free). One message = one packet::

    u32 header length (big-endian) | JSON header (UTF-8) | payload (application state)

plus at most one file descriptor as ancillary data. Headers are small JSON objects with an
``op`` and the fields listed in ``OPS``; the payload is the application's state, opaque
to the agent. Stream offsets are byte counts from the start of each direction.

Application -> agent:
  serve     port                                  (once per listening port, on connect:
                                                   resurrected connections of that local
                                                   port are handed to this application)
  register  conn, input, output, read, write   + fd + state  -> registered | error
  commit    conn, seq, input, output, read, write, unacked_len
            + state, followed by the unacknowledged output bytes (the last ``unacked_len``
            bytes of the payload) when the output is not regenerable  -> durable (async)
  release   conn                                               -> released
Agent -> application:
  registered conn | durable conn, seq | released conn | error conn, reason
  resume    conn, input, output, discard, unacked_len  + fd + state, followed by the
            output the library keeps as unacknowledged (logged mode)  (on the new primary)
Switchover by passing (checkpointd/switchover.py), agent -> application:
  freeze                 every connection of this channel: stop at the next point where
                         the last commit reflects everything read (and, for logged
                         output, written), and say so                  -> frozen (each)
  passed    conn, reason the connection now lives elsewhere (the socket is a silent,
                         dead endpoint: close it, do not release it)
  thaw                   the freeze is over: connections not passed continue
Application -> agent:
  frozen    conn, input, output, read, write, regenerable  + state (the last commit's)
  frozen_many  count  + ``encode_frozen_many``: every connection the library could stop
               at once, in one message (a thousand reports would each wait for the GIL)

``input`` is the commit offset I (input consumed and reflected in the state), ``output``
the output offset O the state resumes its output at, ``read``/``write`` the bytes read
from and written into the socket so far (R, W). See checkpointd/offsets.py.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from dataclasses import dataclass, field

from kernel.errors import TcpcpError

MAX_MESSAGE = 16 << 20  # state + unacknowledged output of one connection
_LEN = struct.Struct(">I")

OPS = {
    "serve": ("port",),
    "register": ("conn", "input", "output", "read", "write"),
    "commit": ("conn", "seq", "input", "output", "read", "write", "unacked_len"),
    "release": ("conn",),
    "registered": ("conn",),
    "durable": ("conn", "seq"),
    "released": ("conn",),
    "error": ("conn", "reason"),
    "resume": ("conn", "input", "output", "discard", "unacked_len"),
    "freeze": (),
    "frozen": ("conn", "input", "output", "read", "write", "regenerable"),
    "passed": ("conn", "reason"),
    "thaw": (),
    "frozen_many": ("count",),
}
FROZEN_FIELDS = ("conn", "input", "output", "read", "write", "regenerable")
_WITH_FD = {"register", "resume"}


class ProtocolError(TcpcpError, ValueError):
    """A malformed message: the sender is broken, the connection to it is closed."""


@dataclass(frozen=True)
class Message:
    op: str
    fields: dict
    payload: bytes = b""
    fd: int | None = field(default=None, compare=False)

    def __getitem__(self, key):
        return self.fields[key]


def encode(op: str, payload: bytes = b"", **fields) -> bytes:
    """One packet's bytes (pure). Unknown ops and missing or extra fields are refused."""
    _check(op, fields)
    header = json.dumps({"op": op, **fields}, separators=(",", ":")).encode()
    data = _LEN.pack(len(header)) + header + payload
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{op} message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes, fd: int | None = None) -> Message:
    """Parse one packet (pure). Any defect raises ProtocolError naming it."""
    if len(data) < _LEN.size:
        raise ProtocolError("message shorter than its length prefix")
    (hlen,) = _LEN.unpack_from(data)
    if hlen > len(data) - _LEN.size:
        raise ProtocolError(f"header length {hlen} runs past the message ({len(data)} bytes)")
    try:
        header = json.loads(data[_LEN.size:_LEN.size + hlen])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict) or "op" not in header:
        raise ProtocolError("header has no op")
    op = header.pop("op")
    if not isinstance(op, str):
        raise ProtocolError(f"op must be a string, not {type(op).__name__}")
    _check(op, header)
    if (fd is not None) != (op in _WITH_FD):
        raise ProtocolError(f"{op} {'needs' if op in _WITH_FD else 'must not carry'} a file descriptor")
    return Message(op, header, bytes(data[_LEN.size + hlen:]), fd)


def _check(op: str, fields: dict) -> None:
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    want = set(OPS[op])
    if set(fields) != want:
        raise ProtocolError(f"{op} needs fields {sorted(want)}, got {sorted(fields)}")
    for key, value in fields.items():
        if key in ("conn", "reason"):
            if not isinstance(value, str) or not value:
                raise ProtocolError(f"{op}.{key} must be a non-empty string")
        elif not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
            raise ProtocolError(f"{op}.{key} must be an unsigned 64-bit integer")


def send(sock: socket.socket, op: str, payload: bytes = b"", fd: int | None = None, *,
         flags: int = 0, **fields) -> None:
    """Send one message. ``flags=socket.MSG_DONTWAIT`` raises BlockingIOError instead of
    waiting when the receiver is not reading (the agent never waits for an application)."""
    data = encode(op, payload, **fields)
    if fd is None:
        sock.sendmsg([data], [], flags)
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], flags)


def recv(sock: socket.socket) -> Message | None:
    """One message, or None when the other side closed."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
    if not data and not ancdata:
        return None
    fd = None
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
    if len(fds) > 1:
        for extra in fds[1:]:
            socket.close(extra)
        raise ProtocolError("more than one file descriptor in a message")
    if fds:
        fd = fds[0]
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        if fd is not None:
            socket.close(fd)
        raise ProtocolError("message truncated")
    try:
        return decode(data, fd)
    except ProtocolError:
        if fd is not None:
            socket.close(fd)
        raise


def encode_frozen_many(entries: list[tuple[dict, bytes]]) -> bytes:
    """The payload of ``frozen_many`` (pure): ``entries`` are (fields of ``frozen``,
    state). u32 index length | JSON index [[conn, input, output, read, write,
    regenerable, state length], ...] | the states, in order."""
    index = [[f[k] for k in FROZEN_FIELDS] + [len(state)] for f, state in entries]
    head = json.dumps(index, separators=(",", ":")).encode()
    return b"".join([_LEN.pack(len(head)), head] + [state for _, state in entries])


def decode_frozen_many(payload: bytes, count: int) -> list[tuple[dict, bytes]]:
    """Inverse of ``encode_frozen_many``; ProtocolError on any defect."""
    try:
        (hlen,) = _LEN.unpack_from(payload)
        index = json.loads(payload[_LEN.size:_LEN.size + hlen])
        if not isinstance(index, list):
            raise ProtocolError("frozen_many: the index is not a list")
        pos, out = _LEN.size + hlen, []
        for row in index:
            if not isinstance(row, list) or len(row) != len(FROZEN_FIELDS) + 1:
                raise ProtocolError(f"frozen_many: a row is not {len(FROZEN_FIELDS) + 1} values")
            fields = dict(zip(FROZEN_FIELDS, row[:len(FROZEN_FIELDS)]))
            _check("frozen", fields)
            n = row[len(FROZEN_FIELDS)]
            if not isinstance(n, int) or isinstance(n, bool) or n < 0 or pos + n > len(payload):
                raise ProtocolError("frozen_many: a state runs past the message")
            out.append((fields, bytes(payload[pos:pos + n])))
            pos += n
    except (struct.error, ValueError, TypeError, IndexError, RecursionError) as exc:
        raise ProtocolError(f"frozen_many: {type(exc).__name__}: {exc}"[:200]) from None
    if pos != len(payload) or len(out) != count:
        raise ProtocolError(f"frozen_many: {len(out)} entries, {len(payload) - pos} bytes left over")
    return out
