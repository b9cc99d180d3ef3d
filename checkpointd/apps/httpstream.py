"""A deterministic HTTP/1.1 download service protected by checkpointd (the drill's (a)).

``GET /stream?len=N&seed=S[&rate=R]`` answers ``200`` with ``Content-Length: N``; the
body byte at offset i is a function of (S, i) only (``body``: SHAKE-128 of ``"S:k"`` for
4 KiB block k), sent at R bytes/s if given (so that a drill download lasts seconds).
curl downloads it unmodified. One request per connection (``Connection: close``).

Why it needs no output log: the whole response, headers included, is a function of the
parsed request, so the state is just that request (``len``, ``seed``, ``rate``, the header
length and where the request ended in the input stream) and the output is regenerable
from any offset. The connection registers with ``regenerable=True``; it commits once the
request is read (input I = the request's length, output 0) and then every 50 ms or
256 KiB with O = the response offset sent so far (every 50 ms x N/25 with N > 25
connections open: see ``commit_every``). After a fail-over the standby's copy
gets the state and O back, regenerates the response from O, and the library drops the
first D bytes (the peer has them): the response continues exactly.

    python -m checkpointd.apps.httpstream --listen ADDR:PORT --agent /run/tcpcp/app.sock
    python -m checkpointd.apps.httpstream --listen ADDR:PORT --no-agent     (baseline)
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse

from . import Server, main as _main

BLOCK = 4096                  # body generator block
CHUNK = 64 << 10              # bytes per send
MIN_SEND = 4096              # paced sends wait for at least this much budget
COMMIT_EVERY = 0.05           # seconds between commits while sending ...
COMMIT_BYTES = 256 << 10      # ... or bytes, whichever comes first
COMMIT_SHARE = 25             # connections beyond which the period grows with their number
MAX_REQUEST = 8192            # request line + headers
MAX_LEN = 1 << 40
DEFAULT_LEN = 1 << 20


def body(seed: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of the body for ``seed`` (pure, ~250 MB/s)."""
    if length <= 0:
        return b""
    first, last = offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK
    out = bytearray()
    for k in range(first, last):
        out += hashlib.shake_128(b"%d:%d" % (seed, k)).digest(BLOCK)
    start = offset - first * BLOCK
    return bytes(out[start:start + length])


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


def headers(length: int, status: int = 200) -> bytes:
    """The response head (no Date header: it must be the same bytes when regenerated)."""
    ctype = "application/octet-stream" if status == 200 else "text/plain"
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def _error_body(status: int) -> bytes:
    return f"{status} {_REASONS[status]}\n".encode()


def error_state(status: int, request_end: int) -> dict:
    b = _error_body(status)
    return {"status": status, "len": len(b), "seed": 0, "rate": 0,
            "hlen": len(headers(len(b), status)), "in": request_end}


def parse_request(head: bytes, request_end: int) -> dict:
    """The state for a request whose head (up to the blank line) is ``head`` and which
    ends at input offset ``request_end``. Bad requests get an error response's state."""
    def error(status):
        return error_state(status, request_end)
    try:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, version = line.split(" ")
    except ValueError:
        return error(400)
    if not version.startswith("HTTP/1."):
        return error(400)
    if method != "GET":
        return error(405)
    url = urllib.parse.urlsplit(target)
    if url.path != "/stream":
        return error(404)
    q = urllib.parse.parse_qs(url.query)
    try:
        length = int(q.get("len", [DEFAULT_LEN])[0])
        seed = int(q.get("seed", [0])[0])
        rate = int(q.get("rate", [0])[0])
    except ValueError:
        return error(400)
    if not (0 <= length <= MAX_LEN and 0 <= seed < 1 << 63 and rate >= 0):
        return error(400)
    return {"status": 200, "len": length, "seed": seed, "rate": rate,
            "hlen": len(headers(length)), "in": request_end}


