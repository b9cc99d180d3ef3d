"""The stream application: the server side of the verified byte-stream protocol.

It runs on the origin and, after a pass, on the destination, against the unmodified peer
in peers/stream_peer.py. Each connection starts with the peer's 16-byte hello
(b'TCPCPSTR' + connection id, u64 big-endian); then the server sends its deterministic
stream as fast as the socket takes it and verifies the peer's. Because both streams are a
function of (connection, direction, offset), the whole application state of a connection
is a few offsets and counters (StreamState), which is what travels with the ICI: the
destination resumes generating at `sent` and verifying at `received`, and any byte lost,
duplicated or damaged by the pass shows up in the counters on one side or the other.

Pure parts (generate, Verifier, StreamState) need no sockets; StreamServer is a thin
selectors loop in one thread with pause()/detach()/attach() for the passing code.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import selectors
import socket
import struct
import termios
import threading
import time

from kernel.errors import TcpcpError

# --- Stream format. It MUST match peers/stream_peer.py word for word (the peer may not
# --- import this module); tests/unit/test_stream.py compares the two.
#
# The stream is a sequence of 8-byte big-endian words. Word k (stream bytes 8k..8k+7) of
# connection c in direction d (0 = peer->server, 1 = server->peer) is
#
#     raw  = d << 63 | c << 48 | check(k) << 40 | k        (c < 2**15, k < 2**40)
#     word = raw ^ MASK
#
# check(k) is the XOR of the five bytes of k. Every aligned word therefore says which
# connection, direction and offset it belongs to, and a damaged word fails the check or
# names the wrong connection. That lets a receiver tell a jump forward (lost bytes) from a
# jump back (duplicated bytes) from damage in place (corrupt bytes). MASK keeps the stream
# from being mostly zeros, and makes an all-zero or all-0xFF word invalid.
#
# check() is linear over XOR, so a block of 2**BLOCK_BITS words starting at an aligned k0
# is (P ^ T[i]) for i in the block, where P depends on k0 only: one big-integer XOR per
# block makes generation fast enough for Python (hundreds of MB/s).

HELLO_MAGIC = b'TCPCPSTR'
HELLO = struct.Struct('!8sQ')
MASK = 0x9E3779B97F4A7C15
K_BITS = 40
K_MASK = (1 << K_BITS) - 1
CONN_BITS = 15
MAX_CONN_ID = (1 << CONN_BITS) - 1
TO_SERVER, TO_PEER = 0, 1
BLOCK_BITS = 10
BLOCK_WORDS = 1 << BLOCK_BITS
BLOCK_BYTES = 8 * BLOCK_WORDS


def _check(k: int) -> int:
    k ^= k >> 32
    k ^= k >> 16
    k ^= k >> 8
    return k & 0xFF


def word(conn_id: int, direction: int, k: int) -> int:
    """The integer value of word k."""
    k &= K_MASK
    return (direction << 63 | conn_id << 48 | _check(k) << 40 | k) ^ MASK


def decode(data: bytes) -> tuple[int, int, int] | None:
    """(direction, conn_id, k) of an 8-byte word, or None when its check fails."""
    raw = int.from_bytes(data, 'big') ^ MASK
    k = raw & K_MASK
    if (raw >> 40) & 0xFF != _check(k):
        return None
    return raw >> 63, (raw >> 48) & MAX_CONN_ID, k


_T = int.from_bytes(b''.join((_check(i) << 40 | i).to_bytes(8, 'big')
                             for i in range(BLOCK_WORDS)), 'big')


@functools.lru_cache(maxsize=64)
def _block(conn_id: int, direction: int, index: int) -> bytes:
    k0 = (index << BLOCK_BITS) & K_MASK
    p = word(conn_id, direction, k0)          # == P, since T[0] == 0
    return (int.from_bytes(p.to_bytes(8, 'big') * BLOCK_WORDS, 'big') ^ _T).to_bytes(
        BLOCK_BYTES, 'big')


def generate(conn_id: int, direction: int, offset: int, length: int) -> bytes:
    """Stream bytes [offset, offset + length) of one connection and direction."""
    if length <= 0:
        return b''
    first, last = offset // BLOCK_BYTES, (offset + length - 1) // BLOCK_BYTES
    if first == last:
        start = offset - first * BLOCK_BYTES
        return _block(conn_id, direction, first)[start:start + length]
    data = b''.join(_block(conn_id, direction, i) for i in range(first, last + 1))
    start = offset - first * BLOCK_BYTES
    return data[start:start + length]


def _first_diff(a: bytes, b: bytes) -> int:
    x = int.from_bytes(a, 'big') ^ int.from_bytes(b, 'big')
    return len(a) - (x.bit_length() + 7) // 8


class Verifier:
    """Consumes a received stream in chunks of any size and classifies every byte.

    verified: bytes equal to the stream at the offset they are attributed to.
    lost / duplicated: size of each jump forward / back, found from the offset that the
      next intact word names (two consecutive intact words are required, so that a word
      straddling the jump cannot fake an offset).
    corrupt: bytes that differ from what was expected where no jump explains them.
      Every byte consumed is either verified or corrupt.
    pending: at most MAX_PENDING bytes held back to decide a mismatch; part of the state.

    Invariant (used by StreamState): offset == start + consumed + lost - duplicated, where
    consumed counts the bytes fed minus len(pending).
    """
    MAX_PENDING = 23
    _BIG = 1 << 20

    def __init__(self, conn_id: int, direction: int, offset: int = 0, pending: bytes = b''):
        self.conn_id, self.direction = conn_id, direction
        self.offset = offset          # stream offset expected for the first pending byte
        self.pending = bytes(pending)
        self.verified = self.lost = self.duplicated = self.corrupt = 0
        self._window = self._BIG      # compare size; small after a mismatch

    def feed(self, data: bytes, final: bool = False) -> None:
        """Verify more received bytes; final=True at end of stream decides the rest."""
        buf = self.pending + bytes(data) if self.pending else bytes(data)
        pos, end = 0, len(buf)
        while pos < end:
            size = min(end - pos, self._window)
            got = buf[pos:pos + size]
            exp = generate(self.conn_id, self.direction, self.offset, size)
            if got == exp:
                self.verified += size
                self.offset += size
                pos += size
                self._window = min(self._window * 2, self._BIG)
                continue
            d = _first_diff(got, exp)
            self.verified += d
            self.offset += d
            pos += d
            self._window = 64
            if end - pos <= self.MAX_PENDING and not final:
                break
            pos = self._resync(buf, pos)
        self.pending = buf[pos:]

    def _intact(self, buf: bytes, q: int) -> int | None:
        """Offset of an intact word at buf[q:] followed by its successor, else None."""
        w = decode(buf[q:q + 8])
        if w is None or w[0] != self.direction or w[1] != self.conn_id:
            return None
        at = w[2] * 8
        n = min(16, len(buf) - q)
        return at if buf[q:q + n] == generate(self.conn_id, self.direction, at, n) else None

    def _resync(self, buf: bytes, p: int) -> int:
        """Classify a mismatch at buf[p] (expected at self.offset); return where to go on."""
        end = len(buf)
        for q in range(max(0, p - 7), min(end - 8, p + 8) + 1):
            new = self._intact(buf, q)
            if new is None:
                continue
            at = self.offset + (q - p)            # where the old expectation puts buf[q]
            if new == at:                         # back in step: damage in place
                self._classify(buf[p:q], self.offset)
            else:
                if new > at:
                    self.lost += new - at
                else:
                    self.duplicated += at - new
                if q > p:                         # the tail of a word before the jump
                    self._classify(buf[p:q], new - (q - p))
                else:                             # buf[q:p] matched by chance: redo it
                    self.verified -= p - q
            self.offset = new
            return q
        stop = min(end, p + 8 - self.offset % 8)  # no intact word near: damage in place
        self._classify(buf[p:stop], self.offset)
        self.offset += stop - p
        return stop

    def _classify(self, data: bytes, offset: int) -> None:
        """Count data, expected at offset, as verified or corrupt byte by byte."""
        exp = generate(self.conn_id, self.direction, offset, len(data)) if offset >= 0 else b''
        bad = len(data) if len(exp) != len(data) else sum(
            1 for x, y in zip(data, exp) if x != y)
        self.corrupt += bad
        self.verified += len(data) - bad


# --- Application state: what is passed (or checkpointed) along with the ICI.

_STATE = struct.Struct('!4sBBIQQQQQQB24s')
_STATE_MAGIC = b'TCSA'
_STATE_VERSION = 1
_F_HELLO, _F_PEER_EOF = 1, 2


class StreamStateError(TcpcpError, ValueError):
    """A StreamState that cannot be decoded or cannot be true; ``field`` names the check."""

    def __init__(self, field: str, message: str):
        super().__init__(f'invalid StreamState: {field}: {message}')
        self.field = field


@dataclasses.dataclass(frozen=True)
class StreamState:
    """One connection's application state, exact to the byte.

    sent:      stream bytes the app has written into the socket (send() returns).
    received:  stream bytes the app has read from the socket, after the hello.
    pending:   bytes read but not yet classified: a partial hello while conn_id is None,
               else up to Verifier.MAX_PENDING bytes the verifier is holding back.
    peer_eof:  the peer's FIN has been read; the server only flushes and closes.
    verified, lost, duplicated, corrupt: the Verifier's counters for peer->server.

    Stored form (to_bytes, 83 bytes, network order): magic b'TCSA', version u8 (1),
    flags u8 (1 = hello read, 2 = peer_eof), conn_id u32, sent, received, verified, lost,
    duplicated, corrupt u64 each, pending length u8, pending padded to 24 bytes.
    """
    conn_id: int | None
    sent: int = 0
    received: int = 0
    verified: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupt: int = 0
    pending: bytes = b''
    peer_eof: bool = False

    SIZE = _STATE.size

    def __post_init__(self):
        if self.conn_id is None:
            if len(self.pending) >= HELLO.size or self.sent or self.received:
                raise StreamStateError('conn_id', 'without a hello only a partial hello')
        elif not 0 <= self.conn_id <= MAX_CONN_ID:
            raise StreamStateError('conn_id', f'{self.conn_id} not in 0..{MAX_CONN_ID}')
        elif len(self.pending) > Verifier.MAX_PENDING:
            raise StreamStateError('pending', f'{len(self.pending)} > {Verifier.MAX_PENDING}')
        counters = (self.sent, self.received, self.verified, self.lost, self.duplicated,
                    self.corrupt)
        if any(not 0 <= c < 1 << 64 for c in counters):
            raise StreamStateError('counters', 'must be u64')
        if len(self.pending) > self.received + (HELLO.size if self.conn_id is None else 0):
            raise StreamStateError('pending', 'more pending bytes than received')

    @property
    def verify_at(self) -> int:
        """Peer->server stream offset the verifier expects for pending[0]."""
        return self.received - len(self.pending) + self.lost - self.duplicated

    def to_bytes(self) -> bytes:
        flags = (_F_HELLO if self.conn_id is not None else 0) | (
            _F_PEER_EOF if self.peer_eof else 0)
        return _STATE.pack(_STATE_MAGIC, _STATE_VERSION, flags, self.conn_id or 0,
                           self.sent, self.received, self.verified, self.lost,
                           self.duplicated, self.corrupt, len(self.pending), self.pending)

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamState:
        if len(data) != _STATE.size:
            raise StreamStateError('length', f'{len(data)} bytes, not {_STATE.size}')
        (magic, version, flags, conn_id, sent, received, verified, lost, dup, corrupt,
         plen, pending) = _STATE.unpack(data)
        if magic != _STATE_MAGIC or version != _STATE_VERSION:
            raise StreamStateError('version', f'{magic!r} v{version}, not v{_STATE_VERSION}')
        if plen > len(pending):
            raise StreamStateError('pending', f'length {plen}')
        if flags & ~(_F_HELLO | _F_PEER_EOF):
            raise StreamStateError('flags', f'unknown flags {flags:#x}')
        return cls(conn_id if flags & _F_HELLO else None, sent, received, verified, lost,
                   dup, corrupt, pending[:plen], bool(flags & _F_PEER_EOF))


# --- The server.

def _outq(sock: socket.socket) -> int:
    """Bytes in the send queue not yet acknowledged (SIOCOUTQ)."""
    return struct.unpack('i', fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b'\0' * 4))[0]


class _Conn:
    """A live connection inside StreamServer (a handle, not data)."""

    def __init__(self, sock: socket.socket, state: StreamState):
        self.sock = sock
        self.conn_id = state.conn_id
        self.sent, self.received = state.sent, state.received
        self.peer_eof = state.peer_eof
        self.hello = state.pending if state.conn_id is None else b''
        self.verifier = None
        if state.conn_id is not None:
            self._start_verifier(state.verify_at, state.pending)
            v = self.verifier
            v.verified, v.lost, v.duplicated, v.corrupt = (
                state.verified, state.lost, state.duplicated, state.corrupt)
        self.out = memoryview(b'')                # generated, not yet written: not state
        self.flush_deadline = None
        self.mask = 0                             # selector interest

    def _start_verifier(self, offset: int, pending: bytes) -> None:
        self.verifier = Verifier(self.conn_id, TO_SERVER, offset, pending)

    def counters(self) -> tuple[int, ...]:
        """In _COUNTERS order; plain reads, safe from another thread."""
        v = self.verifier
        if v is None:
            return 0, 0, 0, 0, 0, 0
        return self.sent, self.received, v.verified, v.lost, v.duplicated, v.corrupt

    def state(self) -> StreamState:
        v = self.verifier
        if v is None:
            return StreamState(None, pending=self.hello, peer_eof=self.peer_eof)
        return StreamState(self.conn_id, self.sent, self.received, v.verified, v.lost,
                           v.duplicated, v.corrupt, v.pending, self.peer_eof)


_WAKE, _LISTEN = object(), object()              # selector data of the two non-connections
_COUNTERS = ('bytes_sent', 'bytes_received', 'bytes_verified', 'lost_bytes',
             'duplicated_bytes', 'corrupt_bytes')


class StreamServer:
    """Serves the stream protocol on many sockets from one thread.

    The passing code uses pause() to make the loop stop touching sockets (it then dumps
    them), detach() to take a connection out with its StreamState, and attach() on the
    destination to adopt the restored socket; the stream continues at the state's offsets.
    stats() covers the connections this instance holds or has closed, not detached ones.
    """

    ROUND_BYTES = 8 << 20                         # see _chunk()
    MIN_CHUNK = 16 << 10

    def __init__(self, listener: socket.socket | None = None, *, chunk: int = 256 * 1024,
                 flush_timeout: float = 30.0, rate: float | None = None):
        self.chunk = chunk
        self.flush_timeout = flush_timeout
        # Total send rate in bytes/s (None: as fast as the sockets take it). A paced server
        # keeps its loop rounds short, so a pause the peer sees is the pass's, not the loop's.
        self.rate = rate
        self._tokens = 0.0
        self._refilled = time.monotonic()
        self._sel = selectors.DefaultSelector()
        self._conns: dict[socket.socket, _Conn] = {}
        self._done = dict.fromkeys(_COUNTERS + (
            'closed', 'resets', 'errors', 'protocol_errors', 'accepted'), 0)
        self._flushing: set[_Conn] = set()       # peer has finished; closing when flushed
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._listener = listener
        if listener is not None:
            listener.setblocking(False)
            self._sel.register(listener, selectors.EVENT_READ, _LISTEN)
        self._cv = threading.Condition()
        self._pause_depth = 0
        self._quiescent = False
        self._stopping = self._stopped = False
        self._thread: threading.Thread | None = None

    # --- control (any thread)
    def start(self) -> StreamServer:
        self._thread = threading.Thread(target=self._run, name='streamapp', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the loop and close every connection (the listener is the caller's)."""
        if self._stopped:
            return
        self._stopped = True
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._wake()
        if self._thread is not None:
            self._thread.join()
        for conn in list(self._conns.values()):
            self._close(conn)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def pause(self) -> None:
        """Return once the loop is quiescent: no socket is touched until resume()."""
        with self._cv:
            self._pause_depth += 1
            if not self._running() or threading.current_thread() is self._thread:
                return
            self._wake()
            while not self._quiescent and self._running():
                self._cv.wait()

    def resume(self) -> None:
        with self._cv:
            if self._pause_depth <= 0:
                raise RuntimeError('resume() without pause()')
            self._pause_depth -= 1
            self._cv.notify_all()

    def detach(self, conn: int | socket.socket) -> tuple[socket.socket, StreamState]:
        """Take a connection (by conn_id or socket) out of the server, with its state."""
        self.pause()
        try:
            c = self._find(conn)
            self._forget(c)
            return c.sock, c.state()
        finally:
            self.resume()

    def detach_all(self) -> list[tuple[socket.socket, StreamState]]:
        """Take every connection out under one pause (a pass moves them all at once)."""
        self.pause()
        try:
            out = []
            for c in list(self._conns.values()):
                if c.conn_id is None:  # no hello yet: nothing to pass, it stays here
                    continue
                self._forget(c)
                out.append((c.sock, c.state()))
            return out
        finally:
            self.resume()

    def attach_all(self, pairs: list[tuple[socket.socket, StreamState]]) -> None:
        """Adopt many sockets under one pause, so the first starts as soon as the last."""
        self.pause()
        try:
            for sock, state in pairs:
                sock.setblocking(False)
                c = _Conn(sock, state)
                self._conns[sock] = c
                self._interest(c)
                if c.peer_eof:
                    c.flush_deadline = time.monotonic() + self.flush_timeout
        finally:
            self.resume()
        self._wake()

    def attach(self, sock: socket.socket, state: StreamState | None = None) -> None:
        """Adopt a socket: a fresh accepted one (state None) or a restored one."""
        sock.setblocking(False)
        c = _Conn(sock, state or StreamState(None))
        self.pause()
        try:
            self._conns[sock] = c
            self._interest(c)
            if c.peer_eof:
                c.flush_deadline = time.monotonic() + self.flush_timeout
                self._flushing.add(c)
        finally:
            self.resume()
        self._wake()

    def state(self, conn: int | socket.socket) -> StreamState:
        """A consistent snapshot of one connection's state (pauses briefly)."""
        self.pause()
        try:
            return self._find(conn).state()
        finally:
            self.resume()

    def conn_ids(self) -> list[int]:
        return sorted(c.conn_id for c in list(self._conns.values()) if c.conn_id is not None)

    def stats(self) -> dict[str, int]:
        """Totals over live and closed connections (approximate while running)."""
        out = dict(self._done)
        live = list(self._conns.values())
        out['connections'] = len(live)
        for c in live:
            for key, val in zip(_COUNTERS, c.counters()):
                out[key] += val
        return out

    # --- the loop (its own thread)
    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _wake(self) -> None:
        try:
            self._wake_w.send(b'x')
        except (BlockingIOError, OSError):
            pass

    def _checkpoint(self) -> bool:
        """Park here while paused; False when stopping."""
        with self._cv:
            if self._pause_depth and not self._stopping:
                self._quiescent = True
                self._cv.notify_all()
                while self._pause_depth and not self._stopping:
                    self._cv.wait()
                self._quiescent = False
            return not self._stopping

    def _run(self) -> None:
        try:
            while self._checkpoint():
                events = self._sel.select(0.02 if self._flushing else 0.5)
                if self.rate is not None and events:
                    # paced: rotate the round's start, or the sockets select() lists
                    # first would take the tokens whenever they run short
                    self._rr = (getattr(self, "_rr", 0) + 7919) % len(events)
                    events = events[self._rr:] + events[:self._rr]
                for key, mask in events:
                    if key.data is _WAKE:
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                    elif key.data is _LISTEN:
                        self._accept()
                    elif key.data.sock in self._conns:
                        self._service(key.data, mask)
                    if self._pause_depth:  # a pass is waiting: stop mid-round
                        break
                if self._flushing:
                    self._flush(time.monotonic())
                self._pace()
        finally:
            with self._cv:
                self._quiescent = True
                self._cv.notify_all()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._done['errors'] += 1
                return
            self._done['accepted'] += 1
            sock.setblocking(False)
            c = _Conn(sock, StreamState(None))
            self._conns[sock] = c
            self._interest(c)

    def _interest(self, c: _Conn) -> None:
        """(Re)register c: read until the peer's FIN, write once the hello is in."""
        mask = 0 if c.peer_eof else selectors.EVENT_READ | (
            selectors.EVENT_WRITE if c.verifier else 0)
        if mask == c.mask:
            return
        if c.mask and mask:
            self._sel.modify(c.sock, mask, c)
        elif mask:
            self._sel.register(c.sock, mask, c)
        else:
            self._sel.unregister(c.sock)
        c.mask = mask

    def _service(self, c: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                self._read(c)
            if (mask & selectors.EVENT_WRITE and c.sock in self._conns and not c.peer_eof
                    and self._may_send()):
                self._write(c)
        except (ConnectionResetError, BrokenPipeError):
            self._done['resets'] += 1
            self._close(c)
        except OSError:
            self._done['errors'] += 1
            self._close(c)

    def _read(self, c: _Conn) -> None:
        if c.peer_eof:
            return
        want = HELLO.size - len(c.hello) if c.verifier is None else self._chunk()
        try:
            data = c.sock.recv(want)
        except BlockingIOError:
            return
        if not data:
            c.peer_eof = True
            if c.verifier is None:                # closed before saying hello
                self._close(c)
                return
            c.verifier.feed(b'', final=True)
            c.out = memoryview(b'')
            c.flush_deadline = time.monotonic() + self.flush_timeout
            self._flushing.add(c)
            self._interest(c)
            return
        if c.verifier is not None:
            c.received += len(data)
            c.verifier.feed(data)
            return
        c.hello += data
        if len(c.hello) < HELLO.size:
            return
        magic, conn_id = HELLO.unpack(c.hello)
        if magic != HELLO_MAGIC or conn_id > MAX_CONN_ID:
            self._done['protocol_errors'] += 1
            self._close(c)
            return
        c.conn_id, c.hello = conn_id, b''
        c._start_verifier(0, b'')
        self._interest(c)

    def _chunk(self) -> int:
        """Bytes per call: one round over all connections stays near ROUND_BYTES, which
        bounds the pause that this loop's own latency puts into each stream."""
        return max(self.MIN_CHUNK, min(self.chunk, self.ROUND_BYTES // max(1, len(self._conns))))

    def _may_send(self) -> bool:
        if self.rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(self.rate * 0.05, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        return self._tokens > 0

    def _pace(self) -> None:
        """Out of tokens: sleep until there are some, so select() does not spin."""
        if self.rate is not None and self._tokens <= 0:
            time.sleep(min(0.005, -self._tokens / self.rate + 0.0005))

    def _write(self, c: _Conn) -> None:
        if not c.out:
            c.out = memoryview(generate(c.conn_id, TO_PEER, c.sent, self._chunk()))
        out = c.out
        if self.rate is not None:  # paced: at most this connection's share of 20 ms
            share = max(1024, int(min(self._tokens, self.rate * 0.02 / max(1, len(self._conns)))))
            out = out[:share]
        try:
            n = c.sock.send(out)
        except BlockingIOError:                   # send buffer full: wait for ACKs
            return
        c.sent += n
        c.out = c.out[n:]
        if self.rate is not None:
            self._tokens -= n

    def _flush(self, now: float) -> None:
        """Close connections whose peer has finished, once the send queue is empty."""
        for c in list(self._flushing):
            try:
                empty = _outq(c.sock) == 0
            except OSError:
                empty = True
            if empty or now >= c.flush_deadline:
                self._close(c)

    def _close(self, c: _Conn) -> None:
        if c.sock not in self._conns:
            return
        for key, val in zip(_COUNTERS, c.counters()):
            self._done[key] += val
        self._done['closed'] += 1
        self._forget(c)
        c.sock.close()

    def _forget(self, c: _Conn) -> None:
        self._conns.pop(c.sock, None)
        self._flushing.discard(c)
        if c.mask:
            self._sel.unregister(c.sock)
            c.mask = 0

    def _find(self, conn: int | socket.socket) -> _Conn:
        if isinstance(conn, socket.socket):
            return self._conns[conn]
        found = [c for c in self._conns.values() if c.conn_id == conn]
        if len(found) != 1:
            raise KeyError(f'{len(found)} connections with conn_id {conn}')
        return found[0]
