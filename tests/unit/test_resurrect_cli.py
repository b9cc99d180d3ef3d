"""The operator command against the memory store (root-free, no etcd).

The store is injected by replacing ``resurrect.cli._store``; the configuration and the key
file are real files, so loading and their errors are the real ones. Records are sealed with
a test keyring exactly as the agent seals them. The wall clock is fixed (``_now_ns``).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from click.testing import CliRunner

from checkpointd import decide
from checkpointd.config import loads
from checkpointd.store import base
from checkpointd.store.keyring import Keyring
from checkpointd.store.memory import FakeClock, MemoryCluster, MemoryStore
from checkpointd.store.record import CheckpointRecord, conn_key, seal
from resurrect import cli
from resurrect.cli import main

from ici_cases import CASES

NOW = 1_800_000_000 * 10**9
KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()
STATE = b"APP-STATE-NEVER-PRINTED"
V4 = CASES["v4_full"]        # 10.77.0.100:7000 -> 10.77.0.1:40001
V6 = CASES["v6_usec_ts"]     # [fd77::100]:443 -> [fd77::1]:51234
K4 = conn_key(V4.local, V4.remote)
K6 = conn_key(V6.local, V6.remote)

CONFIG = """
[cluster]
name = "c1"
host = "host-a"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
[security]
key_file = "{key_file}"
[network]
vips = ["10.77.0.100"]
interface = "eth0"
"""


class Env:
    """A config file, a key file, a memory etcd with a leader, and the CLI runner."""

    def __init__(self, tmp_path, monkeypatch):
        self.key_file = tmp_path / "keys"
        self.key_file.write_text(f"# test key\nk1:{KEY_B64}\n")
        self.key_file.chmod(0o600)
        self.config_file = tmp_path / "checkpointd.toml"
        self.config_file.write_text(CONFIG.format(key_file=self.key_file))
        self.config = loads(CONFIG.format(key_file=self.key_file), env={})
        self.keyring = Keyring.from_file(self.key_file)
        self.clock = FakeClock()
        self.cluster = MemoryCluster(self.clock)
        self.store = MemoryStore(self.cluster, "c1")
        self.made = []
        for var in list(os.environ):
            if var.startswith("TCPCP_"):
                monkeypatch.delenv(var)
        monkeypatch.setattr(cli, "_store", self._make_store)
        monkeypatch.setattr(cli, "_now_ns", lambda: NOW)
        self.lease = self.store.acquire_leader("host-a", 30)

    def _make_store(self, config):
        store = MemoryStore(self.cluster, config.cluster_name)
        self.made.append(store)
        return store

    def record(self, of=V4, **changes) -> CheckpointRecord:
        """A record of the connection ``of`` (an ICI), as the agent would seal it now."""
        fields = dict(conn_key=conn_key(of.local, of.remote), ici=of.encode(), app_state=STATE,
                      input_offset=2000, output_offset=90, write_offset=110, ts_val=5,
                      wall_ns=NOW - 2 * 10**9, epoch=self.lease.epoch, seq=4, unacked=b"log")
        fields.update(changes)
        return CheckpointRecord(**fields)

    def put(self, *recs, lease=None) -> None:
        lease = lease or self.lease
        self.store.put_many({r.conn_key: seal(r, self.keyring, self.store.layout.conn(r.conn_key))
                             for r in recs}, leader_lease=lease)

    def put_raw(self, key: str, blob: bytes) -> None:
        self.store.put_many({key: blob}, leader_lease=self.lease)

    def run(self, *args, input=None, config=True):
        pre = ["--config", str(self.config_file)] if config else []
        return CliRunner().invoke(main, [*pre, *args], input=input)


@pytest.fixture
def env(tmp_path, monkeypatch):
    return Env(tmp_path, monkeypatch)


def ok(result, code=0):
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def as_json(result) -> dict:
    return json.loads(result.stdout)


# -- list --------------------------------------------------------------------------------------

def test_list_table_shows_tuple_owner_age_and_bound_in_aligned_columns(env):
    env.put(env.record(V4), env.record(V6, wall_ns=NOW - 500 * 10**6))
    out = ok(env.run("list", "--api", "off")).output
    assert "Cluster c1: leader host-a (epoch 1); 2 protected connections" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Connection"))
    table = lines[header:]
    assert set(table[1]) == {"-", " "}
    rows = table[2:]
    assert rows[0].startswith("10.77.0.100:7000 -> 10.77.0.1:40001")
    assert rows[1].startswith("[fd77::100]:443 -> [fd77::1]:51234")
    for name in ("Owner", "Bound"):      # every row has its value where the header has the name
        col = table[0].index(name)
        assert [r[col:].split()[0] for r in rows] == (["host-a"] * 2 if name == "Owner" else ["ok"] * 2)
    assert "2.0 s" in rows[0] and "0.5 s" in rows[1]


def test_list_json_has_every_field_and_no_live_figures_without_the_api(env):
    env.put(env.record(V4))
    data = as_json(ok(env.run("list", "--api", "off", "--format", "json")))
    assert data["leader"] == {"name": "host-a", "epoch": 1}
    assert data["pause"] is None and data["switchover"] is None and data["failover"] is None
    (conn,) = data["connections"]
    assert conn == {
        "conn_key": K4, "local": "10.77.0.100:7000", "peer": "10.77.0.1:40001",
        "owner": "host-a", "leader_epoch": 1, "record_epoch": 1, "seq": 4,
        "wall_ns": NOW - 2 * 10**9, "checkpoint_age_s": 2.0, "bytes_since_checkpoint": None,
        "guarded": None, "unprotected": None, "bound": "ok", "bound_reason": conn["bound_reason"]}
    assert "may be resurrected" in conn["bound_reason"]


def test_list_shows_a_lapsed_leader_and_an_old_epoch(env):
    env.put(env.record(V4))
    env.store.resign(env.lease)
    lease2 = env.store.acquire_leader("host-b", 30)
    env.put(env.record(V6, epoch=lease2.epoch), lease=lease2)
    data = as_json(ok(env.run("list", "--api", "off", "--format", "json")))
    by_key = {c["conn_key"]: c for c in data["connections"]}
    assert by_key[K4]["owner"] == "host-b" and by_key[K4]["bound"] == "epoch"
    assert by_key[K6]["bound"] == "ok"
    table = ok(env.run("list", "--api", "off")).output
    assert "1 (leader 2)" in table
    env.store.resign(lease2)
    assert "no leader (last epoch 2)" in ok(env.run("list", "--api", "off")).output


class _Agent:
    """A stand-in for the agent's REST API: GET /status answers ``status``."""

    def __init__(self, status):
        body = json.dumps(status).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                code = 200 if self.path == "/status" else 404
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_list_merges_live_figures_from_the_agent(env):
    env.put(env.record(V4), env.record(V6))
    status = {"host": "host-a", "role": "primary",
              "conns": [{"key": K4, "bytes_since_checkpoint": 1234, "guarded": True,
                         "unprotected": False},
                        {"key": K6, "bytes_since_checkpoint": 7, "guarded": True,
                         "unprotected": True}]}
    with _Agent(status) as agent:
        data = as_json(ok(env.run("list", "--api", agent.url, "--format", "json")))
        table = ok(env.run("list", "--api", agent.url)).output
    by_key = {c["conn_key"]: c for c in data["connections"]}
    assert by_key[K4]["bytes_since_checkpoint"] == 1234 and by_key[K4]["guarded"] is True
    assert by_key[K6]["unprotected"] is True
    assert "host-a, primary" in data["api"]
    row4 = next(line for line in table.splitlines() if line.startswith("10.77.0.100"))
    row6 = next(line for line in table.splitlines() if line.startswith("[fd77"))
    assert "1234" in row4.split() and "guarded" in row4.split()
    assert "unprotected" in row6.split()