def response(st: dict, offset: int, n: int) -> bytes:
    """Bytes [offset, offset + n) of the whole response (head, then body) for state ``st``."""
    head = headers(st["len"], st["status"])
    out = head[offset:offset + n]
    if len(out) < n:
        b = max(0, offset - len(head))
        want = min(n - len(out), st["len"] - b)
        if st["status"] == 200:
            out += body(st["seed"], b, want)
        else:
            out += _error_body(st["status"])[b:b + want]
    return out


def encode_state(st: dict) -> bytes:
    return json.dumps(st, separators=(",", ":"), sort_keys=True).encode()


class HttpStream(Server):
    """A deterministic HTTP/1.1 download service protected by checkpointd."""

    name = "httpstream"
    regenerable = True

    def serve_conn(self, p) -> None:
        st = json.loads(p.state) if p.state else None
        if st is None:                       # the request is not in the state yet: read it
            raw = bytearray()
            while (end := raw.find(b"\r\n\r\n")) < 0:
                if len(raw) > MAX_REQUEST:
                    break
                self.wait_readable(p, quiescent=not raw)
                chunk = p.recv(4096)
                if not chunk:                # left before asking for anything
                    p.close()
                    return
                raw += chunk
            if len(raw) > MAX_REQUEST:
                st = error_state(431, p.input + len(raw))
            else:
                st = parse_request(bytes(raw[:end]), p.input + end + 4)
            p.commit(encode_state(st), input=st["in"], output=p.output)
        self.send_response(p, st, p.output)
        self.finish(p)

    def commit_every(self) -> float:
        """Seconds between commits while sending: COMMIT_EVERY, times N/COMMIT_SHARE with
        N > COMMIT_SHARE connections open, so that all of them together commit at most
        ~500 times a second. Each commit is a message the agent handles, and each agent
        round seals and writes to etcd the newest commit of every connection that has
        one: with 500 downloads committing every 50 ms every round carries all 500 and
        the commit latency (the peers' ACKs, the lease renewals sharing etcd) grows to a
        second. Nothing depends on a download's commits being fresh: its output is
        regenerated and the agent anchors each record at what the peer acknowledged."""
        return COMMIT_EVERY * max(1.0, len(self.handles) / COMMIT_SHARE)

    def send_response(self, p, st: dict, pos: int) -> None:
        """Send the response from offset ``pos`` (0, or the checkpoint's O after a
        resume: the library swallows what the peer has), committing as it goes."""
        state = encode_state(st)
        total = st["hlen"] + st["len"]
        rate = st["rate"]
        burst = max(4096, rate // 50)
        t0, w0 = time.monotonic(), p.write
        last_t, last_pos = t0, pos
        every = self.commit_every()
        while pos < total:
            self.check()
            n = min(CHUNK, total - pos)
            if rate:
                # pace on W: swallowed (discarded) bytes are free
                budget = burst + int((time.monotonic() - t0) * rate) - (p.write - w0)
                least = min(MIN_SEND, n)  # no dribble of 4-byte segments between ticks
                if budget < least:
                    # until the budget allows a send (stop and abandon interrupt it)
                    self.pause((least - budget) / rate + 0.001)
                    continue
                n = min(n, budget)
            end = pos + n
            if st["hlen"] < end < total:
                # end on a generator block: every block is hashed once, not once per send
                # that touches it (the bytes are the same, only the segments differ)
                aligned = end - (end - st["hlen"]) % BLOCK
                if aligned > pos:
                    n = aligned - pos
            data = response(st, pos, n)
            p.sendall(data)
            pos += n
            now = time.monotonic()
            if now - last_t >= every or pos - last_pos >= COMMIT_BYTES:
                p.commit(state, input=st["in"], output=pos)
                last_t, last_pos = now, pos
                every = self.commit_every()
        p.commit(state, input=st["in"], output=pos)


def main(argv=None) -> int:
    return _main(HttpStream, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
