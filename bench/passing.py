#!/usr/bin/env python3
"""Benchmark: pass N established connections under load from origin to destination.

Prints one JSON object (with --json) holding the peer's verdict (bytes verified, lost,
duplicated, resets, longest pause) and the per-connection costs: dump, restore, and, as
the baseline measured in the same run on the same path, a fresh connect and accept.
Needs root: it builds its own network namespaces (tcpcp-*) and removes them.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointd.cluster import raise_fd_limit  # noqa: E402
from kernel import livepass  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--ipv6", action="store_true", help="use the IPv6 virtual IP")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic before the pass")
    ap.add_argument("--after", type=float, default=1.5, help="seconds of traffic after the pass")
    ap.add_argument("--rate-mbps", type=float, default=None, help="peer's total send rate")
    ap.add_argument("--no-probe", action="store_true",
                    help="restore without learning the peer's acknowledged position first")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    raise_fd_limit()
    log = (lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    result = livepass.run(args.connections, family=6 if args.ipv6 else 4, warmup_s=args.warmup,
                          after_s=args.after, rate_mbps=args.rate_mbps,
                          learn_acked=not args.no_probe, log=log)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("connections", "passed", "bytes_verified", "lost_bytes", "duplicated_bytes",
                    "resets", "max_stall_ms", "pass_ms", "dump_us_median", "restore_us_median",
                    "reconnect_us_median"):
            print(f"{key:22} {result[key]}")
    ok = (result["passed"] == args.connections and not result["lost_bytes"]
          and not result["duplicated_bytes"] and not result["corrupt_bytes"] and not result["resets"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
