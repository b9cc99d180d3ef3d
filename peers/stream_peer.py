#!/usr/bin/env python3
"""The unmodified peer: a plain socket program that talks to the stream application.

It stands for the remote client that must not notice a connection being passed, so it
imports nothing from tcpcp (standard library only, one file) and needs no privileges.

It opens N connections, sends a 16-byte hello on each (b'TCPCPSTR' + connection id, u64
big-endian), then streams in both directions at once from one thread (selectors, so a
thousand connections work): it sends a deterministic byte stream and verifies the one the
server sends back, counting lost, duplicated and corrupt bytes exactly, resets, early
FINs, and the longest stall in either direction.

Usage:
    python3 peers/stream_peer.py --connect 10.0.0.1:7000 --connections 100 --seconds 10 --json
    python3 peers/stream_peer.py --connect [fd77::100]:7000 --until-file /tmp/stop ...

The exit code is 0 when nothing was lost, duplicated or corrupted and no connection was
reset, closed early or failed to connect; 1 otherwise.
"""

import argparse
import errno
import functools
import json
import os
import selectors
import socket
import struct
import sys
import time

# --- Stream format. It MUST match kernel/streamapp.py word for word; the unit tests
# --- (tests/unit/test_stream.py) compare the two.
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


def _check(k):
    k ^= k >> 32
    k ^= k >> 16
    k ^= k >> 8
    return k & 0xFF


def word(conn_id, direction, k):
    """The integer value of word k."""
    k &= K_MASK
    return (direction << 63 | conn_id << 48 | _check(k) << 40 | k) ^ MASK


def decode(data):
    """(direction, conn_id, k) of an 8-byte word, or None when its check fails."""
    raw = int.from_bytes(data, 'big') ^ MASK
    k = raw & K_MASK
    if (raw >> 40) & 0xFF != _check(k):
        return None
    return raw >> 63, (raw >> 48) & MAX_CONN_ID, k


_T = int.from_bytes(b''.join((_check(i) << 40 | i).to_bytes(8, 'big')
                             for i in range(BLOCK_WORDS)), 'big')


@functools.lru_cache(maxsize=64)
def _block(conn_id, direction, index):
    k0 = (index << BLOCK_BITS) & K_MASK
    p = word(conn_id, direction, k0)          # == P, since T[0] == 0
    return (int.from_bytes(p.to_bytes(8, 'big') * BLOCK_WORDS, 'big') ^ _T).to_bytes(
        BLOCK_BYTES, 'big')


def generate(conn_id, direction, offset, length):
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


