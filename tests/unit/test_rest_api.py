"""Root-free tests of checkpointd/api.py: the REST API on 127.0.0.1, any free port, with a
fake status and an injected clock. (Named test_rest_api.py: tests/netns/test_api.py already
holds the basename ``test_api`` and pytest refuses two test modules of one basename.)"""

import http.client
import json
import re
import socket
import threading
import time

import pytest

from checkpointd.api import AgentAPI, loop_age, probe_code
from checkpointd.metrics import CONTENT_TYPE, AgentMetrics

LIVENESS = 3.0
HEALTH = ("/health", "/liveness", "/primary", "/leader", "/standby", "/replica")


class Fake:
    """The agent's side: a status dict and a clock both can move."""

    def __init__(self):
        self.now = 1000.0
        self.st = {"host": "a", "role": "primary", "epoch": 7, "holder": "a", "connections": 3,
                   "fenced": False, "counters": {"checkpoints": 12, "commit_batches": 5,
                                                 "refused": 0, "resurrected": 0, "fenced": 0},
                   "last_resurrection": None, "events": [[999.5, "primary: acquired the leader key"]],
                   "clock": self.now, "wall_ns": 1}
        self.broken = False

    def status(self):
        if self.broken:
            raise RuntimeError("agent bug")
        return dict(self.st)

    def clock(self):
        return self.now


@pytest.fixture
def fake():
    return Fake()


@pytest.fixture
def api(fake):
    a = AgentAPI("127.0.0.1:0", fake.status, AgentMetrics(), liveness_s=LIVENESS, clock=fake.clock)
    a.start()
    yield a
    a.stop()


def request(api, method, path, body=None, headers=None):
    host, port = api.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def codes(api):
    return {path: request(api, "GET", path)[0] for path in HEALTH}


# -- the pure part --------------------------------------------------------------------------

def test_loop_age_prefers_the_ha_loop_heartbeat():
    assert loop_age({"clock": 10.0}, 12.0) == 2.0
    assert loop_age({"clock": 10.0, "ha_loop_at": 4.0}, 12.0) == 8.0
    assert loop_age({}, 12.0) is None
    assert loop_age({"clock": "soon"}, 12.0) is None


def test_probe_code_table():
    fresh = {"role": "primary", "fenced": False, "clock": 0.0}
    assert probe_code("/primary", fresh, 1.0, 3.0) == 200
    assert probe_code("/primary", fresh, 3.0, 3.0) == 200        # exactly at the bound
    assert probe_code("/primary", fresh, 3.5, 3.0) == 503
    assert probe_code("/health", None, 0.0, 3.0) == 503
    assert probe_code("/health", {"role": "standby"}, 0.0, 3.0) == 503   # no clock: not alive
    assert probe_code("/standby", {**fresh, "role": "standby"}, 0.0, 3.0) == 200


# -- over HTTP --------------------------------------------------------------------------------

def test_primary(api, fake):
    assert codes(api) == {"/health": 200, "/liveness": 200, "/primary": 200, "/leader": 200,
                          "/standby": 503, "/replica": 503}


def test_standby(api, fake):
    fake.st.update(role="standby", holder="b")
    assert codes(api) == {"/health": 200, "/liveness": 200, "/primary": 503, "/leader": 503,
                          "/standby": 200, "/replica": 200}


@pytest.mark.parametrize("st", [{"role": "fenced", "fenced": True},
                                {"role": "primary", "fenced": True}])
def test_fenced_is_neither_primary_nor_standby(api, fake, st):
    fake.st.update(st)
    assert codes(api) == {"/health": 200, "/liveness": 200, "/primary": 503, "/leader": 503,
                          "/standby": 503, "/replica": 503}


def test_stale_clock_fails_everything(api, fake):
    fake.now += LIVENESS + 0.5        # the HA loop has not run for longer than liveness_s
    assert set(codes(api).values()) == {503}


def test_ha_loop_heartbeat_is_used_when_the_agent_gives_it(api, fake):
    fake.st.update(clock=fake.now, ha_loop_at=fake.now - LIVENESS - 1)
    assert codes(api)["/health"] == 503
    fake.st.update(ha_loop_at=fake.now - 0.1)
    assert codes(api)["/health"] == 200


def test_body_is_the_status_json(api, fake):
    for path in HEALTH + ("/status",):
        code, ctype, body = request(api, "GET", path)
        assert ctype == "application/json"
        assert json.loads(body) == json.loads(json.dumps(fake.st)), path
    fake.now += 100
    code, _, body = request(api, "GET", "/primary")
    assert code == 503 and json.loads(body)["role"] == "primary"   # 503 still explains


