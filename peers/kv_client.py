#!/usr/bin/env python3
"""The unmodified peer of the KV service (checkpointd.apps.kv): plain sockets, standard
library only, nothing imported from tcpcp.

N connections; each sends a seeded pseudo-random sequence of SET/GET/INCR/SUM requests
and checks every reply against its own model of the server's state. A request lost or
applied twice, or a reply lost, repeated or corrupted, makes a mismatch. Two modes:

- open loop (default): requests at a steady rate (``--rate`` per second per connection,
  or ``--pace`` seconds apart), sometimes several per write, sometimes one split over two
  writes, replies checked as they come (pipelined);
- ``--closed-loop``: one request in flight per connection; reports requests/s and the
  p50/p99 round-trip latency.

At the end each connection waits for its missing replies, half-closes, and expects a
clean end of stream. Prints one JSON object (``--json``) or a dict: connections, requests,
replies_verified, bytes_verified, mismatches, missing_replies, resets, errors,
max_gap_ms (longest wait for the next reply while replies were owed; max_gap_port and
max_gap_end say which connection, by local port, and when it ended, CLOCK_MONOTONIC),
gaps (the 50 longest waits over 20 ms as [ms, end]), ok. Exit status 0
only when every request got its expected reply.

    python3 peers/kv_client.py --connect HOST:PORT --connections N --seconds S --seed X --json
"""

import argparse
import collections
import json
import random
import socket
import sys
import threading
import time


GAP_KEEP_MS = 20.0   # waits longer than this are listed in the report ("gaps")

def model_apply(store, line):
    """The client's model of the server: the protocol's definition."""
    parts = line.split(" ")
    op = parts[0]
    if op == "SET" and len(parts) == 3:
        store[parts[1]] = parts[2]
        return "OK"
    if op == "GET" and len(parts) == 2:
        return "VALUE " + store[parts[1]] if parts[1] in store else "NONE"
    if op == "INCR" and len(parts) == 2:
        try:
            n = int(store.get(parts[1], "0")) + 1
        except ValueError:
            return "ERR not an integer"
        store[parts[1]] = str(n)
        return "INT %d" % n
    if op == "SUM" and len(parts) == 1:
        total = 0
        for v in store.values():
            try:
                total += int(v)
            except ValueError:
                pass
        return "INT %d" % total
    return "ERR bad request"


def requests(rng, keys=8):
    """An endless seeded request sequence."""
    names = ["k%d" % i for i in range(keys)]
    while True:
        r = rng.random()
        k = rng.choice(names)
        if r < 0.40:
            yield "INCR " + k
        elif r < 0.57:
            yield "SET %s %d" % (k, rng.randrange(1000))
        elif r < 0.60:
            yield "SET %s w%d" % (k, rng.randrange(100))   # not an integer: INCR says ERR
        elif r < 0.90:
            yield "GET " + k
        else:
            yield "SUM"