def _first_diff(a, b):
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
    """
    MAX_PENDING = 23
    _BIG = 1 << 20

    def __init__(self, conn_id, direction, offset=0, pending=b''):
        self.conn_id, self.direction = conn_id, direction
        self.offset = offset          # stream offset expected for the first pending byte
        self.pending = bytes(pending)
        self.verified = self.lost = self.duplicated = self.corrupt = 0
        self._window = self._BIG      # compare size; small after a mismatch

    def feed(self, data, final=False):
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

    def _intact(self, buf, q):
        """Offset of an intact word at buf[q:] followed by its successor, else None."""
        w = decode(buf[q:q + 8])
        if w is None or w[0] != self.direction or w[1] != self.conn_id:
            return None
        at = w[2] * 8
        n = min(16, len(buf) - q)
        return at if buf[q:q + n] == generate(self.conn_id, self.direction, at, n) else None

    def _resync(self, buf, p):
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

    def _classify(self, data, offset):
        """Count data, expected at offset, as verified or corrupt byte by byte."""
        exp = generate(self.conn_id, self.direction, offset, len(data)) if offset >= 0 else b''
        bad = len(data) if len(exp) != len(data) else sum(
            1 for x, y in zip(data, exp) if x != y)
        self.corrupt += bad
        self.verified += len(data) - bad


# --- The peer program.

# Bytes per read or send call. One loop round serves every connection once, so a round
# costs about connections * chunk; keeping that near ROUND_BYTES bounds the pause a
# connection sees from this loop's own latency (a thousand connections: 16 KiB each).
ROUND_BYTES = 8 << 20
MIN_CHUNK, MAX_CHUNK = 16 << 10, 256 << 10


class _Bucket:
    """Token bucket in bytes; burst of 20 ms."""

    def __init__(self, rate):
        self.rate = rate
        self.burst = max(rate * 0.02, 8192)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def refill(self, now):
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self):
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


class _Conn:
    def __init__(self, cid, sock, bucket):
        self.cid, self.sock, self.bucket = cid, sock, bucket
        self.state = 'connecting'                 # -> open -> closed
        self.out = memoryview(HELLO.pack(HELLO_MAGIC, cid))
        self.hello_left = HELLO.size
        self.sent = self.received = 0
        self.verifier = Verifier(cid, TO_PEER)
        self.mask = 0
        self.shut = self.eof = False
        self.early_fin = self.reset = self.connect_failed = False
        self.error = None
        self.last_recv = None
        self.want_since = None                    # wants to send, has not been able to
        self.max_gap = self.max_block = 0.0

    def note_gap(self, now):
        if self.last_recv is not None and not self.shut:
            self.max_gap = max(self.max_gap, now - self.last_recv)

    def note_wait(self, now, again):
        """A send got through (or sending ends): the wait since the last one is over."""
        if self.want_since is not None:
            self.max_block = max(self.max_block, now - self.want_since)
        self.want_since = now if again else None

    def report(self):
        v = self.verifier
        return {
            'id': self.cid, 'bytes_sent': self.sent, 'bytes_received': self.received,
            'bytes_verified': v.verified, 'lost_bytes': v.lost,
            'duplicated_bytes': v.duplicated, 'corrupt_bytes': v.corrupt,
            'reset': self.reset, 'early_fin': self.early_fin, 'eof': self.eof,
            'connect_failed': self.connect_failed, 'error': self.error,
            'max_recv_gap_ms': round(self.max_gap * 1000, 3),
            'max_send_block_ms': round(self.max_block * 1000, 3),
        }


class Peer:
    """Runs all connections from one selector loop; see the module docstring."""

    def __init__(self, args):
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.conns = []
        self.phase = 'sending'                    # -> draining -> done
        self.t0 = time.monotonic()
        self.next_progress = 0.0
        self.next_file_check = 0.0
        rate = args.rate_mbps * 1e6 / 8 if args.rate_mbps else None
        self.shared = _Bucket(rate) if rate and args.rate_scope == 'total' else None
        self.rate = rate
        self.throttled = set()
        self.unclosed = args.connections          # connections not yet closed
        self.chunk = max(MIN_CHUNK, min(MAX_CHUNK, ROUND_BYTES // args.connections))

    # connections
    def open_all(self):
        host, port = parse_endpoint(self.args.connect)
        family, _, _, _, addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        for cid in range(self.args.connections):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            bucket = self.shared or (_Bucket(self.rate) if self.rate else None)
            conn = _Conn(cid, sock, bucket)
            self.conns.append(conn)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                self.fail_connect(conn, err)
                continue
            self.set_mask(conn, selectors.EVENT_WRITE)

    def set_mask(self, conn, mask):
        if mask == conn.mask:
            return
        if conn.mask and mask:
            self.sel.modify(conn.sock, mask, conn)
        elif mask:
            self.sel.register(conn.sock, mask, conn)
        else:
            self.sel.unregister(conn.sock)
        conn.mask = mask

    def close(self, conn):
        if conn.state == 'closed':
            return
        self.unclosed -= 1
        self.set_mask(conn, 0)
        conn.sock.close()
        conn.state = 'closed'

    def fail_connect(self, conn, err):
        conn.connect_failed = True
        conn.error = os.strerror(err)
        self.close(conn)

    def fail(self, conn, exc):
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            conn.reset = True
        conn.error = f'{type(exc).__name__}: {exc}'
        now = time.monotonic()
        conn.note_gap(now)
        conn.verifier.feed(b'', final=True)
        self.close(conn)

    # event handlers
    def on_connected(self, conn, now):
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail_connect(conn, err)
            return
        conn.state = 'open'
        conn.last_recv = conn.want_since = now
        self.set_mask(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def on_read(self, conn, now):
        try:
            data = conn.sock.recv(self.chunk)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, exc)
            return
        if data:
            conn.note_gap(now)
            conn.last_recv = now
            conn.received += len(data)
            conn.verifier.feed(data)
            return
        conn.note_gap(now)
        conn.eof = True
        conn.early_fin = not conn.shut
        conn.verifier.feed(b'', final=True)
        self.close(conn)

    def on_write(self, conn, now):
        if not conn.out:
            conn.out = memoryview(generate(conn.cid, TO_SERVER, conn.sent, self.chunk))
        size = len(conn.out)
        if conn.bucket and not conn.hello_left:
            conn.bucket.refill(now)
            size = min(size, int(conn.bucket.tokens))
            if size <= 0:                         # our own limit, not a stall
                conn.note_wait(now, again=False)
                self.throttled.add(conn)
                self.set_mask(conn, selectors.EVENT_READ)
                return
        try:
            n = conn.sock.send(conn.out[:size])
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(conn, exc)
            return
        if n:
            conn.note_wait(now, again=True)
        if conn.hello_left:
            conn.hello_left -= n
        else:
            conn.sent += n
            if conn.bucket:
                conn.bucket.tokens -= n
        conn.out = conn.out[n:]

    # phases
    def stop_sending(self, now):
        self.phase = 'draining'
        self.drain_deadline = now + self.args.drain_seconds
        for conn in self.conns:
            if conn.state == 'connecting':
                self.fail_connect(conn, errno.ETIMEDOUT)
            elif conn.state == 'open':
                conn.note_gap(now)
                conn.note_wait(now, again=False)
                conn.shut = True
                self.set_mask(conn, selectors.EVENT_READ)
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self.fail(conn, exc)

    def should_stop_sending(self, now):
        if now - self.t0 >= self.args.seconds:
            return True
        if self.args.until_file and now >= self.next_file_check:
            self.next_file_check = now + 0.05
            return os.path.exists(self.args.until_file)
        return False

    def update_throttled(self, now):
        """Give write interest back to throttled connections; return the select timeout."""
        timeout = 0.05
        for conn in list(self.throttled):
            if conn.state != 'open' or self.phase != 'sending':
                self.throttled.discard(conn)
                continue
            conn.bucket.refill(now)
            delay = conn.bucket.delay()
            if delay > 0:
                timeout = min(timeout, max(delay, 0.001))
            else:
                self.throttled.discard(conn)
                conn.want_since = now
                self.set_mask(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
        return timeout

    def write_progress(self, now):
        if not self.args.progress_file or now < self.next_progress:
            return
        self.next_progress = now + 0.1
        status = {
            'phase': self.phase, 'elapsed_s': round(now - self.t0, 3),
            'connections': len(self.conns),
            'established': sum(c.state != 'connecting' and not c.connect_failed
                               for c in self.conns),
            'bytes_sent': sum(c.sent for c in self.conns),
            'bytes_received': sum(c.received for c in self.conns),
            'received': [c.received for c in self.conns],
            'errors': sum(c.verifier.lost + c.verifier.duplicated + c.verifier.corrupt
                          + c.reset for c in self.conns),
            # the longest pauses so far: a harness reads them as the baseline before an event
            'max_recv_gap_ms': round(max((c.max_gap for c in self.conns), default=0) * 1000, 3),
            'max_send_block_ms': round(max((c.max_block for c in self.conns), default=0) * 1000, 3),
        }
        tmp = self.args.progress_file + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(status, f)
        os.replace(tmp, self.args.progress_file)

    def run(self):
        self.open_all()
        connect_deadline = self.t0 + self.args.connect_timeout
        while True:
            now = time.monotonic()
            if self.phase == 'sending' and self.should_stop_sending(now):
                self.stop_sending(now)
            if connect_deadline is not None and now > connect_deadline:
                connect_deadline = None
                for conn in self.conns:
                    if conn.state == 'connecting':
                        self.fail_connect(conn, errno.ETIMEDOUT)
            if not self.unclosed or (
                    self.phase == 'draining' and now >= self.drain_deadline):
                break
            timeout = self.update_throttled(now)
            self.write_progress(now)
            for key, mask in self.sel.select(timeout):
                conn, now = key.data, time.monotonic()
                if conn.state == 'connecting':
                    self.on_connected(conn, now)
                    continue
                if mask & selectors.EVENT_READ:
                    self.on_read(conn, now)
                if (mask & selectors.EVENT_WRITE and conn.state == 'open'
                        and self.phase == 'sending'):
                    self.on_write(conn, now)
        self.phase = 'done'
        self.next_progress = 0.0
        self.write_progress(time.monotonic())
        for conn in self.conns:
            if conn.state != 'closed':
                conn.verifier.feed(b'', final=True)
                self.close(conn)
        return self.result(time.monotonic())

    def result(self, now):
        cs = self.conns
        rep = {
            'connections': len(cs),
            'established': sum(not c.connect_failed for c in cs),
            'bytes_sent': sum(c.sent for c in cs),
            'bytes_received': sum(c.received for c in cs),
            'bytes_verified': sum(c.verifier.verified for c in cs),
            'lost_bytes': sum(c.verifier.lost for c in cs),
            'duplicated_bytes': sum(c.verifier.duplicated for c in cs),
            'corrupt_bytes': sum(c.verifier.corrupt for c in cs),
            'resets': sum(c.reset for c in cs),
            'early_fins': sum(c.early_fin for c in cs),
            'connect_failures': sum(c.connect_failed for c in cs),
            'errors': sum(c.error is not None and not c.reset and not c.connect_failed
                          for c in cs),
            'unclosed': sum(not c.eof and not c.reset and not c.connect_failed
                            and c.error is None for c in cs),
            'max_recv_gap_ms': round(max((c.max_gap for c in cs), default=0) * 1000, 3),
            'max_send_block_ms': round(max((c.max_block for c in cs), default=0) * 1000, 3),
            'duration_s': round(now - self.t0, 3),
        }
        rep['max_stall_ms'] = max(rep['max_recv_gap_ms'], rep['max_send_block_ms'])
        rep['ok'] = not any(rep[k] for k in (
            'lost_bytes', 'duplicated_bytes', 'corrupt_bytes', 'resets', 'early_fins',
            'connect_failures', 'errors'))
        if self.args.per_connection:
            rep['per_connection'] = [c.report() for c in cs]
        return rep


def parse_endpoint(text):
    """'HOST:PORT' or '[V6ADDR]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(':')
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f'expected HOST:PORT, got {text!r}')
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    return host, int(port)