def test_list_shows_dashes_when_the_agent_has_no_figures_or_is_unreachable(env):
    env.put(env.record(V4))
    with _Agent({"host": "host-a", "role": "primary"}) as agent:
        data = as_json(ok(env.run("list", "--api", agent.url, "--format", "json")))
    assert data["connections"][0]["bytes_since_checkpoint"] is None
    assert "no per-connection figures" in data["api"]
    with _Agent({}) as agent:
        url = agent.url
    # the server is closed: nothing listens there any more
    result = ok(env.run("list", "--api", url))
    assert "unreachable" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("10.77.0.100"))
    assert row.split()[-3:] == ["-", "-", "ok"]     # since checkpoint, live, bound


def test_api_default_comes_from_the_config_when_it_has_api_listen():
    class Cfg:
        pass

    assert cli._api_default(Cfg()) == "http://127.0.0.1:8008"
    for listen, url in (("0.0.0.0:9000", "http://127.0.0.1:9000"), ("[::]:9000", "http://[::1]:9000"),
                        ("192.0.2.7:8008", "http://192.0.2.7:8008"),
                        ("http://10.0.0.1:8080/", "http://10.0.0.1:8080")):
        cfg = Cfg()
        cfg.api_listen = listen
        assert cli._api_default(cfg) == url