class Session:
    """One connection: a sender (the calling thread) and a reader checking replies."""

    def __init__(self, index, args):
        self.args = args
        self.rng = random.Random(args.seed * 100003 + index)
        self.stats = {"requests": 0, "replies_verified": 0, "bytes_verified": 0, "mismatches": 0,
                      "resets": 0, "max_gap_ms": 0.0, "missing_replies": 0}
        self.expected = collections.deque()   # replies owed, oldest first
        self.lock = threading.Lock()
        self.answered = threading.Condition(self.lock)   # no reply owed any more, or EOF
        self.progress = None   # when the oldest owed reply became due, or the last reply came
        self.eof = threading.Event()
        self.latencies = []
        self.gap_end = None
        self.where = None
        self.gaps = {}   # start of a wait of more than GAP_KEEP_MS -> (ms, end)

    def error(self, text):
        where = getattr(self, "where", None)
        self.stats.setdefault("error", "%s (%s)" % (text, where) if where else text)

    def run(self):
        host, _, port = self.args.connect.rpartition(":")
        try:
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self.args.timeout)
        except OSError as exc:
            self.error("connect: %s" % exc)
            return self.stats
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.where = "local port %d" % self.sock.getsockname()[1]
        except OSError:
            pass
        if self.args.closed_loop:
            self.closed_loop()
            self.sock.close()
            return self.stats
        reader = threading.Thread(target=self.read_loop, daemon=True)
        reader.start()
        try:
            self.send_loop()
        except ConnectionResetError:
            self.stats["resets"] += 1
        except OSError as exc:
            self.error("send: %s" % exc)
        # wait for the owed replies without polling: hundreds of sessions polling every
        # few ms starve a small machine exactly when the replies are late
        with self.answered:
            self.answered.wait_for(lambda: not self.expected or self.eof.is_set(), self.args.drain)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(self.args.drain)
        with self.lock:
            self.stats["missing_replies"] = len(self.expected)
            self.gap(time.monotonic())
        self.sock.close()
        return self.stats

    def send_loop(self):
        gen = requests(self.rng, self.args.keys)
        model = {}
        interval = 1.0 / self.args.rate
        start = time.monotonic()
        end = start + self.args.seconds
        due = start
        while True:
            now = time.monotonic()
            if now >= end or self.eof.is_set():
                return
            if due > now:
                time.sleep(due - now)
            burst = 1 + (self.rng.random() < 0.2) * self.rng.randrange(1, 3)
            lines = [next(gen) for _ in range(burst)]
            with self.lock:
                if not self.expected:
                    self.progress = time.monotonic()
                for line in lines:
                    self.expected.append(model_apply(model, line))
            data = "".join(line + "\n" for line in lines).encode()
            if self.rng.random() < 0.05 and len(data) > 2:    # a request split over two writes
                cut = self.rng.randrange(1, len(data) - 1)
                self.sock.sendall(data[:cut])
                time.sleep(0.001)
                data = data[cut:]
            self.sock.sendall(data)
            self.stats["requests"] += burst
            due += interval * burst

    def gap(self, now):
        """Record the wait since the last progress if replies are owed (lock held)."""
        if self.expected and self.progress is not None:
            gap = (now - self.progress) * 1000
            if gap > self.stats["max_gap_ms"]:
                self.stats["max_gap_ms"], self.gap_end = gap, now
            if gap > GAP_KEEP_MS:
                self.gaps[self.progress] = (gap, now)

    def check(self, line, want):
        text = line.decode("ascii", "replace")
        if text == want:
            self.stats["replies_verified"] += 1
            self.stats["bytes_verified"] += len(line) + 1
        else:
            self.stats["mismatches"] += 1
            self.stats.setdefault("first_mismatch", [text, want])

    def read_loop(self):
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                now = time.monotonic()
                if not data:
                    with self.lock:
                        if self.expected:
                            self.error("the server closed with %d replies owed" % len(self.expected))
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    with self.lock:
                        self.gap(now)
                        want = self.expected.popleft() if self.expected else None
                        self.progress = now
                        if not self.expected:
                            self.answered.notify_all()
                    self.check(line, want)
        except socket.timeout:
            self.error("no reply for %s s" % self.args.timeout)
        except ConnectionResetError:
            self.stats["resets"] += 1
        except OSError as exc:
            self.error("recv: %s" % exc)
        finally:
            self.eof.set()
            with self.lock:
                self.answered.notify_all()

    def closed_loop(self):
        gen = requests(self.rng, self.args.keys)
        model = {}
        end = time.monotonic() + self.args.seconds
        buf = b""
        try:
            while time.monotonic() < end:
                line = next(gen)
                want = model_apply(model, line)
                t0 = time.perf_counter()
                self.sock.sendall((line + "\n").encode())
                self.stats["requests"] += 1
                while b"\n" not in buf:
                    data = self.sock.recv(65536)
                    if not data:
                        self.stats["missing_replies"] += 1
                        self.error("the server closed with a reply owed")
                        return
                    buf += data
                reply, buf = buf.split(b"\n", 1)
                took = time.perf_counter() - t0
                self.latencies.append(took)
                self.stats["max_gap_ms"] = max(self.stats["max_gap_ms"], took * 1000)
                self.check(reply, want)
            self.sock.shutdown(socket.SHUT_WR)
            if self.sock.recv(65536) not in (b"",):
                self.stats["mismatches"] += 1
                self.stats.setdefault("first_mismatch", ["bytes after the last reply", None])
        except socket.timeout:
            self.error("no reply for %s s" % self.args.timeout)
        except ConnectionResetError:
            self.stats["resets"] += 1
        except OSError as exc:
            self.error("closed loop: %s" % exc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", required=True, metavar="HOST:PORT")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0, help="how long to send requests")
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second per connection")
    ap.add_argument("--pace", type=float, help="seconds between requests (instead of --rate)")
    ap.add_argument("--closed-loop", action="store_true",
                    help="one request in flight per connection; report latency percentiles")
    ap.add_argument("--keys", type=int, default=8, help="distinct keys per connection")
    ap.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the last replies")
    ap.add_argument("--timeout", type=float, default=60.0, help="socket timeout (s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.pace:
        args.rate = 1.0 / args.pace
    sessions = [Session(i, args) for i in range(args.connections)]
    out = [None] * len(sessions)

    def run(i):
        out[i] = sessions[i].run()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = {"connections": args.connections}
    for key in ("requests", "replies_verified", "bytes_verified", "mismatches", "missing_replies", "resets"):
        total[key] = sum(s[key] for s in out)
    total["errors"] = [s["error"] for s in out if "error" in s]
    total["max_gap_ms"] = round(max((s["max_gap_ms"] for s in out), default=0.0), 1)
    worst = max(sessions, key=lambda x: x.stats["max_gap_ms"], default=None)
    if worst is not None and worst.gap_end is not None:
        total["max_gap_port"] = int(worst.where.rsplit(" ", 1)[1]) if worst.where else None
        total["max_gap_end"] = round(worst.gap_end, 3)
    # the longest waits with when they ended (CLOCK_MONOTONIC), so that a caller can tell
    # the waits around an event from those of the same load before it
    longest = sorted((g for s in sessions for g in s.gaps.values()), reverse=True)[:50]
    total["gaps"] = [[round(ms, 1), round(end, 3)] for ms, end in longest]
    lat = sorted(x for s in sessions for x in s.latencies)
    if lat:
        total["requests_per_s"] = round(len(lat) / args.seconds, 1)
        total["p50_ms"] = round(lat[len(lat) // 2] * 1000, 3)
        total["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3)
    firsts = [s["first_mismatch"] for s in out if "first_mismatch" in s]
    if firsts:
        total["first_mismatch"] = firsts[0]
    total["ok"] = bool(total["requests"]) and total["replies_verified"] == total["requests"] and not (
        total["mismatches"] or total["missing_replies"] or total["resets"] or total["errors"])
    print(json.dumps(total) if args.json else total, flush=True)
    return 0 if total["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
