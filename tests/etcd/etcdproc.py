"""A real etcd process for tests: free ports on 127.0.0.1, data in a given dir, stopped by PID.

Helpers live here rather than in conftest.py so that test modules import them by a name no
other test directory uses (every conftest.py is a module named ``conftest``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
START_DEADLINE_S = 30.0


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice; bind and release)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, deadline_s: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a true value or the deadline passes."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not {what} after {deadline_s:g} s")
        time.sleep(interval)


class EtcdServer:
    """One etcd process: ``endpoint``, ``pid``, ``start()``, ``suspend()``/``resume()``,
    ``stop()``. Ports and data dir are chosen once, so a restart comes back in place.

    ``scheme="https"`` with ``extra_args`` naming the certificates (``--cert-file`` ...)
    serves clients over TLS; /health is then read from a plain-HTTP metrics listener of
    its own (``--listen-metrics-urls``), so that waiting for the server needs no client
    certificate. ``extra_args`` go to etcd as they are.
    """

    def __init__(self, data_dir, *, scheme: str = "http", extra_args=()):
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.client_port, self.peer_port = free_port(), free_port()
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        self.extra_args = [str(a) for a in extra_args]
        self.health_url = self.endpoint + "/health"
        if scheme != "http":
            self.metrics_port = free_port()
            self.extra_args += ["--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}"]
            self.health_url = f"http://127.0.0.1:{self.metrics_port}/health"
        self.log_path = data_dir / "etcd.log"
        self.proc = None
        self.suspended = False

    def start(self) -> "EtcdServer":
        """Launch etcd (new cluster, or the existing data dir) and wait until healthy."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "tcpcp-test", "--data-dir", str(self.data_dir / "data"),
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"tcpcp-test={peer}", "--initial-cluster-state", "new",
                 "--heartbeat-interval", "100", "--election-timeout", "500", *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.healthy, START_DEADLINE_S, "healthy")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
        try:
            with urllib.request.urlopen(self.health_url, timeout=1) as resp:
                return json.load(resp).get("health") == "true"
        except OSError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def suspend(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.suspended = True

    def resume(self) -> None:
        if self.suspended:
            os.kill(self.pid, signal.SIGCONT)
            self.suspended = False

    def stop(self) -> None:
        """Stop this process (by its PID, never by name) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_etcd(tmp_dir, **server_args) -> EtcdServer:
    """Start etcd and wait for it to be healthy; retry on a port lost to a race.

    ``server_args`` (``scheme``, ``extra_args``) go to :class:`EtcdServer`."""
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"{ETCD} not found: scripts/setup installs Debian's etcd-server")
    last = None
    for attempt in range(3):
        server = EtcdServer(tmp_dir / f"try{attempt}", **server_args)
        try:
            return server.start()
        except (RuntimeError, AssertionError) as exc:
            last = f"{exc}\n{server.log_tail()}"
            server.stop()
    raise RuntimeError(f"etcd did not start: {last}")
