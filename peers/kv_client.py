#!/usr/bin/env python3
"""The unmodified peer of the KV service: plain sockets, standard library only.

N connections, each sending a seeded pseudo-random sequence of SET/GET/INCR/SUM requests
at a steady pace and checking every reply against its own model of the server's state:
a request lost or applied twice, or a reply lost or repeated, makes a mismatch.

    python3 peers/kv_client.py --connect HOST:PORT --connections N --seconds S --seed X --json
"""

import argparse
import json
import random
import socket
import sys
import threading
import time


def model_apply(store, line):
    parts = line.split(" ")
    op = parts[0]
    if op == "SET":
        store[parts[1]] = parts[2]
        return "OK"
    if op == "GET":
        return f"VALUE {store[parts[1]]}" if parts[1] in store else "NONE"
    if op == "INCR":
        n = int(store.get(parts[1], "0")) + 1
        store[parts[1]] = str(n)
        return f"INT {n}"
    total = 0
    for v in store.values():
        try:
            total += int(v)
        except ValueError:
            pass
    return f"INT {total}"


def requests(rng):
    keys = [f"k{i}" for i in range(8)]
    while True:
        r = rng.random()
        k = rng.choice(keys)
        if r < 0.4:
            yield f"INCR {k}"
        elif r < 0.6:
            yield f"SET {k} {rng.randrange(1000)}"
        elif r < 0.9:
            yield f"GET {k}"
        else:
            yield "SUM"


def session(i, args, out):
    rng = random.Random(args.seed * 100003 + i)
    host, port = args.connect.rsplit(":", 1)
    host = host.strip("[]")
    stats = {"requests": 0, "replies_verified": 0, "mismatches": 0, "resets": 0,
             "max_gap_ms": 0.0, "bytes_verified": 0}
    try:
        sock = socket.create_connection((host, int(port)), timeout=30)
    except OSError as exc:
        stats["error"] = f"connect: {exc}"
        out[i] = stats
        return
    sock.settimeout(30)
    expected = []          # replies still owed, in order
    lock = threading.Lock()
    done = threading.Event()
    model = {}

    def reader():
        buf = b""
        last = time.monotonic()
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                now = time.monotonic()
                stats["max_gap_ms"] = max(stats["max_gap_ms"], (now - last) * 1000)
                last = now
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    with lock:
                        want = expected.pop(0) if expected else None
                    if line.decode() == want:
                        stats["replies_verified"] += 1
                        stats["bytes_verified"] += len(line) + 1
                    else:
                        stats["mismatches"] += 1
                        stats.setdefault("first_mismatch", (line.decode(), want))
                if done.is_set() and not expected:
                    break
        except ConnectionResetError:
            stats["resets"] += 1
        except OSError as exc:
            stats["error"] = str(exc)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    gen = requests(rng)
    end = time.monotonic() + args.seconds
    try:
        while time.monotonic() < end:
            line = next(gen)
            with lock:
                expected.append(model_apply(model, line))
            sock.sendall((line + "\n").encode())
            stats["requests"] += 1
            time.sleep(args.pace)
    except ConnectionResetError:
        stats["resets"] += 1
    except OSError as exc:
        stats["error"] = str(exc)
    done.set()
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline:
        with lock:
            if not expected:
                break
        time.sleep(0.01)
    with lock:
        stats["missing_replies"] = len(expected)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    t.join(5)
    sock.close()
    out[i] = stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", required=True)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pace", type=float, default=0.002, help="seconds between requests")
    ap.add_argument("--drain", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = [None] * args.connections
    threads = [threading.Thread(target=session, args=(i, args, out)) for i in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = {"connections": args.connections}
    for key in ("requests", "replies_verified", "mismatches", "resets", "bytes_verified", "missing_replies"):
        total[key] = sum(s.get(key, 0) for s in out)
    total["errors"] = [s["error"] for s in out if "error" in s]
    total["max_gap_ms"] = round(max(s["max_gap_ms"] for s in out), 1)
    firsts = [s["first_mismatch"] for s in out if "first_mismatch" in s]
    if firsts:
        total["first_mismatch"] = firsts[0]
    ok = not total["mismatches"] and not total["resets"] and not total["errors"] and not total["missing_replies"]
    total["ok"] = ok
    print(json.dumps(total) if args.json else total)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
