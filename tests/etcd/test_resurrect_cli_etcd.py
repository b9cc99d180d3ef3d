"""The operator command end to end: a real etcd, a written config file and key file, and
``python -m resurrect.cli`` run as a separate process (exactly what an operator runs).

The records are written the way the primary writes them (an EtcdStore holding the leader
lease, records sealed with the same key file); the control keys are read back with a plain
pyetcd client, so the documented key names and values are what is checked.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyetcd
import pytest

from checkpointd.store import base
from checkpointd.store.errors import NotLeader
from checkpointd.store.etcd import EtcdStore, parse_endpoint
from checkpointd.store.keyring import Keyring, new_key_line
from checkpointd.store.record import CheckpointRecord, conn_key, seal
from kernel.ici import ICI

from etcdproc import free_port

pytestmark = pytest.mark.etcd

ROOT = Path(__file__).resolve().parents[2]
STATE = b"APP-STATE-NEVER-PRINTED"
ICIS = [ICI(family=4, local_addr=ipaddress.ip_address("10.0.0.1"), local_port=80,
            remote_addr=ipaddress.ip_address(f"10.0.0.{i}"), remote_port=5555,
            mss_clamp=1448, snd_una=100, snd_nxt=100, write_seq=100, rcv_nxt=200, copied_seq=200,
            dump_time_ns=time.time_ns())
        for i in (2, 3)]
KEYS = [conn_key(ici.local, ici.remote) for ici in ICIS]

CONFIG = """
[cluster]
name = "{cluster}"
host = "host-a"
[etcd]
endpoints = ["{endpoint}"]
[security]
key_file = "{key_file}"
[network]
vips = ["10.0.0.1"]
interface = "eth0"
"""


class Site:
    """One cluster in the shared etcd: its files, a primary's store, and the command."""

    def __init__(self, tmp_path, endpoint, cluster):
        self.cluster = cluster
        self.key_file = tmp_path / "keys"
        self.key_line = new_key_line("k1")
        self.key_file.write_text(self.key_line + "\n")
        self.key_file.chmod(0o600)
        self.config = tmp_path / "checkpointd.toml"
        self.config.write_text(CONFIG.format(cluster=cluster, endpoint=endpoint, key_file=self.key_file))
        self.keyring = Keyring.from_file(self.key_file)
        self.primary = EtcdStore([endpoint], cluster, timeout=1.0)
        self.lease = self.primary.acquire_leader("host-a", 30)

    def seal_all(self) -> None:
        now = time.time_ns()
        records = {key: CheckpointRecord(conn_key=key, ici=ici.encode(), app_state=STATE,
                                         input_offset=0, output_offset=0, write_offset=0,
                                         ts_val=0, wall_ns=now, epoch=self.lease.epoch, seq=1)
                   for key, ici in zip(KEYS, ICIS)}
        self.primary.put_many({k: seal(r, self.keyring, self.primary.layout.conn(k))
                               for k, r in records.items()}, leader_lease=self.lease)

    def run(self, *args, config=None, input=None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TCPCP_")}
        return subprocess.run(
            [sys.executable, "-m", "resurrect.cli", "--config", str(config or self.config), *args],
            cwd=ROOT, env=env, input=input, capture_output=True, text=True, timeout=60)


@pytest.fixture
def site(tmp_path, etcd_server):
    s = Site(tmp_path, etcd_server.endpoint, f"t-{uuid.uuid4().hex[:12]}")
    yield s
    s.primary.close()


@pytest.fixture
def raw(etcd_server):
    """A plain pyetcd client, to look at what the command wrote."""
    host, port = parse_endpoint(etcd_server.endpoint)
    client = pyetcd.MultiEndpointEtcd3Client(
        endpoints=[pyetcd.Endpoint(host, port, secure=False, time_retry=0.5)], timeout=2.0)
    yield client
    client.close()


def done(proc, code=0):
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def test_list_show_verify_history_read_what_the_primary_wrote(site):
    site.seal_all()
    site.primary.append_history(site.lease.epoch, base.history_value(
        epoch=site.lease.epoch, holder="host-a", acquired_at=time.time_ns(), reason="no leader"))
    data = json.loads(done(site.run("list", "--api", "off", "--format", "json")).stdout)
    assert data["leader"] == {"name": "host-a", "epoch": site.lease.epoch}
    assert [(c["conn_key"], c["owner"], c["bound"]) for c in data["connections"]] == [
        (KEYS[0], "host-a", "ok"), (KEYS[1], "host-a", "ok")]
    assert all(0 <= c["checkpoint_age_s"] < 60 for c in data["connections"])
    table = done(site.run("list", "--api", f"http://127.0.0.1:{free_port()}")).stdout
    assert "10.0.0.1:80 -> 10.0.0.2:5555" in table and "unreachable" in table

    shown = done(site.run("show", "10.0.0.1:80 -> 10.0.0.3:5555", "--api", "off"))
    assert "app_state_bytes" in shown.stdout and "remote_addr" in shown.stdout
    secret = site.key_line.split(":", 1)[1]
    for out in (shown.stdout, shown.stderr):
        assert STATE.decode() not in out and secret not in out

    assert "2 ok, 0 refused" in done(site.run("verify")).stdout
    history = json.loads(done(site.run("history", "--format", "json")).stdout)
    assert [(e["epoch"], e["holder"], e["current"]) for e in history["history"]] == [
        (site.lease.epoch, "host-a", True)]


def test_verify_names_a_tampered_record_and_exits_1(site):
    site.seal_all()
    blob = bytearray(site.primary.get_all().items[KEYS[1]])
    blob[-3] ^= 0x10
    site.primary.put_many({KEYS[1]: bytes(blob)}, leader_lease=site.lease)
    proc = done(site.run("verify", "--format", "json"), 1)
    data = json.loads(proc.stdout)
    assert [(f["conn_key"], f["reason"]) for f in data["failures"]] == [(KEYS[1], "authentication")]
    assert data["ok"] == 1


def test_pause_and_resume_write_and_delete_the_pause_key(site, raw):
    name = f"/tcpcp/{site.cluster}/control/pause"
    done(site.run("pause"))
    value, _ = raw.get(name)
    data = json.loads(value)
    assert set(data) == {"paused_at", "by"} and abs(data["paused_at"] - time.time_ns()) < 60 * 10**9
    assert "Fail-over paused since" in done(site.run("list", "--api", "off")).stdout
    done(site.run("resume"))
    assert raw.get(name) == (None, None)


def test_switchover_writes_the_request_for_the_agents(site, raw):
    name = f"/tcpcp/{site.cluster}/control/switchover"
    assert "already the primary" in done(site.run("switchover", "--to", "host-a", "-y"), 1).stderr
    done(site.run("switchover", "--to", "host-b", input="n\n"), 1)
    assert raw.get(name) == (None, None)
    done(site.run("switchover", "--to", "host-b", input="y\n"))
    data = json.loads(raw.get(name)[0])
    assert {k: data[k] for k in ("to", "from", "epoch")} == {
        "to": "host-b", "from": "host-a", "epoch": site.lease.epoch}
    assert site.primary.leader().name == "host-a"      # the agents act on it, not the command


def test_failover_revokes_the_lease_and_the_leader_key_vanishes(site, raw):
    site.seal_all()
    leader_key = f"/tcpcp/{site.cluster}/leader"
    assert raw.get(leader_key)[0] is not None
    proc = done(site.run("failover", "--to", "host-b", "-y"))
    assert "Revoked the lease of host-a" in proc.stdout
    assert raw.get(leader_key) == (None, None)
    with pytest.raises(NotLeader):
        site.primary.put_many({}, leader_lease=site.lease)   # the old primary is fenced out
    data = json.loads(raw.get(f"/tcpcp/{site.cluster}/control/failover")[0])
    assert {k: data[k] for k in ("to", "from", "epoch")} == {
        "to": "host-b", "from": "host-a", "epoch": site.lease.epoch}
    assert len(site.primary.get_all().items) == 2          # records outlive the leader
    assert "nothing to fail over" in done(site.run("failover", "-y"), 1).stderr


def test_unreachable_etcd_and_a_missing_key_file_are_one_line_exit_2(site, tmp_path):
    dead = tmp_path / "dead.toml"
    dead.write_text(CONFIG.format(cluster=site.cluster, endpoint=f"http://127.0.0.1:{free_port()}",
                                  key_file=site.key_file))
    start = time.monotonic()
    proc = done(site.run("history", config=dead), 2)
    assert time.monotonic() - start < 30
    assert proc.stderr.startswith("resurrect: etcd ") and proc.stderr.count("\n") == 1
    site.key_file.unlink()
    proc = done(site.run("list", "--api", "off"), 2)
    assert str(site.key_file) in proc.stderr and proc.stderr.count("\n") == 1
