#!/usr/bin/env python3
"""Benchmark: fail-over at several connection counts (lease TTL 1 s by default).

For each N it runs one drill (checkpointd/drill.py: the primary crashed under load, every
byte checked) and prints its figures: max_gap_ms (the longest pause a peer saw),
detection_ms, takeover_ms, restore_ms, and the loss counters, which must be zero. The
baseline in the same run is the lease TTL itself: no fail-over can be detected sooner.
Also per row: http_max_gap_ms and kv_max_gap_ms (which side the gap was on), resumed_ms
(crash -> connections activated on b; what follows is the peers' side: b's agent handing
the connections over, the applications' first sends, the peers' retransmissions), the
resurrection's probe/restore/activate ms, and the load used. The baseline beside the
pauses: baseline_http_max_gap_ms and baseline_kv_max_gap_ms, the longest pauses the same
peers saw in the 5 s before the fault, under the same load, in the same run.

``--fault switchover`` (``resurrect switchover --to b``): the connections are passed live
(checkpointd/switchover.py); ``passed_live`` counts them, ``switchover`` holds the
origin's phases (ms from the decision: frozen, isolated, dumped, probed, sealed,
accepted by b), and b's ``resumed_ms`` is when it had activated them.

The load per connection shrinks as N grows (``http_rate``, ``kv_rate``, ``duration``): one
2-core machine runs both hosts, etcd and the peers, and a drill measures the fail-over, not
queues of an overloaded host. Beyond 50 downloads the drill fetches them with one
``peers/http_fetch.py`` instead of one curl each. 1000 connections: 500 downloads at
40 kB/s (20 MB/s) and 500 KV sessions at 2 requests/s, 12 s each.
Needs root (namespaces tcpcp-*, its own etcd).
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointd import drill  # noqa: E402
from checkpointd.cluster import raise_fd_limit  # noqa: E402


HTTP_TOTAL = 20_000_000   # bytes/s of all downloads together, at most, beyond 100 connections
KV_TOTAL = 1_000         # requests/s of all KV sessions together, beyond 20 connections


def http_rate(n: int) -> int:
    """Bytes/s per download: 2 MB/s for a few, 200 kB/s from 100 connections, and for more
    at most HTTP_TOTAL together (a 2-core machine serves both hosts and the peer)."""
    n_http = max(1, n // 2)
    return min(max(200_000, 2_000_000 * 10 // max(10, n)), max(20_000, HTTP_TOTAL // n_http))


def kv_rate(n: int) -> float | None:
    """Requests/s per KV session: kv_client.py's default (500) up to 20 connections (the
    default drill's load), then KV_TOTAL together (20/s each at 100, 2/s at 1000). At the
    default rate 50 sessions offer 25 000 requests/s, more than this machine serves: the
    replies queue for seconds before and after the crash, and max_gap_ms would measure
    that queue, not the fail-over. Every KV request is a commit, and the agent's commit
    latency (the ACK gate's delay, which the peers' retransmission timers learn) grows
    with the commits per round: at 1000 connections 4/s each made it ~0.4-1.3 s and the
    KV gap 6-7 s, 2/s made it ~0.2-0.3 s and the gap ~2 s."""
    n_kv = n - max(1, n // 2)
    return None if n <= 20 or not n_kv else min(500.0, max(1.0, KV_TOTAL / n_kv))


def duration(n: int, at_least: float) -> float:
    """Seconds of traffic per connection: hundreds of connections take seconds to start
    and to have their first checkpoint durable, and every one must still be running when
    the primary crashes (12 s at 1000)."""
    return max(at_least, 0.012 * n)


def _resurrection(events: list[str]) -> dict:
    """probe/restore/activate ms and the records' preparation time from b's timeline."""
    out = {}
    for text in events:
        m = re.match(r"resurrected \d+ connections .*: probe ([\d.]+) ms, restore ([\d.]+) ms, "
                     r"activate ([\d.]+) ms", text)
        if m:
            out.update(probe_ms=float(m[1]), restore_only_ms=float(m[2]), activate_ms=float(m[3]))
        m = re.match(r"prepared \d+ connections .* in ([\d.]+) ms", text)
        if m:
            out["prepare_ms"] = float(m[1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 20, 100])
    ap.add_argument("--lease-ttl", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--keep", metavar="DIR", help="keep every drill's logs and the agents' status "
                    "in DIR/N (the drill's --keep)")
    ap.add_argument("--fault", choices=("crash", "switchover"), default="crash",
                    help="crash (the fail-over; target TTL + 700 ms at 100) or switchover "
                         "(resurrect switchover --to b, no crash; target 200 ms)")
    ap.add_argument("--http-rate", type=int, default=None,
                    help="bytes/s per download instead of the per-N default (http_rate)")
    ap.add_argument("--kv-rate", type=float, default=None,
                    help="requests/s per KV session instead of the per-N default (kv_rate)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    raise_fd_limit()
    rows = []
    for n in args.connections:
        h_rate = args.http_rate or http_rate(n)
        k_rate = args.kv_rate or kv_rate(n)
        r = drill.run(n, seed=args.seed, lease_ttl=args.lease_ttl, duration=duration(n, args.duration),
                      http_rate=h_rate, kv_rate=k_rate, fault=args.fault,
                      keep=str(Path(args.keep) / str(n)) if args.keep else None)
        rows.append({k: r.get(k) for k in (
            "connections", "resurrected", "passed_live", "bytes_verified", "lost_bytes",
            "duplicated_bytes", "resets", "max_gap_ms", "http_max_gap_ms", "kv_max_gap_ms",
            "baseline_http_max_gap_ms", "baseline_kv_max_gap_ms", "detection_ms",
            "takeover_ms", "restore_ms", "resumed_ms", "lease_ttl_s")})
        rows[-1]["target_max_gap_ms"] = 200 if args.fault == "switchover" else args.lease_ttl * 1000 + 700
        rows[-1]["fault"] = args.fault
        rows[-1].update(_resurrection(r.get("events_b", [])), http_rate=h_rate, kv_rate=k_rate,
                        duration_s=duration(n, args.duration),
                        http_problems=len(r.get("http_problems", [])), kv_ok=(r.get("kv") or {}).get("ok"))
        if r.get("switchover"):
            rows[-1]["switchover"] = r["switchover"]
        if r.get("http_problems") or (r.get("kv") or {}).get("errors"):
            rows[-1].update(first_http_problems=r["http_problems"][:3],
                            first_kv_errors=(r.get("kv") or {}).get("errors", [])[:3])
        print(json.dumps(rows[-1]) if args.json else rows[-1], flush=True)
    ok = all(r["lost_bytes"] == 0 and r["duplicated_bytes"] == 0 and r["resets"] == 0
             and r["resurrected"] + (r["passed_live"] or 0) == r["connections"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