def test_a_non_http_api_url_is_refused(env):
    result = env.run("list", "--api", "file:///etc/passwd")
    assert result.exit_code == 2 and "--api" in result.output


# -- show ----------------------------------------------------------------------------------------

def test_show_prints_the_decoded_ici_and_sizes_never_keys_or_state(env):
    env.put(env.record(V4))
    out = ok(env.run("show", K4, "--api", "off")).output
    for text in ("10.77.0.100:7000 -> 10.77.0.1:40001", "leader host-a (epoch 1)",
                 "snd_una", "recv_queue_len", "input_offset", "sealed_with_key", "k1"):
        assert text in out
    assert any(line.split() == ["app_state_bytes", str(len(STATE))] for line in out.splitlines())
    data = as_json(ok(env.run("show", K4, "--api", "off", "--format", "json")))
    assert data["record"]["app_state_bytes"] == len(STATE)
    assert data["record"]["unacked_bytes"] == 3 and data["record"]["epoch"] == 1
    assert data["ici"]["local_port"] == 7000 and data["ici"]["sent_queue_len"] == 4
    assert data["bound"] == "ok"
    for text in (out, json.dumps(data)):
        assert STATE.decode() not in text
        assert KEY_B64 not in text and KEY.hex() not in text and repr(KEY) not in text
        assert "SENT" not in text and "UNSENT" not in text     # queue contents


def test_show_finds_a_connection_by_its_tuple_or_a_unique_prefix(env):
    env.put(env.record(V4), env.record(V6))
    for name in ("10.77.0.100:7000 -> 10.77.0.1:40001", "10.77.0.100:7000-10.77.0.1:40001", "10.77"):
        assert as_json(ok(env.run("show", name, "--api", "off", "--format", "json")))["conn_key"] == K4


def test_show_refuses_unknown_ambiguous_and_malformed_names(env):
    env.put(env.record(V4), env.record(V4.replace(remote_port=40002)))
    missing = ok(env.run("show", "10.9.9.9:1-10.9.9.8:2", "--api", "off"), 1)
    assert "no checkpoint record" in missing.output
    ambiguous = ok(env.run("show", "10.77.0.100:7000-", "--api", "off"), 1)
    assert "names 2 connections" in ambiguous.output
    assert ok(env.run("show", "a/b", "--api", "off"), 2).exit_code == 2


def test_show_of_a_tampered_record_names_the_refusal_and_exits_1(env):
    env.put(env.record(V4))
    blob = bytearray(env.store.get_all().items[K4])
    blob[-1] ^= 1
    env.put_raw(K4, bytes(blob))
    data = as_json(ok(env.run("show", K4, "--api", "off", "--format", "json"), 1))
    assert data["bound"] == "authentication" and data["ici"] is None
    assert data["record"] == {"conn_key": K4, "sealed_bytes": len(blob), "sealed_with_key": "k1"}


# -- verify --------------------------------------------------------------------------------------

def test_verify_passes_a_clean_store(env):
    env.put(env.record(V4), env.record(V6))
    out = ok(env.run("verify")).output
    assert "2 records" in out and "2 ok, 0 refused" in out
    data = as_json(ok(env.run("verify", "--format", "json")))
    assert data["records"] == 2 and data["ok"] == 2 and data["failures"] == []


