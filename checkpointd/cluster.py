"""An HA pair in network namespaces: etcd, two agents, their applications. For drills and tests.

Everything here is started by us and stopped by PID (never by name); every file lives in
one temporary directory; the namespaces belong to a ``kernel.topology.Topology``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kernel import netns
from kernel.topology import Topology

from .store.keyring import new_key_line

ROOT = Path(__file__).resolve().parent.parent
ETCD = "/usr/bin/etcd"


def raise_fd_limit() -> None:
    """A thousand connections on both hosts plus the peer's need more than 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def wait_for(predicate, deadline_s: float, what: str, interval: float = 0.02):
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"not {what} after {deadline_s:g} s")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    topo: Topology
    workdir: Path
    lease_ttl: float = 1.0
    unprotected_grace: float = 10.0
    switchover_pass: bool = True     # False: a switchover goes by checkpoint (the fallback)
    procs: list[Proc] = field(default_factory=list)

    @property
    def etcd_hosts(self) -> list:
        """The etcd members' hosts: the topology's extra hosts named etcd1, etcd2..."""
        return [h for h in self.topo.hosts.values() if h.role.startswith("etcd")]

    @property
    def etcd_host(self):
        return self.etcd_hosts[0]

    @property
    def endpoint(self) -> str:
        return f"http://{self.etcd_host.ipv4}:2379"

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{h.ipv4}:2379" for h in self.etcd_hosts]

    def spawn(self, ns: str, name: str, argv: list[str], **kw) -> Proc:
        log = self.workdir / f"{name}.log"
        f = open(log, "ab")
        own_stdout = "stdout" in kw    # a report file: the log keeps stderr apart
        popen = netns.popen(ns, argv, stdin=subprocess.DEVNULL, stdout=kw.pop("stdout", f),
                            stderr=f if own_stdout else subprocess.STDOUT, **kw)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    # -- etcd --------------------------------------------------------------------------
    def start_etcd(self) -> list[Proc]:
        """One member per etcd host of the topology (one or three), started together and
        waited until the cluster answers. Each member's data stays in the work directory,
        so ``restart_etcd_member`` brings a killed member back with its state."""
        procs = [self._spawn_etcd(h) for h in self.etcd_hosts]
        self.wait_etcd_healthy()
        return procs

    def _spawn_etcd(self, host) -> Proc:
        members = ",".join(f"{h.role}=http://{h.ipv4}:2380" for h in self.etcd_hosts)
        addr = host.ipv4
        # Timings that let a 1 s lease mean something: a leader heartbeat every 50 ms,
        # an election after 250 ms of silence.
        return self.spawn(host.ns, host.role, [
            ETCD, "--name", host.role, "--data-dir", str(self.workdir / f"{host.role}-data"),
            "--listen-client-urls", f"http://{addr}:2379", "--advertise-client-urls", f"http://{addr}:2379",
            "--listen-peer-urls", f"http://{addr}:2380", "--initial-advertise-peer-urls", f"http://{addr}:2380",
            "--initial-cluster", members, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"tcpcp-{self.topo.tag}",
            "--heartbeat-interval", "50", "--election-timeout", "250", "--log-level", "warn"])

    def etcd_proc(self, role: str) -> Proc | None:
        alive = [p for p in self.procs if p.name == role and p.alive()]
        return alive[-1] if alive else None

    def restart_etcd_member(self, role: str) -> Proc:
        return self._spawn_etcd(self.topo.role(role))

    def wait_etcd_healthy(self, deadline_s: float = 20) -> None:
        def healthy():
            for p in self.procs:
                if p.name.startswith("etcd") and p.popen.poll() not in (None, -9, -15):
                    raise RuntimeError(f"{p.name} exited: {p.tail()}")
            with netns.enter(self.topo.peer):
                try:
                    with urllib.request.urlopen(self.endpoint + "/health", timeout=0.5) as r:
                        return json.load(r).get("health") == "true"
                except OSError:
                    return False
        wait_for(healthy, deadline_s, "etcd healthy", 0.1)

    def start_pair(self, *, fault_point: str | None = None) -> Proc:
        """etcd, the key file, agent a (waited until primary), agent b (until standby).
        Returns a's agent process (the one a drill kills). ``fault_point``: a's
        ``--fault-point`` (armed later by SIGUSR1)."""
        self.start_etcd()
        self.write_key()
        agent_a = self.start_agent(self.topo.origin, "a", fault_point=fault_point)
        self.wait_role("a", "primary")
        self.start_agent(self.topo.destination, "b")
        self.wait_role("b", "standby")
        return agent_a

    # -- agents ------------------------------------------------------------------------
    def write_key(self) -> Path:
        path = self.workdir / "tcpcp.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key_line("k1") + "\n")
        return path

    def config_path(self, host: str) -> Path:
        return self.workdir / f"{host}.toml"

    def config(self, host: str, interface: str = "eth0") -> Path:
        path = self.config_path(host)
        vips = [self.topo.vip4]
        path.write_text(f"""
[cluster]
name = "drill"
host = "{host}"
[etcd]
endpoints = {json.dumps(self.endpoints)}
[security]
key_file = "{self.workdir / 'tcpcp.key'}"
[network]
vips = {json.dumps(vips)}
interface = "{interface}"
[timing]
lease_ttl = {self.lease_ttl}
renew_interval = 0.1
retry_timeout = 0.25
fence_margin = 0.3
checkpoint_interval = 5
commit_interval = 0.005
msl = 120
clock_skew = 0.05
unprotected_grace = {self.unprotected_grace}
[app]
socket = "{self.workdir / host / 'app.sock'}"
[api]
listen = "{self.api_address(host)}"
partners = {json.dumps([f"http://{self.api_address(h)}" for h in ("a", "b") if h != host])}
failsafe = {"true" if self.lease_ttl >= 2 else "false"}
[switchover]
pass = {"true" if self.switchover_pass else "false"}
""")
        return path

    def start_agent(self, ns: str, host: str, *, gate: bool = True,
                    fault_point: str | None = None) -> Proc:
        (self.workdir / host).mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "checkpointd.cli", "run", "--config", str(self.config(host)),
                "--status", str(self.status_path(host))]
        if not gate:
            argv.append("--no-gate")
        if fault_point:
            argv += ["--fault-point", fault_point]
        return self.spawn(ns, f"agent-{host}", argv, cwd=str(ROOT))

    def api_address(self, host: str) -> str:
        """host:port of an agent's REST API: its own address on the bridge, so that the
        partner can ask it for fail-safe (and the drill could scrape it)."""
        ns = {"a": self.topo.origin, "b": self.topo.destination}[host]
        return f"{self.topo.host(ns).ipv4}:8008"

    def status_path(self, host: str) -> Path:
        return self.workdir / host / "status.json"

    def status(self, host: str) -> dict | None:
        try:
            return json.loads(self.status_path(host).read_text())
        except (OSError, ValueError):
            return None

    def wait_role(self, host: str, role: str, deadline_s: float = 20) -> dict:
        def check():
            st = self.status(host)
            return st if st and st["role"] == role else None
        return wait_for(check, deadline_s, f"{host} {role}", 0.02)

    def app_socket(self, host: str) -> Path:
        return self.workdir / host / "app.sock"

    # -- the end -------------------------------------------------------------------------
    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
