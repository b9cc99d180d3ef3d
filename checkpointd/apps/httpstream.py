"""A deterministic HTTP/1.1 download service, protected by checkpointd (the drill's (a)).

``GET /stream?len=N&seed=S&rate=R`` answers 200 with ``Content-Length: N``; the body byte
at offset i is a function of (S, i) only (``body``), sent at R bytes/s. curl downloads it
unmodified. The response (headers and body) is regenerable from any offset, so the state
is just the request, committed with output offset 0, and no output is logged; after a
fail-over the application continues the response at the offset the peer is missing.

    python -m checkpointd.apps.httpstream --listen ADDR:PORT --agent /run/tcpcp/app.sock
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import socket
import struct
import sys
import time
import urllib.parse

from checkpointd.app import AgentClient
from checkpointd.apps import serve_forever

BLOCK = 4096
COMMIT_EVERY = 0.05


def body(seed: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of the body for ``seed`` (SHAKE-128 blocks)."""
    out = bytearray()
    first, last = offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK
    for k in range(first, last):
        out += hashlib.shake_128(f"{seed}:{k}".encode()).digest(BLOCK)
    start = offset - first * BLOCK
    return bytes(out[start:start + length])


def headers(length: int) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def response(req: dict, offset: int, n: int) -> bytes:
    """Bytes [offset, offset + n) of the whole response (headers, then body)."""
    head = headers(req["len"])
    out = head[offset:offset + n]
    if len(out) < n:
        b = max(0, offset - len(head))
        out += body(req["seed"], b, min(n - len(out), req["len"] - b))
    return out


def parse_request(raw: bytes) -> dict:
    line = raw.split(b"\r\n", 1)[0].decode("latin-1")
    method, target, _ = line.split(" ", 2)
    if method != "GET":
        raise ValueError(f"method {method}")
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
    return {"len": int(q.get("len", ["1048576"])[0]), "seed": int(q.get("seed", ["0"])[0]),
            "rate": int(q.get("rate", ["0"])[0])}


def serve_one(p, req: dict | None, request_len: int, start: int) -> None:
    """Send the response from ``start`` on, committing every COMMIT_EVERY seconds."""
    total = len(headers(req["len"])) + req["len"]
    state = json.dumps(req).encode()
    offset = start
    rate = req["rate"] or 0
    began, sent0 = time.monotonic(), offset
    last_commit = 0.0
    while offset < total:
        n = min(64 << 10, total - offset)
        if rate:
            due = sent0 + int((time.monotonic() - began) * rate)
            if due <= offset:
                time.sleep(0.005)
                continue
            n = min(n, due - offset)
        p.sendall(response(req, offset, n))
        offset += n
        now = time.monotonic()
        if now - last_commit >= COMMIT_EVERY:
            p.commit(state, input=request_len, output=0)
            last_commit = now
    p.commit(state, input=request_len, output=0)


def handle(client: AgentClient, sock: socket.socket) -> None:
    p = client.register(sock, b"", regenerable=True)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = p.recv(4096)
        if not chunk:
            return
        raw += chunk
    request_len = raw.index(b"\r\n\r\n") + 4
    req = parse_request(raw)
    p.commit(json.dumps(req).encode(), input=request_len, output=0)
    serve_one(p, req, request_len, 0)
    _finish(p, sock)


def resume(p, state: bytes) -> None:
    p.regenerable = True
    req = json.loads(state)
    skip = p.take_discard()
    serve_one(p, req, p.resumed[0], p.resumed[1] + skip)
    _finish(p, p.sock)


def _finish(p, sock) -> None:
    # wait for the peer to take everything, then end on purpose (FIN allowed)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if struct.unpack("=i", fcntl.ioctl(sock.fileno(), 0x5411, b"\0" * 4))[0] == 0:
                break
            time.sleep(0.01)
        p.release()
    finally:
        sock.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="ADDR:PORT (the virtual IP)")
    ap.add_argument("--agent", required=True, help="the agent's application socket")
    args = ap.parse_args(argv)
    serve_forever(args.listen, args.agent, handle, resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