def test_verify_names_a_tampered_and_an_expired_record_and_exits_1(env):
    env.put(env.record(V4), env.record(V6, wall_ns=NOW - 121 * 10**9))
    blob = bytearray(env.store.get_all().items[K4])
    blob[40] ^= 0x80
    env.put_raw(K4, bytes(blob))
    result = ok(env.run("verify"), 1)
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines()
            if line.startswith(("10.77", "[fd77"))}
    assert rows == {K4: "authentication", K6: "stale"}
    assert "0 ok, 2 refused (authentication 1, stale 1)" in result.output
    data = as_json(ok(env.run("verify", "--format", "json"), 1))
    assert data["counts"] == {"authentication": 1, "stale": 1}
    assert {f["conn_key"]: f["reason"] for f in data["failures"]} == {K4: "authentication", K6: "stale"}
    assert "MSL" in next(f["detail"] for f in data["failures"] if f["conn_key"] == K6)


def test_verify_refuses_an_old_epoch_a_foreign_ici_and_an_undecodable_one(env):
    env.store.resign(env.lease)
    env.lease = env.store.acquire_leader("host-b", 30)      # epoch 2
    key_x = "10.1.1.1:1-10.1.1.2:2"
    env.put(env.record(V4, epoch=1), env.record(V6), env.record(V4, conn_key=key_x))
    bad_ici = env.record(V4.replace(local_port=7001), ici=b"TCPI junk")
    env.put(bad_ici)
    data = as_json(ok(env.run("verify", "--format", "json"), 1))
    reasons = {f["conn_key"]: f["reason"] for f in data["failures"]}
    assert reasons == {K4: "epoch", key_x: "ici", bad_ici.conn_key: "ici"}
    assert "not 10.1.1.1:1-10.1.1.2:2" in next(f["detail"] for f in data["failures"]
                                                  if f["conn_key"] == key_x)
    assert data["ok"] == 1


def test_every_bound_sentence_of_may_resurrect_maps_to_its_reason(env):
    config = env.config
    meta = decide.RecordMeta
    cases = {
        "authentication": meta(epoch=1, wall_ns=NOW, authenticated=False, auth_detail="x"),
        "epoch": meta(epoch=2, wall_ns=NOW),
        "clock": meta(epoch=1, wall_ns=NOW + 10**9),
        "stale": meta(epoch=1, wall_ns=NOW - 200 * 10**9),
        "bytes": meta(epoch=1, wall_ns=NOW, bytes_in=1 << 31),
    }
    for code, m in cases.items():
        allowed, why = decide.may_resurrect(m, NOW, config, epoch=1)
        assert not allowed and cli._bound_code(why) == code, why


# -- history -------------------------------------------------------------------------------------

def test_history_lists_epochs_and_holders_marking_the_current_one(env):
    env.store.append_history(1, base.history_value(epoch=1, holder="host-a", acquired_at=NOW - 10**9,
                                                   reason="no leader"))
    env.store.resign(env.lease)
    env.store.acquire_leader("host-b", 30)
    env.store.append_history(2, base.history_value(epoch=2, holder="host-b", acquired_at=NOW,
                                                   reason="switchover from host-a"))
    env.store.append_history(3, b"not json")
    data = as_json(ok(env.run("history", "--format", "json")))
    assert [(e["epoch"], e["holder"], e["current"]) for e in data["history"]] == [
        (1, "host-a", False), (2, "host-b", True), (3, None, False)]
    assert data["history"][1]["acquired_at"] == NOW
    assert "malformed" in data["history"][2]["reason"]
    out = ok(env.run("history")).output
    row2 = next(line for line in out.splitlines() if line.split()[:2] == ["2", "host-b"])
    assert "switchover from host-a" in row2 and row2.rstrip().endswith("*")
    assert "2027-01-15T08:00:00.000Z" in row2


def test_text_from_etcd_cannot_drive_the_terminal(env):
    env.store.append_history(1, base.history_value(epoch=1, holder="host-a\x1b[2J",
                                                   acquired_at=10**30, reason="r\x07"))
    out = ok(env.run("history")).output
    assert "\x1b" not in out and "\x07" not in out
    assert "host-a\\x1b[2J" in out and "r\\x07" in out and str(10**30) in out