def test_status_unavailable(api, fake):
    fake.broken = True
    code, _, body = request(api, "GET", "/status")
    assert code == 503 and "error" in json.loads(body)
    assert set(codes(api).values()) == {503}
    assert request(api, "GET", "/metrics")[0] == 200   # the counters are still worth reading


def test_metrics(api, fake):
    code, ctype, body = request(api, "GET", "/metrics")
    assert code == 200
    assert ctype == CONTENT_TYPE and "version=0.0.4" in ctype
    text = body.decode()
    assert "# TYPE tcpcp_commit_latency_seconds histogram\n" in text
    assert 'tcpcp_role{role="primary"} 1\n' in text             # refreshed from status at scrape
    assert "tcpcp_checkpoints_total 12\n" in text
    fake.st.update(role="standby")
    text = request(api, "GET", "/metrics")[2].decode()
    assert 'tcpcp_role{role="standby"} 1\n' in text and 'tcpcp_role{role="primary"} 0\n' in text


def raw(api, text: bytes) -> bytes:
    """Everything the server sends for ``text`` until it closes (HTTP/1.0): http.client
    would hide a body wrongly sent after a HEAD."""
    with socket.create_connection(api.address, timeout=5) as s:
        s.sendall(text)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_head_answers_the_same_code_without_a_body(api, fake):
    for path in ("/primary", "/standby", "/metrics", "/status", "/nope"):
        reply = raw(api, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
        head, _, rest = reply.partition(b"\r\n\r\n")
        code = int(head.split()[1])
        assert rest == b"", path
        assert code == request(api, "GET", path)[0]
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        assert length == len(request(api, "GET", path)[2])


@pytest.mark.parametrize("path", ["/", "/nope", "/primaryx", "/failsafe"])
def test_unknown_paths_404(api, path):
    assert request(api, "GET", path)[0] == 404


def test_query_string_and_trailing_slash(api):
    assert request(api, "GET", "/primary?lag=1MB")[0] == 200
    assert request(api, "GET", "/primary/")[0] == 200


def test_failsafe_without_callback_is_503(api):
    code, _, body = request(api, "POST", "/failsafe", body=b"{}")
    assert code == 503 and "error" in json.loads(body)
    assert request(api, "POST", "/elsewhere", body=b"{}")[0] == 404


def test_failsafe_with_callback(fake):
    seen = []

    def on_failsafe(body):
        seen.append(body)
        if body.get("boom"):
            raise RuntimeError("no")
        return {"accepted": True, "epoch": body["epoch"]}

    a = AgentAPI("127.0.0.1:0", fake.status, AgentMetrics(), clock=fake.clock, on_failsafe=on_failsafe)
    a.start()
    try:
        code, ctype, body = request(a, "POST", "/failsafe", body=json.dumps({"epoch": 7}),
                                    headers={"Content-Type": "application/json"})
        assert (code, ctype, json.loads(body)) == (200, "application/json", {"accepted": True, "epoch": 7})
        assert seen == [{"epoch": 7}]
        assert request(a, "POST", "/failsafe", body=b"not json")[0] == 400
        assert request(a, "POST", "/failsafe", body=b"[1, 2]")[0] == 400
        assert request(a, "POST", "/failsafe", body=b'{"boom": 1}')[0] == 500
        assert request(a, "POST", "/failsafe", body=b"x" * 70000)[0] == 413
        assert len(seen) == 2
    finally:
        a.stop()


def test_stop_cleans_up(fake):
    a = AgentAPI("127.0.0.1:0", fake.status, AgentMetrics(), clock=fake.clock)
    host, port = a.start()
    assert port != 0 and a.running
    assert request(a, "GET", "/health")[0] == 200
    a.stop()
    assert not a.running
    assert not [t for t in threading.enumerate() if t.name == "checkpointd-api"]
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()
    a.stop()                             # idempotent


def test_start_twice_refused(api):
    with pytest.raises(RuntimeError):
        api.start()


def test_ipv6_listen(fake):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    a = AgentAPI("[::1]:0", fake.status, AgentMetrics(), clock=fake.clock)
    try:
        host, port = a.start()
    except OSError as exc:
        pytest.skip(f"::1 not available: {exc}")
    try:
        assert host == "::1"
        assert request(a, "GET", "/primary")[0] == 200
    finally:
        a.stop()


def test_concurrent_scrapes(api, fake):
    """Many clients at once: every one answered (ThreadingHTTPServer, thread-safe metrics)."""
    results, deadline = [], time.monotonic() + 10

    def client():
        results.append(request(api, "GET", "/metrics")[0])

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert results == [200] * 16
