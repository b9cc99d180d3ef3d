"""Live passing between two hosts: the demonstration and benchmark driver.

Builds the topology (peer, origin A, destination B, bridge), serves the stream protocol on
the virtual IP from A, starts the unmodified peer (``peers/stream_peer.py``, a plain
socket program) with N connections sending and receiving at once, and in the middle of
the transfer passes every connection to B::

    origin A                                    destination B
    pause app, isolate all, dump all
    probe peers (A still has the VIP): learn L
    ICI + L + app state  ---------------------->  create all in repair mode (freebind)
    remove VIP                                    add VIP, gratuitous ARP / NA
                                                  activate all, app resumes at its offsets
    close silently, lift isolation

The endpoints exist on B before the VIP arrives, so B's kernel never meets a segment of
these connections without a socket (it would answer RST).

The peer checks every byte and reports loss, duplication, resets and its longest pause.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import netns, nudge, passing, probe, repair, vip
from .isolate import Isolation
from .streamapp import StreamServer, StreamState
from .topology import Topology

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "peers" / "stream_peer.py"
PORT = 7000


@dataclass
class PassResult:
    connections: int
    dump_us: list
    restore_us: list
    activate_us: list
    probed: int
    nudged: int
    pass_ms: float
    phases_ms: dict


def _listen(addr: str, port: int, family: int):
    import socket
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == 6:
        s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND: VIP may not be here yet
    else:
        s.setsockopt(socket.IPPROTO_IP, 15, 1)    # IP_FREEBIND
    s.bind((addr, port))
    s.listen(4096)
    return s


def pass_all(topo: Topology, origin_app: StreamServer, dest_app: StreamServer, vip_addr: str,
             origin_iso: Isolation, prober: probe.Prober | None, *,
             corrupt_one: bool = False) -> PassResult:
    """Move every connection of ``origin_app`` to ``dest_app`` (see the module diagram).

    If the destination refuses any record, everything is undone: the destination keeps
    nothing, the VIP stays on the origin, and the origin's connections resume.
    """
    timings = passing.Timings()
    phases = {}
    t0 = time.perf_counter()

    def mark(name):
        phases[name] = round((time.perf_counter() - t0) * 1000, 3)

    conns = origin_app.detach_all()
    mark("app_paused")
    def ts_for(ici):  # the clock the restored socket will run: never behind the probe's
        return repair.advanced_timestamp(ici.ts_val, time.time_ns() - ici.dump_time_ns
                                         + repair.DEFAULT_TS_SKEW_NS)

    def ask(i, ici):  # A still holds the VIP: the answers come here, while A dumps on
        prober.send(i, ici, ts_for(ici))

    with netns.enter(topo.origin):
        if prober is not None:
            prober.begin()
        exported = passing.export([(s, st.to_bytes()) for s, st in conns], origin_iso, timings,
                                  on_dump=ask if prober is not None else None)
        mark("exported")
        answers = prober.collect(ts_for=ts_for) if prober is not None else {}
        mark("probed")
    records = [passing.pack(e.ici, e.app_state, answers[i].acked if i in answers else None)
               for i, e in enumerate(exported)]
    if corrupt_one and records:
        bad = bytearray(records[-1])
        bad[len(bad) // 2] ^= 0xFF  # a byte damaged in transit
        records[-1] = bytes(bad)
    mark("packed")
    made = []
    vip_moved = False
    try:
        with netns.enter(topo.destination):
            made = passing.import_(records, freebind=True, timings=timings)
        mark("created")
        vip.remove_vip(topo.origin, vip_addr, topo.ifname)
        vip.add_vip(topo.destination, vip_addr, topo.ifname)
        vip_moved = True
        vip.announce(topo.destination, vip_addr, topo.ifname)
        mark("vip_moved")
        passing.activate_all(made, timings)
        mark("activated")
        behind = [e.ici for i, e in enumerate(exported)
                  if i in answers and answers[i].peer_seq != e.ici.rcv_nxt]
        with netns.enter(topo.destination):  # peers with unacknowledged data: undo backoff
            nudged = nudge.nudge(behind)
        mark("nudged")
    except BaseException:
        for restored, _ in made:
            repair.close_silently(restored.sock)
        if vip_moved:
            vip.remove_vip(topo.destination, vip_addr, topo.ifname)
            vip.add_vip(topo.origin, vip_addr, topo.ifname)
            vip.announce(topo.origin, vip_addr, topo.ifname)
        with netns.enter(topo.origin):
            passing.undo(exported, origin_iso)
        origin_app.attach_all([(e.sock, StreamState.from_bytes(e.app_state)) for e in exported])
        raise
    dest_app.attach_all([(r.sock, StreamState.from_bytes(state)) for r, state in made])
    mark("resumed")
    with netns.enter(topo.origin):
        passing.finish(exported, origin_iso)
    mark("origin_released")
    return PassResult(len(exported), timings.dump_us, timings.restore_us, timings.activate_us,
                      len(answers), nudged, phases["activated"], phases)


def reconnect_baseline(topo: Topology, family: int, samples: int = 50) -> list[float]:
    """The cost of a fresh connect and accept on the same path (the alternative to passing)."""
    import socket
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    host = topo.hosts[topo.destination]
    addr = host.ipv6 if family == 6 else host.ipv4
    with netns.enter(topo.destination):
        ls = _listen(addr, PORT + 1, family)
    out = []
    try:
        for _ in range(samples):
            with netns.enter(topo.peer):
                c = socket.socket(fam, socket.SOCK_STREAM)
            t = time.perf_counter()
            c.connect((addr, PORT + 1))
            a, _ = ls.accept()
            out.append((time.perf_counter() - t) * 1e6)
            c.close()
            a.close()
    finally:
        ls.close()
    return out


def _wait_flowing(progress: Path, connections: int, proc, deadline_s: float = 60.0) -> None:
    """Wait until every connection has received data (polling with a deadline)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            status = json.loads(progress.read_text())
            received = status.get("received", [])
            if len(received) >= connections and all(n > 0 for n in received):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"traffic did not flow on all {connections} connections in {deadline_s} s")