def test_history_says_when_there_is_none(env):
    assert "No history entries" in ok(env.run("history")).output


# -- pause, resume ------------------------------------------------------------------------------

def test_pause_writes_the_pause_key_and_resume_deletes_it(env):
    assert "Paused fail-over" in ok(env.run("pause")).output
    value = json.loads(env.store.get_control("pause"))
    assert value["paused_at"] == NOW and "@" in value["by"] and set(value) == {"paused_at", "by"}
    again = ok(env.run("pause")).output
    assert "already paused" in again
    assert json.loads(env.store.get_control("pause")) == value      # not rewritten
    assert "Fail-over paused since" in ok(env.run("list", "--api", "off")).output
    assert "Resumed" in ok(env.run("resume")).output
    assert env.store.get_control("pause") is None
    assert "was not paused" in ok(env.run("resume")).output


# -- switchover ---------------------------------------------------------------------------------

def test_switchover_writes_the_request_after_confirmation(env):
    declined = ok(env.run("switchover", "--to", "host-b", input="n\n"), 1)
    assert "Switch over cluster c1 from host-a (epoch 1) to host-b?" in declined.output
    assert env.store.get_control("switchover") is None
    ok(env.run("switchover", "--to", "host-b", input="y\n"))
    assert json.loads(env.store.get_control("switchover")) == {
        "to": "host-b", "from": "host-a", "epoch": 1, "requested_at": NOW}
    assert env.store.leader().name == "host-a"            # the agents act, not the command


def test_switchover_with_force_asks_nothing_and_list_shows_it(env):
    result = ok(env.run("switchover", "--to", "host-b", "-y"))
    assert "?" not in result.output
    assert "Switchover to host-b requested" in ok(env.run("list", "--api", "off")).output
    data = as_json(ok(env.run("list", "--api", "off", "--format", "json")))
    assert data["switchover"]["to"] == "host-b"


def test_switchover_refuses_the_current_leader_no_leader_and_a_bad_name(env):
    assert "already the primary" in ok(env.run("switchover", "--to", "host-a", "-y"), 1).output
    assert ok(env.run("switchover", "--to", "bad/name", "-y"), 2).exit_code == 2
    env.store.resign(env.lease)
    assert "nothing to switch over" in ok(env.run("switchover", "--to", "host-b", "-y"), 1).output
    assert env.store.get_control("switchover") is None


# -- failover -----------------------------------------------------------------------------------

def test_failover_revokes_the_leader_lease_after_confirmation(env):
    ok(env.run("failover", input="n\n"), 1)
    assert env.store.leader().name == "host-a"
    result = ok(env.run("failover", input="y\n"))
    assert "Revoked the lease of host-a (epoch 1)" in result.output
    state = env.store.leader()
    assert state.vacant and state.epoch == 1
    assert json.loads(env.store.get_control("failover")) == {
        "to": None, "from": "host-a", "epoch": 1, "requested_at": NOW}
    assert "nothing to fail over" in ok(env.run("failover", "-y"), 1).output


def test_failover_while_paused_needs_a_target(env):
    ok(env.run("pause"))
    assert "paused" in ok(env.run("failover", "-y"), 1).output
    assert env.store.leader().name == "host-a"
    assert "already the primary" in ok(env.run("failover", "--to", "host-a", "-y"), 1).output
    ok(env.run("failover", "--to", "host-b", "-y"))
    assert env.store.leader().vacant
    assert json.loads(env.store.get_control("failover"))["to"] == "host-b"


def test_failover_does_not_revoke_a_leader_that_changed_after_it_was_read(env, monkeypatch):
    """The lease confirmed by the operator is the only one revoked."""
    real = MemoryStore.leader

    def leader_then_takeover(store):
        state = real(store)
        env.store.resign(env.lease)
        env.lease = env.store.acquire_leader("host-b", 30)
        monkeypatch.setattr(MemoryStore, "leader", real)
        return state

    monkeypatch.setattr(MemoryStore, "leader", leader_then_takeover)
    assert "changed since it was read" in ok(env.run("failover", "-y"), 1).output
    assert env.store.leader().name == "host-b"
    assert env.store.get_control("failover") is None


