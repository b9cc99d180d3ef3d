#!/usr/bin/env python3
"""Benchmark: the steady-state cost of protection, protected against unprotected, same run.

The KV service (checkpointd/apps/kv.py) on host A behind the virtual IP, once registered
with the agent (every reply batch committed to etcd, the ACK gate up) and once without
(``--no-agent``), each driven by peers/kv_client.py in closed loop (one request in flight
per connection) from the peer namespace for the same time. Prints requests/s and p50/p99
latency for both, and their ratio. Needs root (namespaces, its own etcd).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointd.cluster import ROOT, Cluster, raise_fd_limit, wait_for  # noqa: E402
from kernel import netns  # noqa: E402
from kernel.topology import Topology  # noqa: E402


def measure(cluster, topo, port, connections, seconds):
    out = cluster.workdir / f"kv-{port}.json"
    proc = cluster.spawn(topo.peer, f"kv-client-{port}", [
        sys.executable, str(ROOT / "peers" / "kv_client.py"), "--connect", f"{topo.vip4}:{port}",
        "--connections", str(connections), "--seconds", str(seconds), "--closed-loop", "--json"],
        stdout=open(out, "wb"))
    proc.popen.wait(timeout=seconds + 60)
    return json.loads(out.read_text().strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    raise_fd_limit()
    with Topology.create(extra=("etcd1",)) as topo, tempfile.TemporaryDirectory() as d:
        cluster = Cluster(topo, Path(d))
        try:
            cluster.start_etcd()
            cluster.write_key()
            cluster.start_agent(topo.origin, "a")
            cluster.wait_role("a", "primary")
            sock = str(cluster.app_socket("a"))
            cluster.spawn(topo.origin, "kv-protected", [
                sys.executable, "-m", "checkpointd.apps.kv", "--listen", f"{topo.vip4}:7070",
                "--agent", sock], cwd=str(ROOT))
            cluster.spawn(topo.origin, "kv-plain", [
                sys.executable, "-m", "checkpointd.apps.kv", "--listen", f"{topo.vip4}:7071",
                "--no-agent"], cwd=str(ROOT))
            wait_for(lambda: ":7070 " in netns.run(topo.origin, ["ss", "-Hltn"]).stdout
                     and ":7071 " in netns.run(topo.origin, ["ss", "-Hltn"]).stdout, 20, "listening")
            plain = measure(cluster, topo, 7071, args.connections, args.seconds)
            protected = measure(cluster, topo, 7070, args.connections, args.seconds)
            status = cluster.status("a")
        finally:
            cluster.stop_all()
    row = {"connections": args.connections, "seconds": args.seconds,
           "protected_rps": protected.get("requests_per_s"), "unprotected_rps": plain.get("requests_per_s"),
           "protected_p50_ms": protected.get("p50_ms"), "unprotected_p50_ms": plain.get("p50_ms"),
           "protected_p99_ms": protected.get("p99_ms"), "unprotected_p99_ms": plain.get("p99_ms"),
           "checkpoints": status["counters"]["checkpoints"], "commit_batches": status["counters"]["commit_batches"],
           "verified_ok": bool(protected.get("ok") and plain.get("ok"))}
    if row["protected_rps"] and row["unprotected_rps"]:
        row["rps_ratio"] = round(row["protected_rps"] / row["unprotected_rps"], 3)
    print(json.dumps(row) if args.json else row)
    return 0 if row["verified_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