def run(connections: int = 100, *, family: int = 4, warmup_s: float = 1.0, after_s: float = 1.5,
        rate_mbps: float | None = None, corrupt_one: bool = False, learn_acked: bool = True,
        peer_sysctls: dict | None = None, log=lambda msg: None) -> dict:
    """One complete live-passing run; returns the figures as a dict (see bench/passing.py)."""
    with Topology.create() as topo:
        for key, value in (peer_sysctls or {}).items():
            netns.sysctl(topo.peer, key, value)
        addr = topo.vip4 if family == 4 else topo.vip6
        vip.add_vip(topo.origin, addr, topo.ifname)
        vip.announce(topo.origin, addr, topo.ifname)
        with netns.enter(topo.origin):
            listener = _listen(addr, PORT, family)
        rate = rate_mbps * 1e6 / 8 if rate_mbps else None  # the same pace both ways
        origin_app = StreamServer(listener, rate=rate).start()
        dest_app = StreamServer(rate=rate).start()
        origin_iso = Isolation()
        with netns.enter(topo.origin):  # prepared before the pass, off its critical path
            origin_iso.ensure()
            prober = probe.Prober(topo.ifname) if learn_acked else None
        tmpdir = tempfile.TemporaryDirectory(prefix="tcpcp-pass-")
        tmp = Path(tmpdir.name)
        stop, progress = tmp / "stop", tmp / "progress.json"
        target = f"[{addr}]:{PORT}" if family == 6 else f"{addr}:{PORT}"
        argv = [sys.executable, str(PEER), "--connect", target, "--connections", str(connections),
                "--seconds", "600", "--until-file", str(stop), "--progress-file", str(progress),
                "--json"]
        if rate_mbps:
            argv += ["--rate-mbps", str(rate_mbps)]
        log(f"topology {topo.peer} .. {topo.destination}; starting peer with {connections} connections")
        peer = netns.popen(topo.peer, argv, stdout=__import__("subprocess").PIPE,
                           stderr=__import__("subprocess").PIPE, text=True)
        result = None
        baseline_stall = None
        error = None
        try:
            _wait_flowing(progress, connections, peer)
            time.sleep(warmup_s)
            try:  # the pauses the peer saw before the pass: this path's own baseline
                before = json.loads(progress.read_text())
                baseline_stall = max(before["max_recv_gap_ms"], before["max_send_block_ms"])
            except (OSError, ValueError, KeyError):
                baseline_stall = None
            log(f"traffic flowing on {connections} connections; passing A -> B")
            try:
                result = pass_all(topo, origin_app, dest_app, addr, origin_iso, prober,
                                  corrupt_one=corrupt_one)
                log(f"passed {result.connections} connections in {result.pass_ms:.1f} ms")
            except Exception as exc:  # reported in the figures; the run goes on (undo tested)
                error = exc
                log(f"pass failed and was undone: {exc}")
            time.sleep(after_s)
        finally:
            stop.touch()
            try:
                out, err = peer.communicate(timeout=60)
            except Exception:
                peer.kill()
                out, err = peer.communicate()
            origin_app.stop()
            dest_app.stop()
            listener.close()
            if prober is not None:
                prober.close()
            tmpdir.cleanup()
        try:
            peer_report = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"peer gave no report: rc={peer.returncode} {err[-2000:]}") from None
        reconnect = reconnect_baseline(topo, family)
        server = {"origin": origin_app.stats(), "destination": dest_app.stats()}
    med = lambda xs: round(statistics.median(xs), 1) if xs else None
    return {
        "connections": connections,
        "family": family,
        "passed": result.connections if result else 0,
        "pass_error": None if error is None else f"{type(error).__name__}: {error}",
        "bytes_verified": peer_report["bytes_verified"] + sum(
            s["bytes_verified"] for s in server.values()),
        "lost_bytes": peer_report["lost_bytes"] + sum(s["lost_bytes"] for s in server.values()),
        "duplicated_bytes": peer_report["duplicated_bytes"] + sum(
            s["duplicated_bytes"] for s in server.values()),
        "corrupt_bytes": peer_report.get("corrupt_bytes", 0) + sum(
            s["corrupt_bytes"] for s in server.values()),
        "resets": peer_report["resets"],
        "early_fins": peer_report.get("early_fins", 0),
        "max_stall_ms": peer_report["max_stall_ms"],
        "baseline_stall_ms": baseline_stall,
        "pass_ms": result.pass_ms if result else None,
        "phases_ms": result.phases_ms if result else None,
        "probed": result.probed if result else 0,
        "nudged": result.nudged if result else 0,
        "dump_us_median": med(result.dump_us) if result else None,
        "restore_us_median": med(result.restore_us) if result else None,
        "activate_us_median": med(result.activate_us) if result else None,
        "reconnect_us_median": med(reconnect),
        "peer": {k: v for k, v in peer_report.items() if k != "per_connection"},
        "server": server,
    }
