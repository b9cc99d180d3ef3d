#!/usr/bin/env python3
"""Benchmark: fail-over at several connection counts (lease TTL 1 s by default).

For each N it runs one drill (checkpointd/drill.py: the primary crashed under load, every
byte checked) and prints its figures: max_gap_ms (the longest pause a peer saw),
detection_ms, takeover_ms, restore_ms, and the loss counters, which must be zero. The
baseline in the same run is the lease TTL itself: no fail-over can be detected sooner.
Needs root (namespaces tcpcp-*, its own etcd).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointd import drill  # noqa: E402
from checkpointd.cluster import raise_fd_limit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 20, 100])
    ap.add_argument("--lease-ttl", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    raise_fd_limit()
    rows = []
    for n in args.connections:
        r = drill.run(n, seed=args.seed, lease_ttl=args.lease_ttl, duration=args.duration,
                      http_rate=max(200_000, 2_000_000 * 10 // max(10, n)))
        rows.append({k: r.get(k) for k in (
            "connections", "resurrected", "bytes_verified", "lost_bytes", "duplicated_bytes",
            "resets", "max_gap_ms", "detection_ms", "takeover_ms", "restore_ms", "lease_ttl_s")})
        rows[-1]["target_max_gap_ms"] = args.lease_ttl * 1000 + 700
        print(json.dumps(rows[-1]) if args.json else rows[-1], flush=True)
    ok = all(r["lost_bytes"] == 0 and r["duplicated_bytes"] == 0 and r["resets"] == 0
             and r["resurrected"] == r["connections"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
