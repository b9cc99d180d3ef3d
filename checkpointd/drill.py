"""The fail-over drill: kill the primary under load, prove that nothing was lost.

Topology: peer, host A (primary), host B (standby), etcd, each a network namespace on one
bridge (kernel/topology.py). Both hosts run the agent and the same two applications:
``checkpointd.apps.httpstream`` (a deterministic HTTP download, fetched by **curl**, or
for more than FETCH_ABOVE downloads by ``peers/http_fetch.py``, one process fetching them
all like so many curls) and
``checkpointd.apps.kv`` (a stateful line protocol, driven by ``peers/kv_client.py``, a
plain socket program). At a random moment (seeded) A crashes honestly: its link goes
down first, then its processes are killed by PID. B's agent sees the lease lapse,
takes the virtual IP, resurrects every connection and hands them to its applications.
Every downloaded byte is compared with the generator; every KV reply with the client's
model. Timings come from the agents' event timelines (CLOCK_MONOTONIC, shared by all
processes of the machine) and from the download files' growth, sampled every 5 ms (less
often for many files: ``Sampler.period_for``).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kernel import netns
from kernel.topology import Topology

from .cluster import ROOT, Cluster, wait_for

HTTP_PORT, KV_PORT = 8080, 7070
FETCH_ABOVE = 50       # more downloads than this: one http_fetch.py process, not one curl each


class Sampler(threading.Thread):
    """Sizes of the download files over time: the drill's view of what the peers got."""

    def __init__(self, files: list[Path], period: float | None = None):
        super().__init__(daemon=True)
        self.files = files
        self.period = self.period_for(len(files)) if period is None else period
        self.samples: list[tuple[float, list[int]]] = []
        self.stop = threading.Event()

    @staticmethod
    def period_for(n_files: int) -> float:
        """Every period stats every file (~3 us each in Python): 5 ms up to 100 files, then
        50 us per file (25 ms at 500), so the sampler costs ~10 % of a core at most."""
        return max(0.005, 50e-6 * n_files)

    def run(self) -> None:
        while not self.stop.is_set():
            sizes = []
            for f in self.files:
                try:
                    sizes.append(f.stat().st_size)
                except OSError:
                    sizes.append(0)
            self.samples.append((time.monotonic(), sizes))
            time.sleep(self.period)

    def max_gap(self, start: float, end: float) -> float:
        """Longest time any file did not grow while it was still growing overall."""
        return self.gaps(start, end)[0][0] if self.files else 0.0

    def gaps(self, start: float, end: float) -> list[tuple[float, int, float]]:
        """Each file's longest pause: (seconds, file index, when it ended), longest first."""
        out = []
        for i in range(len(self.files)):
            last_t, last_n = None, None
            final = self.samples[-1][1][i] if self.samples else 0
            worst = (0.0, i, 0.0)
            for t, sizes in self.samples:
                n = sizes[i]
                if last_n is None or n != last_n:
                    if last_t is not None and last_n and last_n < final and start <= t <= end:
                        worst = max(worst, (t - last_t, i, t))
                    last_t, last_n = t, n
            out.append(worst)
        return sorted(out, reverse=True)


def _event_time(status: dict | None, needle: str, after: float) -> float | None:
    for t, text in (status or {}).get("events", []):
        if needle in text and t >= after:
            return t
    return None


FAULTS = ("crash", "mid-commit", "etcd-partition", "etcd-outage", "switchover")


