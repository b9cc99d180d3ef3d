"""A real single-member etcd for the store tests, and nothing left behind.

The server listens on 127.0.0.1 on free ports, keeps its data in a pytest tmp dir, runs
with short raft timings (``--heartbeat-interval 100 --election-timeout 500``, so the
smallest lease is 1 s), and is stopped by its PID when the module's tests are done,
resumed first if a test suspended it. Startup waits for /health with a deadline
(``etcdproc.py``).
"""

from __future__ import annotations

import contextlib

import pytest

from etcdproc import start_etcd


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def suspended(etcd_server):
    """A context manager that suspends etcd (SIGSTOP) and always resumes it."""
    @contextlib.contextmanager
    def outage():
        etcd_server.suspend()
        try:
            yield
        finally:
            etcd_server.resume()
    yield outage
    etcd_server.resume()