# -- errors: one line, exit 2 ---------------------------------------------------------------------

def test_bad_config_is_one_line_and_exit_2(env):
    env.config_file.write_text("[cluster\nname=")
    result = ok(env.run("list"), 2)
    assert result.output.count("\n") == 1 and "not valid TOML" in result.output
    missing = ok(env.run("--config", "/nonexistent/tcpcp.toml", "list", config=False), 2)
    assert "cannot read /nonexistent/tcpcp.toml" in missing.output


def test_missing_or_open_key_file_is_exit_2_naming_the_path(env):
    env.key_file.chmod(0o644)
    result = ok(env.run("list", "--api", "off"), 2)
    assert str(env.key_file) in result.output and "chmod 600" in result.output
    env.key_file.unlink()
    result = ok(env.run("verify"), 2)
    assert "cannot open" in result.output and result.output.count("\n") == 1
    assert KEY_B64 not in result.output


@pytest.mark.parametrize("command", [["list", "--api", "off"], ["show", K4], ["verify"], ["history"],
                                     ["pause"], ["resume"], ["switchover", "--to", "host-b", "-y"],
                                     ["failover", "-y"]])
def test_unreachable_etcd_is_exit_2_for_every_command(env, command):
    env.cluster.down = True
    result = ok(env.run(*command), 2)
    assert result.output.startswith("resurrect: ") and "cluster down" in result.output
    assert result.output.count("\n") == 1


def test_the_default_config_may_be_absent_when_the_environment_says_everything(env, monkeypatch):
    if os.path.exists(cli.DEFAULT_CONFIG):
        pytest.skip(f"{cli.DEFAULT_CONFIG} exists on this machine")
    result = ok(env.run("history", config=False), 2)
    assert cli.DEFAULT_CONFIG in result.output
    for var, value in (("CLUSTER_NAME", "c1"), ("CLUSTER_HOST", "h"),
                       ("ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
                       ("SECURITY_KEY_FILE", str(env.key_file)), ("NETWORK_VIPS", "10.0.0.1"),
                       ("NETWORK_INTERFACE", "eth0")):
        monkeypatch.setenv(f"TCPCP_{var}", value)
    assert "Cluster c1" in ok(env.run("history", config=False)).output


def test_decode_needs_no_configuration(tmp_path):
    path = tmp_path / "v4.ici"
    path.write_bytes(V4.encode())
    result = CliRunner().invoke(main, ["--config", "/nonexistent", "decode", str(path)])
    assert result.exit_code == 0 and "local_port" in result.output


# -- the store helper and the table -------------------------------------------------------------

def test_store_uses_store_from_config_when_the_etcd_backend_has_it(env, monkeypatch):
    from checkpointd.store import etcd

    monkeypatch.undo()          # the real _store
    made = []
    monkeypatch.setattr(etcd, "store_from_config", lambda config: made.append(config) or "store",
                        raising=False)
    assert cli._store(env.config) == "store" and made == [env.config]
    monkeypatch.delattr(etcd, "store_from_config")
    store = cli._store(env.config)
    try:
        assert isinstance(store, etcd.EtcdStore)
        assert store.endpoints == env.config.etcd_endpoints
        assert store.timeout == env.config.retry_timeout and store.layout.cluster == "c1"
    finally:
        store.close()


def test_store_errors_become_one_line(env, monkeypatch):
    from checkpointd.store import etcd

    monkeypatch.undo()

    def refuse(config):
        raise ValueError("etcd.ca: cannot read /x")

    monkeypatch.setattr(etcd, "store_from_config", refuse, raising=False)
    with pytest.raises(cli.CannotRun) as info:
        cli._store(env.config)
    assert info.value.exit_code == 2 and "etcd.ca: cannot read /x" in info.value.message


def test_table_aligns_columns_and_right_aligns_numbers():
    text = cli._table(["Name", "N"], [["a", 1], ["long name", 100], ["b", None]], right=(1,))
    assert text.splitlines() == [
        "Name         N",
        "---------  ---",
        "a            1",
        "long name  100",
        "b            -",
    ]
