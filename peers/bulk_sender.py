#!/usr/bin/env python3
"""The unmodified peer for bulk transfers: a plain socket program (standard library only).

It connects, sends as fast as the connection allows for a given time (or a given number
of bytes, from a seeded generator so a receiver can verify them), shuts its side down,
waits for the other side to close, and prints one JSON object: bytes sent, seconds,
the kernel's smoothed RTT and retransmission count for the connection, and how the
connection ended ("fin", "rst" or "timeout").

With --greeting it first waits for one line from the server, as a client of a protocol
with a banner would (the server can get ready before any input arrives).

Usage:
    python3 peers/bulk_sender.py --connect 10.77.0.100:7000 --seconds 2
    python3 peers/bulk_sender.py --connect [fd77::100]:7000 --bytes 8000000 --seed 7
"""

import argparse
import json
import random
import socket
import struct
import sys
import time

TCP_INFO = 11
CHUNK = 1 << 18


def limits(sock):
    """Milliseconds the connection was busy, limited by the receiver's window, limited by
    the send buffer (tcpi_busy_time, tcpi_rwnd_limited, tcpi_sndbuf_limited; the rest of
    the busy time it was limited by cwnd)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 192)
    if len(raw) < 192:
        return {}
    busy, rwnd, sndbuf = struct.unpack_from("=QQQ", raw, 168)
    return {"busy_ms": busy / 1000, "rwnd_limited_ms": rwnd / 1000,
            "sndbuf_limited_ms": sndbuf / 1000}


def tcp_info(sock):
    """(smoothed RTT in ms, total retransmissions, cwnd in segments) from struct tcp_info."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
    rtt_us = struct.unpack_from("=I", raw, 68)[0]      # tcpi_rtt
    cwnd = struct.unpack_from("=I", raw, 80)[0]        # tcpi_snd_cwnd
    total_retrans = struct.unpack_from("=I", raw, 100)[0]  # tcpi_total_retrans
    return rtt_us / 1000.0, total_retrans, cwnd


def data(nbytes, seed):
    """The bytes a receiver can regenerate: random.Random(seed).randbytes(nbytes)."""
    return random.Random(seed).randbytes(nbytes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", required=True, help="HOST:PORT or [V6]:PORT")
    ap.add_argument("--seconds", type=float, help="send for this long")
    ap.add_argument("--bytes", type=int, help="send exactly this many bytes (seeded)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the close")
    ap.add_argument("--greeting", action="store_true",
                    help="wait for the server's greeting (one line) before sending")
    args = ap.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(args.wait)
    sock.connect((host, int(port)))
    if args.greeting:
        line = b""
        while not line.endswith(b"\n"):
            got = sock.recv(1)
            if not got:
                print(json.dumps({"sent": 0, "end": "closed before greeting"}))
                return 1
            line += got
    start = time.monotonic()
    sent = 0
    if args.bytes is not None:
        sock.sendall(data(args.bytes, args.seed))
        sent = args.bytes
    else:
        block = b"\xa5" * CHUNK
        while time.monotonic() - start < args.seconds:
            sent += sock.send(block)
    rtt_ms, retrans, cwnd = tcp_info(sock)
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    limited = limits(sock)
    sock.shutdown(socket.SHUT_WR)
    end = "fin"
    reply = b""
    try:
        while True:
            got = sock.recv(65536)
            if not got:
                break
            reply += got
    except ConnectionResetError:
        end = "rst"
    except TimeoutError:
        end = "timeout"
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": sent, "seconds": elapsed, "rtt_ms": rtt_ms,
                      "retrans": retrans, "cwnd": cwnd, "sndbuf": sndbuf, **limited, "end": end, "reply": reply.decode(errors="replace")}))
    sock.close()
    return 0 if end == "fin" else 1


if __name__ == "__main__":
    sys.exit(main())