def run(connections: int = 20, *, seed: int = 1, lease_ttl: float = 1.0, http_rate: int = 2_000_000,
        duration: float = 4.0, kill_window: tuple[float, float] = (0.8, 2.0), plot: str | None = None,
        progress=lambda msg: None, fault: str = "crash", pcap: str | None = None,
        keep: str | None = None, outage_s: float = 2.5, kv_rate: float | None = None,
        switchover_pass: bool = True) -> dict:
    """One drill. ``fault``: "crash" (A's link down, then its processes killed),
    "mid-commit" (the same crash, at the moment A's checkpoints are durable in etcd but
    their ACK gates not yet raised: the peers' snd_una is one commit behind the records) or
    "etcd-partition" (A alive and connected to the peers but cut off from etcd: it must
    fence itself before its lease can lapse, and B takes over) or "etcd-outage" (etcd is a
    three-member cluster; two members are killed, so it has no quorum for
    ``outage_s``; fail-safe: A asks B, B cannot reach etcd either, so A keeps serving and
    releases the ACK gate after the grace; the members come back, A re-protects its
    connections, and only then does A crash) or "switchover" (no fault: the operator's
    ``resurrect switchover --to b``; A freezes its applications, isolates its connections
    and passes them live to B (checkpointd/switchover.py), releases the leader key, B takes
    it at once and activates them; ``switchover_pass=False``: A checkpoints them instead
    and B resurrects them, the fallback). ``pcap``: capture the
    peer's side of every connection (tcpdump, headers only) into this file. ``keep``: copy
    every process's log and the agents' last status into this directory at the end.
    ``kv_rate``: requests per second per KV connection (None: kv_client.py's default).
    More than FETCH_ABOVE downloads are fetched by one ``peers/http_fetch.py`` process
    instead of one curl each; the result has the same fields either way."""
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}")
    rng = random.Random(seed)
    n_http = max(1, connections // 2)
    n_kv = max(0, connections - n_http)
    members = ("etcd1", "etcd2", "etcd3") if fault == "etcd-outage" else ("etcd1",)
    with Topology.create(extra=members) as topo, tempfile.TemporaryDirectory(prefix="tcpcp-drill-") as d:
        work = Path(d)
        if fault == "etcd-outage":
            lease_ttl = max(lease_ttl, 2.0)   # fail-safe needs room before the deadline (R11)
        if fault == "switchover":
            # no lease lapses in a switchover, so its length costs nothing; a 1 s lease made
            # a half-second etcd stall (fsync on this shared machine) fence the primary
            # before the operator's request, and b took over as in a crash
            lease_ttl = max(lease_ttl, 2.0)
        cluster = Cluster(topo, work, lease_ttl=lease_ttl, switchover_pass=switchover_pass,
                          unprotected_grace=1.0 if fault == "etcd-outage" else 10.0)
        outage = None
        sampler = None
        try:
            progress(f"topology {topo.tag}: starting etcd")
            if pcap:
                cluster.spawn(topo.peer, "tcpdump", ["tcpdump", "-i", "eth0", "-s", "96", "-U", "-w",
                                                     str(Path(pcap).resolve()), "tcp or icmp or arp"])
            agent_a = cluster.start_pair(fault_point="after-write" if fault == "mid-commit" else None)
            progress("agents up: a primary, b standby; starting the applications")
            apps_a = _start_apps(cluster, topo.origin, "a", topo.vip4)
            _start_apps(cluster, topo.destination, "b", topo.vip4)
            length = int(http_rate * duration)
            files = [work / f"download-{i}.bin" for i in range(n_http)]
            seeds = [rng.randrange(1 << 30) for _ in range(n_http)]
            urls = [f"http://{topo.vip4}:{HTTP_PORT}/stream?len={length}&seed={seeds[i]}&rate={http_rate}"
                    for i in range(n_http)]
            max_time = int(duration * 4 + 30 + (n_http * 0.02 if n_http > FETCH_ABOVE else 0))
            if n_http > FETCH_ABOVE:
                fetchers = [_spawn_fetch(cluster, topo.peer, work, urls, files, max_time)]
            else:
                fetchers = [cluster.spawn(topo.peer, f"curl-{i}", [
                    "curl", "-sS", "--max-time", str(max_time), "-o", str(files[i]), urls[i]])
                    for i in range(n_http)]
            kv_report = work / "kv.json"
            kv = None
            if n_kv:
                kv = cluster.spawn(topo.peer, "kv-client", [
                    sys.executable, str(ROOT / "peers" / "kv_client.py"), "--connect",
                    f"{topo.vip4}:{KV_PORT}", "--connections", str(n_kv), "--seconds", str(duration),
                    "--seed", str(seed), "--json",
                    *(["--rate", f"{kv_rate:g}"] if kv_rate else [])], stdout=open(kv_report, "wb"))
            sampler = Sampler(files)
            sampler.start()
            wait_for(lambda: all(f.exists() and f.stat().st_size > 0 for f in files),
                     20 + 0.02 * connections, "downloads flowing", 0.02 if n_http <= FETCH_ABOVE else 0.1)
            # every connection has a durable record before the fault (with hundreds of
            # connections starting at once, the first records take a while)
            wait_for(lambda: _records(cluster) >= connections, 10 + 0.02 * connections,
                     f"{connections} checkpoint records in etcd", 0.05)
            delay = rng.uniform(*kill_window)
            what = {"switchover": "switching over to b", "etcd-partition": "cutting host a off from etcd",
                    "etcd-outage": "taking etcd's quorum away"}.get(fault, "crashing host a")
            progress(f"{connections} connections flowing; {what} in {delay:.2f} s")
            time.sleep(delay)
            if fault == "mid-commit":
                agent_a.kill(signal.SIGUSR1)   # arm: the committer stops after its next write
                wait_for(lambda: _event_time(cluster.status("a"), "fault point after-write", 0), 10,
                         "a stopped between an etcd write and the ACK gate's raise", 0.002)
            if fault == "etcd-outage":
                outage = _etcd_outage(cluster, outage_s, progress)
            if fault in ("crash", "mid-commit", "etcd-outage"):
                # Silence the host first (a live kernel would send FIN/RST), then kill.
                subprocess.run(["ip", "-n", topo.origin, "link", "set", "eth0", "down"], check=True)
                killed = time.monotonic()
                for proc in [agent_a, *apps_a]:
                    proc.kill()
                progress("host a crashed; waiting for b to take over")
            elif fault == "switchover":
                # the operator's command, as an operator runs it (from host a)
                asked = time.monotonic()
                netns.run(topo.origin, [sys.executable, "-m", "resurrect.cli", "--config",
                                        str(cluster.config_path("a")), "switchover", "--to", "b", "-y"])
                # the peers' pause starts when a isolates its connections
                killed = wait_for(lambda: _event_time(cluster.status("a"), "switching over to b", asked),
                                  10, "a switching over")
                progress("switchover to b requested (resurrect switchover --to b)")
            else:
                etcd_ip = cluster.etcd_host.ipv4
                netns.run(topo.origin, ["nft", "-f", "-"], input=(
                    "table inet drill_cut {\n chain o { type filter hook output priority 0; "
                    f"ip daddr {etcd_ip} drop; }}\n chain i {{ type filter hook input priority 0; "
                    f"ip saddr {etcd_ip} drop; }}\n}}\n"))
                killed = time.monotonic()
                progress("host a cut off from etcd (alive); waiting for it to fence and b to take over")
            status_b = cluster.wait_role("b", "primary", 30)
            wait_for(lambda: (cluster.status("b") or {}).get("last_resurrection"), 30, "resurrection")
            status_b = cluster.status("b")
            progress(f"b is primary: {status_b['last_resurrection']}")
            for c in fetchers:
                c.popen.wait(timeout=max_time + 30)
            if kv is not None:
                kv.popen.wait(timeout=duration * 4 + 60 + 0.05 * n_kv)
            sampler.stop.set()
            status_b = cluster.status("b")
            status_a = cluster.status("a")
            metrics_b = _scrape(topo.destination, cluster.api_address("b"))
        except BaseException:
            for proc in cluster.procs:
                progress(f"--- {proc.name} (pid {proc.pid}, {'alive' if proc.alive() else 'exited'})\n{proc.tail(12)}")
            raise
        finally:
            if sampler is not None:
                sampler.stop.set()
            cluster.stop_all()
            if keep:
                _keep(work, Path(keep))
        result = _verify(files, seeds, length, _outcomes(fetchers, n_http, work),
                         kv_report if n_kv else None)
        detection = _event_time(status_b, "promoting", killed)
        takeover = _event_time(status_b, "took virtual IPs", killed)
        res = status_b.get("last_resurrection") or {}
        gap = sampler.max_gap(killed - 5, time.monotonic())
        # the same load's pauses before the fault: the baseline measured in the same run
        http_before = sampler.max_gap(killed - 5, killed)
        kv_gaps = (result.get("kv") or {}).get("gaps", [])
        kv_before = max((ms for ms, end in kv_gaps if end < killed), default=0.0)
        result.update(
            connections=connections, seed=seed, lease_ttl_s=lease_ttl,
            resurrected=status_b["counters"]["resurrected"],
            passed_live=status_b["counters"].get("passed_in", 0),
            refused=status_b["counters"]["refused"],
            http_max_gap_ms=round(gap * 1000, 1), kv_max_gap_ms=result.get("kv_max_gap_ms", 0.0),
            baseline_http_max_gap_ms=round(http_before * 1000, 1),
            baseline_kv_max_gap_ms=round(kv_before, 1),
            http_gap_ends_ms=[round((t - killed) * 1000) for _, _, t in sampler.gaps(killed - 5, time.monotonic())[:5]],
            resumed_ms=round((min(res["at"], res.get("passed_at", res["at"])) - killed) * 1000, 1)
            if res.get("at") else None,
            max_gap_ms=round(max(gap * 1000, result.pop("kv_max_gap_ms", 0.0)), 1),
            detection_ms=round((detection - killed) * 1000, 1) if detection else None,
            takeover_ms=round((takeover - killed) * 1000, 1) if takeover else None,
            restore_ms=round(res.get("probe_ms", 0) + res.get("restore_ms", 0) + res.get("activate_ms", 0), 1),
            events_b=[text for t, text in status_b["events"] if t >= killed - 0.5][:20],
            metrics_b=metrics_b,
            fault=fault)
        if outage is not None:
            result.update(outage)
        if fault == "switchover":
            result.update(switchover=status_a.get("last_switchover"))
        if fault == "etcd-partition":
            fenced = _event_time(status_a, "fenced", killed)
            result.update(a_role=status_a["role"], a_fenced_ms=round((fenced - killed) * 1000, 1) if fenced else None,
                          fenced_before_takeover=bool(fenced and detection and fenced < detection),
                          events_a=[text for t, text in status_a["events"] if t >= killed - 0.5][:10])
        if plot:
            _plot(plot, sampler, killed, detection, takeover, res.get("at"))
        return result


def _etcd_outage(cluster: Cluster, outage_s: float, progress) -> dict:
    """Kill two of the three etcd members (no quorum), wait, bring them back; report what
    agent a did meanwhile. It must stay primary throughout (fail-safe), release the ACK
    gate after the grace, and re-engage it once etcd answers."""
    killed = [cluster.etcd_proc(m) for m in ("etcd2", "etcd3")]
    t0 = time.monotonic()
    for proc in killed:
        proc.kill()
        proc.popen.wait()
    progress(f"etcd has no quorum (etcd2, etcd3 killed) for {outage_s:g} s")
    roles, unprotected = set(), False
    while time.monotonic() - t0 < outage_s:
        st = cluster.status("a") or {}
        roles.add(st.get("role"))
        unprotected = unprotected or bool(st.get("unprotected"))
        time.sleep(0.02)
    for m in ("etcd2", "etcd3"):
        cluster.restart_etcd_member(m)
    cluster.wait_etcd_healthy()
    back = time.monotonic()
    progress(f"etcd has quorum again after {back - t0:.2f} s; waiting for a to re-protect")

    def reprotected():
        st = cluster.status("a") or {}
        roles.add(st.get("role"))
        return _event_time(st, "re-engaged the ACK gate", t0) and st.get("etcd_reachable")
    wait_for(reprotected, 20, "a re-engaging the ACK gate")
    time.sleep(1.0)   # let the connections commit past the re-protection point
    st = cluster.status("a") or {}
    return {"outage_s": round(back - t0, 2), "a_roles_during_outage": sorted(r for r in roles if r),
            "a_unprotected_during_outage": unprotected,
            "events_a_outage": [text for t, text in st.get("events", []) if t >= t0][:12]}


def _scrape(ns: str, address: str) -> dict:
    """A few of b's Prometheus metrics, read from its REST API as Prometheus would."""
    import urllib.request

    wanted = ("tcpcp_resurrections_total", "tcpcp_checkpoints_total", "tcpcp_gate_commits_total",
              'tcpcp_role{role="primary"}', "tcpcp_commit_latency_seconds_count",
              'tcpcp_passed_total{direction="in"}')
    try:
        with netns.enter(ns):
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as r:
                text = r.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


def _keep(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in [*work.glob("*.log"), *work.glob("*.json"), *work.glob("*/status.json")]:
        name = f.name if f.parent == work else f"{f.parent.name}-{f.name}"
        shutil.copy(f, dest / name)


def _start_apps(cluster: Cluster, ns: str, host: str, vip: str) -> list:
    sock = str(cluster.app_socket(host))
    wait_for(lambda: cluster.app_socket(host).exists(), 10, f"{host} agent socket")
    procs = [cluster.spawn(ns, f"{name}-{host}", [
        sys.executable, "-m", f"checkpointd.apps.{name}", "--listen", f"{vip}:{port}", "--agent", sock],
        cwd=str(ROOT)) for name, port in (("httpstream", HTTP_PORT), ("kv", KV_PORT))]

    def listening():
        out = netns.run(ns, ["ss", "-Hltn"]).stdout
        return all(f":{port} " in out for port in (HTTP_PORT, KV_PORT))
    wait_for(listening, 20, f"applications listening on {host}", 0.05)
    return procs


def _records(cluster: Cluster) -> int:
    """How many connection records etcd holds (asked from the peer's namespace)."""
    import base64
    import urllib.request

    from .store.layout import Layout
    start = Layout("drill").conn_range().encode()
    end = start[:-1] + bytes([start[-1] + 1])
    body = json.dumps({"key": base64.b64encode(start).decode(), "count_only": True,
                       "range_end": base64.b64encode(end).decode()}).encode()
    with netns.enter(cluster.topo.peer):
        try:
            with urllib.request.urlopen(cluster.endpoint + "/v3/kv/range", body, timeout=1) as r:
                return int(json.load(r).get("count", 0))
        except (OSError, ValueError):
            return 0


def _spawn_fetch(cluster: Cluster, ns: str, work: Path, urls: list[str], files: list[Path],
                 max_time: int):
    """One ``peers/http_fetch.py`` for every download: the same URLs and files as the curls."""
    url_file = work / "urls.txt"
    url_file.write_text("".join(u + "\n" for u in urls))
    assert all(f == work / f"download-{i}.bin" for i, f in enumerate(files))
    return cluster.spawn(ns, "http-fetch", [
        sys.executable, str(ROOT / "peers" / "http_fetch.py"), "--url-file", str(url_file),
        "--output", str(work / "download-{i}.bin"), "--connect-timeout", "30",
        "--max-time", str(max_time), "--json"], stdout=open(work / "http.json", "wb"))


def _outcomes(fetchers: list, n: int, work: Path) -> list[tuple[int | None, str]]:
    """(exit code as curl would give it, what the client said) per download: a curl's
    own, or the entry of http_fetch.py's report."""
    if len(fetchers) == n and all(p.name.startswith("curl-") for p in fetchers):
        return [(c.popen.returncode, c.tail(2)) for c in fetchers]
    proc = fetchers[0]
    try:
        rep = json.loads((work / "http.json").read_text().strip().splitlines()[-1])
        by_index = {d["i"]: d for d in rep["downloads"]}
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        rc = proc.popen.returncode
        return [(rc if rc else -1, f"http_fetch.py gave no report (exit {rc}): {proc.tail(2)}")] * n
    out = []
    for i in range(n):
        d = by_index.get(i)
        if d is None:
            out.append((-1, f"http_fetch.py did not report download {i}"))
        else:
            out.append((d["rc"], d["error"] or ""))
    return out


def _verify(files, seeds, length, outcomes, kv_report) -> dict:
    from .apps import httpstream

    verified = lost = dup = 0
    resets = 0
    problems: list[dict] = []
    for f, s, (rc, said) in zip(files, seeds, outcomes):
        data = f.read_bytes() if f.exists() else b""
        want = httpstream.body(s, 0, length)
        same = _common_prefix(data, want)
        verified += same
        if len(data) < length:
            lost += length - len(data)
        elif len(data) > length:
            dup += len(data) - length
        if same < min(len(data), length):
            lost += min(len(data), length) - same  # bytes that differ: counted as lost
        if rc not in (0, None):
            resets += 1
        if same != length or len(data) != length or rc:
            problems.append({"download": f.name, "received": len(data), "expected": length,
                             "first_difference": same, "curl_rc": rc, "curl_said": said})
    out = {"http_connections": len(files), "bytes_verified": verified, "lost_bytes": lost,
           "duplicated_bytes": dup, "resets": resets, "http_problems": problems}
    if kv_report is not None:
        try:
            rep = json.loads(kv_report.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            rep = {"error": "kv client gave no report"}
        out["kv"] = rep
        out["bytes_verified"] += rep.get("bytes_verified", 0)
        out["lost_bytes"] += rep.get("mismatches", 0) + rep.get("missing_replies", 0) + len(rep.get("errors", []))
        out["resets"] += rep.get("resets", 0)
        out["kv_max_gap_ms"] = rep.get("max_gap_ms", 0.0)
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _plot(path: str, sampler: Sampler, killed: float, detection, takeover, resumed) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = sampler.samples[0][0]
    xs = [t - t0 for t, _ in sampler.samples]
    ys = [sum(sizes) / 1e6 for _, sizes in sampler.samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(xs, ys, label="bytes received by the peers (curl downloads)")
    for when, label, color in ((killed, "host a crashed", "red"), (detection, "lease lapsed: b promotes", "orange"),
                               (takeover, "b took the VIP", "purple"), (resumed, "connections resumed", "green")):
        if when:
            ax.axvline(when - t0, color=color, linestyle="--", label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MB")
    ax.set_title("tcpcp fail-over drill")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