def raise_fd_limit(need):
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--connect', required=True, help='HOST:PORT or [V6]:PORT')
    ap.add_argument('--connections', type=int, default=1)
    ap.add_argument('--seconds', type=float, default=10.0, help='sending time at most')
    ap.add_argument('--until-file', help='stop sending as soon as this file exists')
    ap.add_argument('--drain-seconds', type=float, default=10.0,
                    help='after SHUT_WR, wait this long at most for the server to close')
    ap.add_argument('--connect-timeout', type=float, default=10.0)
    ap.add_argument('--rate-mbps', type=float, default=None, help='send rate limit')
    ap.add_argument('--rate-scope', choices=('total', 'connection'), default='total',
                    help='whether --rate-mbps is for all connections or for each')
    ap.add_argument('--progress-file', help='rewritten with a JSON status every 100 ms')
    ap.add_argument('--json', action='store_true', help='print one JSON object at the end')
    ap.add_argument('--per-connection', action='store_true',
                    help='include per_connection in the JSON')
    args = ap.parse_args(argv)
    if not 1 <= args.connections <= MAX_CONN_ID + 1:
        ap.error(f'--connections must be 1..{MAX_CONN_ID + 1}')
    parse_endpoint(args.connect)
    raise_fd_limit(args.connections + 64)
    rep = Peer(args).run()
    if args.json:
        print(json.dumps(rep), flush=True)
    else:
        for k, v in rep.items():
            if k != 'per_connection':
                print(f'{k}: {v}')
    return 0 if rep['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
