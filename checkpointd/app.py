"""The library an application embeds to have its connections protected. No privileges.

The application hands each accepted socket to the local agent (``register``: the agent
dumps the endpoint while the call blocks, so the application must not use the socket
meanwhile), then reads and writes through the returned ``Protected`` handle, which counts
every byte (R, W: checkpointd/offsets.py), and commits its state with the input offset I
it reflects and the output offset O it resumes at. Commits return at once; the agent
answers ``durable`` once the checkpoint is in etcd, and only then lets the kernel
acknowledge input up to I (the ACK gate).

Output that the application cannot regenerate from its state (replies computed from
state that has moved on) is logged: the handle keeps what was written and not yet
acknowledged (``SIOCOUTQ``, no privilege needed) and sends it with each commit.
Regenerable output (a download) logs nothing; the state regenerates from any offset.

On the standby, ``AgentClient.resumed()`` yields the connections the agent resurrected,
already registered, with the state of their last checkpoint and the count of regenerated
bytes to drop (``discard``): ``send`` drops them transparently, or a regenerable
application skips them with ``take_discard``.
"""

from __future__ import annotations

import fcntl
import queue
import socket
import struct
import threading

from kernel.errors import TcpcpError

from . import protocol

SIOCOUTQ = 0x5411
HISTORY_LIMIT = 16 << 20


class AppError(TcpcpError):
    """The agent refused a request, or is not there."""


class AgentClient:
    def __init__(self, path: str, ports: tuple[int, ...] = ()):
        self.chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.chan.connect(path)
        except OSError as exc:
            raise AppError(f"no checkpointd agent at {path}: {exc}") from None
        self._send_lock = threading.Lock()
        self._replies: dict[tuple[str, str], queue.Queue] = {}
        self._conns: dict[str, Protected] = {}
        self._resumed: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        threading.Thread(target=self._reader, daemon=True, name="tcpcp-agent-reader").start()
        for port in ports:
            self._send("serve", port=port)

    def _send(self, op: str, payload: bytes = b"", fd: int | None = None, **fields) -> None:
        with self._send_lock:
            protocol.send(self.chan, op, payload, fd=fd, **fields)

    def _expect(self, op: str, conn: str) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._replies[(op, conn)] = q
            self._replies[("error", conn)] = q
        return q

    def _wait(self, q: queue.Queue, what: str, timeout: float = 30.0) -> protocol.Message:
        try:
            msg = q.get(timeout=timeout)
        except queue.Empty:
            raise AppError(f"{what}: no answer from the agent in {timeout} s") from None
        if msg.op == "error":
            raise AppError(f"{what}: {msg['reason']}")
        return msg

    def _reader(self) -> None:
        while True:
            try:
                msg = protocol.recv(self.chan)
            except (OSError, protocol.ProtocolError):
                msg = None
            if msg is None:
                self._resumed.put(None)
                return
            if msg.op == "durable":
                p = self._conns.get(msg["conn"])
                if p is not None:
                    p._durable(msg["seq"])
            elif msg.op == "resume":
                p = Protected(self, socket.socket(fileno=msg.fd), msg["conn"], read=msg["input"],
                              write=msg["output"] + msg["discard"], regenerable=None)
                p.discard = msg["discard"]
                p.resumed = (msg["input"], msg["output"], msg["discard"])
                with self._lock:
                    self._conns[p.key] = p
                self._resumed.put((p, msg.payload))
            else:
                with self._lock:
                    q = self._replies.pop((msg.op, msg.fields.get("conn")), None)
                if q is not None:
                    q.put(msg)

    def register(self, sock: socket.socket, state: bytes, *, input: int = 0, output: int = 0,
                 regenerable: bool, conn: str | None = None) -> "Protected":
        """Hand ``sock`` to the agent; returns once it is dumped and guarded."""
        key = conn or conn_key(sock)
        q = self._expect("registered", key)
        self._send("register", state, fd=sock.fileno(), conn=key, input=input, output=output,
                   read=0, write=0)
        self._wait(q, f"register {key}")
        p = Protected(self, sock, key, read=0, write=0, regenerable=regenerable)
        with self._lock:
            self._conns[key] = p
        return p

    def resumed(self, timeout: float | None = None):
        """Resurrected connections as (Protected, state bytes); None when the agent left."""
        while True:
            try:
                item = self._resumed.get(timeout=timeout)
            except queue.Empty:
                return
            if item is None:
                return
            yield item


def conn_key(sock: socket.socket) -> str:
    def part(addr):
        host = addr[0].split("%")[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return f"{part(sock.getsockname())}-{part(sock.getpeername())}"


class Protected:
    """One protected connection: counted I/O, commits, release."""

    def __init__(self, client: AgentClient, sock: socket.socket, key: str, *, read: int,
                 write: int, regenerable: bool | None):
        self.client, self.sock, self.key = client, sock, key
        self.read, self.write = read, write
        self.regenerable = regenerable
        self.history = bytearray()   # written, maybe unacknowledged (logged output only)
        self.seq = 0
        self.durable_seq = 0
        self.discard = 0
        self.resumed: tuple | None = None
        self._cv = threading.Condition()

    # -- counted I/O ---------------------------------------------------------------
    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.read += len(data)
        return data

    def sendall(self, data: bytes) -> None:
        """Write ``data``; the first ``discard`` bytes after a resume are dropped (the peer
        has them, or the agent resent them)."""
        if self.discard:
            cut = min(self.discard, len(data))
            data, self.discard = data[cut:], self.discard - cut
        if not data:
            return
        self.sock.sendall(data)
        self.write += len(data)
        if self.regenerable is not True:
            self.history += data
            if len(self.history) > HISTORY_LIMIT:
                del self.history[:len(self.history) - HISTORY_LIMIT]

    def take_discard(self) -> int:
        """For regenerable output: skip the bytes to drop instead of generating them."""
        n, self.discard = self.discard, 0
        return n

    # -- commits -------------------------------------------------------------------
    def commit(self, state: bytes, *, input: int, output: int) -> int:
        """Queue a checkpoint of ``state`` (input up to ``input`` reflected, output resuming
        at ``output``); returns its sequence number. Durable later: ``wait_durable``."""
        unacked = b""
        if self.regenerable is not True:
            outq = struct.unpack("=i", fcntl.ioctl(self.sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
            outq = min(outq, len(self.history))
            if outq < len(self.history):
                del self.history[:len(self.history) - outq]
            unacked = bytes(self.history)
        self.seq += 1
        self.client._send("commit", state + unacked, conn=self.key, seq=self.seq, input=input,
                          output=output, read=self.read, write=self.write, unacked_len=len(unacked))
        return self.seq

    def _durable(self, seq: int) -> None:
        with self._cv:
            self.durable_seq = max(self.durable_seq, seq)
            self._cv.notify_all()

    def wait_durable(self, seq: int, timeout: float = 10.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.durable_seq >= seq, timeout)

    def release(self, timeout: float = 10.0) -> None:
        """Tell the agent the connection ends on purpose (its FIN may leave)."""
        q = self.client._expect("released", self.key)
        self.client._send("release", conn=self.key)
        self.client._wait(q, f"release {self.key}", timeout)
        with self.client._lock:
            self.client._conns.pop(self.key, None)
