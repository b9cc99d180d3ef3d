#!/usr/bin/env python3
"""Benchmark: bulk transfer into a committing Python receiver, with and without the ACK gate.

The peer (peers/bulk_sender.py, a plain socket program) sends as fast as it can for a
few seconds to a Python receiver on the origin, which reads with recv_into and commits
its input offset every ``--commit-ms`` milliseconds. Gated, each commit raises the
connection's commit offset in the gate's map and sends the pure ACK carrying it; the
peer can only ever have the uncommitted bytes in flight. Ungated, the same receiver
does the same work minus the gate. Both runs use the same network in the same process,
one after the other; the receiver guards the connection before the peer may send (the
peer waits for a greeting line), so every byte of the gated run is gated. Prints one
JSON object with --json:

    commit_ms, gated_mbps, ungated_mbps, ratio (gated / ungated),
    rtt_ms_gated, rtt_ms_ungated    the peer's smoothed RTT (the gate delays its ACKs)
    commit_us_median                one map update (the commit itself), under load
    ack_us_median                   the pure ACK that follows it, under load
    peer_cwnd_*, peer_sndbuf_*, peer_limits_*   why the peer sends no faster
    retrans_*, clamped, sack_stripped

The peer must keep every uncommitted byte, so gated throughput is bounded by what it
can have unacknowledged (its send buffer, its congestion window) per commit interval.
--peer-wmem raises the peer host's send buffer limit, --path-mbit puts a bottleneck
link (tbf) before the origin, --loss drops TCP frames on the bridge: each shows one side
of that bound (docs/ackgate.md has the figures).

MB/s here is 10^6 bytes per second. Needs root: it builds its own namespaces
(tcpcp-<tag>-*) and removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernel import ackgate, netns  # noqa: E402
from kernel.topology import Topology  # noqa: E402

PORT = 7300
SENDER = ROOT / "peers" / "bulk_sender.py"


def receive(topo: Topology, gate: ackgate.Gate | None, commit_ms: float, seconds: float,
            family: int) -> dict:
    """One transfer; the receiver's figures and the peer's report."""
    addr = topo.vip4 if family == 4 else topo.vip6
    with netns.enter(topo.origin):
        lsock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, PORT))
    lsock.listen(1)
    target = f"{addr}:{PORT}" if family == 4 else f"[{addr}]:{PORT}"
    peer = netns.popen(topo.peer, [sys.executable, str(SENDER), "--connect", target,
                                   "--seconds", str(seconds), "--greeting"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lsock.settimeout(10)
        conn, _ = lsock.accept()
        lsock.close()
        guard = gate.guard_socket(conn) if gate is not None else None
        conn.sendall(b"go\n")
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        total, commits, commit_ns, ack_ns = 0, 0, [], []
        interval = commit_ms / 1000.0
        first = None
        next_commit = time.monotonic() + interval
        conn.setblocking(False)
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        deadline = time.monotonic() + seconds + 15
        while True:
            # Never block past the next commit: a receiver that waits for input while
            # holding uncommitted input deadlocks against the gate (the peer can send
            # nothing more until that input is committed and acknowledged).
            now = time.monotonic()
            if now >= next_commit:
                # The commit: here the application would make its state durable first.
                if guard is not None and total:
                    t0 = time.perf_counter_ns()
                    if guard.commit_at(total, ack=False):
                        t1 = time.perf_counter_ns()
                        guard.send_ack()
                        t2 = time.perf_counter_ns()
                        commit_ns.append(t1 - t0)
                        ack_ns.append(t2 - t1)
                commits += 1
                next_commit = now + interval
            if now > deadline:
                raise TimeoutError(f"transfer not finished after {seconds + 15} s")
            if not poller.poll(max(0, (next_commit - now) * 1000)):
                continue
            try:
                n = conn.recv_into(view)
            except BlockingIOError:
                continue
            if not n:
                break
            if first is None:
                first = time.monotonic()
            total += n
        elapsed = time.monotonic() - first
        if guard is not None:
            guard.commit_at(total + 1)   # all input and the EOF
            stats = guard.remove()
        else:
            stats = None
        conn.close()
        out, err = peer.communicate(timeout=30)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    if peer.returncode != 0:
        raise RuntimeError(f"peer failed ({peer.returncode}): {err.strip()} {out.strip()}")
    report = json.loads(out)
    return {"bytes": total, "seconds": elapsed, "mbps": total / elapsed / 1e6,
            "rtt_ms": report["rtt_ms"], "retrans": report["retrans"],
            "cwnd": report["cwnd"], "sndbuf": report["sndbuf"],
            "limits": {k: report.get(k) for k in ("busy_ms", "rwnd_limited_ms",
                                                  "sndbuf_limited_ms")},
            "commits": commits,
            "commit_us_median": statistics.median(commit_ns) / 1000 if commit_ns else None,
            "ack_us_median": statistics.median(ack_ns) / 1000 if ack_ns else None,
            "stats": stats}


def loss_rules(percent: float) -> str:
    """nftables: drop ``percent`` % of TCP frames crossing the bridge (no netem here)."""
    return ("table bridge tcpcp_loss {\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"    meta l4proto tcp numgen random mod 1000 < {int(percent * 10)} counter drop\n"
            "  }\n"
            "}\n")


def run(commit_ms: float, seconds: float, family: int, peer_wmem: int | None = None,
        path_mbit: float | None = None, loss: float = 0, log=lambda m: None) -> dict:
    topo = Topology.create()
    try:
        if loss:
            netns.run(topo.bridge, ["nft", "-f", "-"], input=loss_rules(loss))
        if path_mbit:
            # A bottleneck link towards the origin (a WAN, say): tbf on the bridge port.
            netns.run(topo.bridge, ["tc", "qdisc", "add", "dev", "v-a", "root", "tbf", "rate",
                                    f"{path_mbit}mbit", "burst", "512kb", "latency", "20ms"])
        if peer_wmem:
            low, default, _ = netns.sysctl(topo.peer, "net.ipv4.tcp_wmem").split()
            netns.sysctl(topo.peer, "net.ipv4.tcp_wmem", f"{low} {default} {peer_wmem}")
        vip = topo.vip4 if family == 4 else topo.vip6
        topo.add_vip(topo.origin, vip)
        with netns.enter(topo.origin):
            gate = ackgate.Gate.open([topo.ifname])
        try:
            log(f"gated, commit every {commit_ms} ms, {seconds} s")
            gated = receive(topo, gate, commit_ms, seconds, family)
        finally:
            with netns.enter(topo.origin):
                gate.close()
        log("ungated")
        ungated = receive(topo, None, commit_ms, seconds, family)
    finally:
        topo.destroy()
    st = gated["stats"]
    return {
        "commit_ms": commit_ms,
        "family": family,
        "peer_wmem_max": peer_wmem,
        "path_mbit": path_mbit,
        "loss_percent": loss,
        "seconds": seconds,
        "gated_mbps": round(gated["mbps"], 1),
        "ungated_mbps": round(ungated["mbps"], 1),
        "ratio": round(gated["mbps"] / ungated["mbps"], 3),
        "rtt_ms_gated": gated["rtt_ms"],
        "rtt_ms_ungated": ungated["rtt_ms"],
        "retrans_gated": gated["retrans"],
        "retrans_ungated": ungated["retrans"],
        "peer_cwnd_gated": gated["cwnd"], "peer_cwnd_ungated": ungated["cwnd"],
        "peer_sndbuf_gated": gated["sndbuf"], "peer_sndbuf_ungated": ungated["sndbuf"],
        "peer_limits_gated": gated["limits"], "peer_limits_ungated": ungated["limits"],
        "commits": gated["commits"],
        "commit_us_median": round(gated["commit_us_median"], 1) if gated["commit_us_median"] else None,
        "ack_us_median": round(gated["ack_us_median"], 1) if gated["ack_us_median"] else None,
        "clamped": st.clamped if st else None,
        "sack_stripped": st.sack_stripped if st else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit-ms", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each transfer")
    ap.add_argument("--ipv6", action="store_true")
    ap.add_argument("--peer-wmem", type=int, default=None,
                    help="raise the peer host's net.ipv4.tcp_wmem maximum (bytes); default: "
                         "leave the peer as it is")
    ap.add_argument("--path-mbit", type=float, default=None,
                    help="limit the path to the origin to this rate (tbf on the bridge)")
    ap.add_argument("--loss", type=float, default=0, help="percent of TCP frames dropped on the bridge")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    log = (lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    result = run(args.commit_ms, args.seconds, 6 if args.ipv6 else 4, args.peer_wmem,
                 args.path_mbit, args.loss, log)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:18} {value}")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/ackgate.py needs root (it creates network namespaces)")
    sys.exit(main())
