"""The demo applications (checkpointd/apps) on 127.0.0.1 with the fake agent of
test_app_library: curl downloads from httpstream, peers/kv_client.py drives the KV
service, and both resume on a second application instance from the fake agent's last
checkpoint, on the same socket (no kernel tricks, no root): the peer sees one continuous
stream. The pure parts (regeneration from any offset, the KV protocol against the
client's model) are tested first."""

from __future__ import annotations

import collections
import importlib.util
import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from checkpointd import offsets
from checkpointd.app import AgentClient, outq
from checkpointd.apps import listen
from checkpointd.apps import httpstream, kv
from checkpointd.apps.httpstream import HttpStream
from checkpointd.apps.kv import KV
from test_app_library import FakeAgent, wait_until

ROOT = Path(__file__).resolve().parents[2]
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def load_kv_client():
    spec = importlib.util.spec_from_file_location("kv_client", ROOT / "peers" / "kv_client.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tcp_written(sock: socket.socket) -> int:
    """Bytes written into a socket, from the kernel: bytes the peer acknowledged
    (TCP_INFO tcpi_bytes_acked) plus those it has not (SIOCOUTQ)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
    return struct.unpack_from("=Q", info, 120)[0] + outq(sock)


def start(cls, agent: FakeAgent | None):
    client = None if agent is None else AgentClient(agent.path, regenerable=cls.regenerable, timeout=5)
    return cls(listen("127.0.0.1", 0), client).start()


def shut(server):
    server.stop()
    if server.client is not None:
        server.client.close()


def port_of(server) -> int:
    return server.listener.getsockname()[1]


def split_payload(commit):
    """(state, unacknowledged output) of a commit message."""
    n = commit["unacked_len"]
    return commit.payload[:len(commit.payload) - n], commit.payload[len(commit.payload) - n:]


@pytest.fixture
def agent(tmp_path):
    a = FakeAgent(tmp_path / "agent.sock")
    yield a
    a.close()


# -- pure parts ------------------------------------------------------------------------------------

def test_response_regenerates_identically_from_any_offset():
    st = httpstream.parse_request(b"GET /stream?len=100000&seed=42 HTTP/1.1\r\nHost: x", 60)
    whole = httpstream.response(st, 0, 200_000)
    head = httpstream.headers(100_000)
    assert whole.startswith(head) and len(whole) == st["hlen"] + st["len"] == len(head) + 100_000
    assert b"Content-Length: 100000\r\n" in head
    rng = random.Random(1)
    for _ in range(50):
        off = rng.randrange(len(whole))
        n = rng.randrange(1, 10_000)
        assert httpstream.response(st, off, n) == whole[off:off + n]
    assert httpstream.body(42, 0, 100_000) == whole[len(head):]
    assert httpstream.body(42, 4000, 200) == whole[len(head) + 4000:len(head) + 4200]
    assert httpstream.body(43, 0, 100) != httpstream.body(42, 0, 100)


def test_parse_request_and_errors():
    st = httpstream.parse_request(b"GET /stream?len=10&seed=3&rate=5 HTTP/1.1\r\nHost: x", 52)
    assert st == {"status": 200, "len": 10, "seed": 3, "rate": 5, "hlen": len(httpstream.headers(10)), "in": 52}
    assert httpstream.parse_request(b"GET /other HTTP/1.1", 23)["status"] == 404
    assert httpstream.parse_request(b"POST /stream HTTP/1.1", 25)["status"] == 405
    assert httpstream.parse_request(b"GET /stream?len=x HTTP/1.1", 30)["status"] == 400
    assert httpstream.parse_request(b"garbage", 11)["status"] == 400
    err = httpstream.parse_request(b"GET /other HTTP/1.1", 23)
    assert httpstream.response(err, 0, 1000).endswith(b"\r\n\r\n404 Not Found\n")


def test_kv_server_agrees_with_the_clients_model():
    client = load_kv_client()
    server_state, model_state = {}, {}
    gen = client.requests(random.Random(5))
    for _ in range(3000):
        line = next(gen)
        assert kv.apply(server_state, line) == client.model_apply(model_state, line)
    assert server_state == model_state
    assert kv.apply({}, "NOPE") == client.model_apply({}, "NOPE") == "ERR bad request"
    store, n = kv.decode_state(kv.encode_state({"a": "1"}, 7))
    assert (store, n) == ({"a": "1"}, 7) and kv.decode_state(b"") == ({}, 0)


# -- httpstream, curl ----------------------------------------------------------------------------

@needs_curl
def test_curl_downloads_from_httpstream(agent, tmp_path):
    server = start(HttpStream, agent)
    try:
        jobs = [(1_000_000, 1, 0), (300_000, 2, 1_000_000), (0, 3, 0)]   # (len, seed, rate)
        procs = []
        for i, (length, seed, rate) in enumerate(jobs):
            url = f"http://127.0.0.1:{port_of(server)}/stream?len={length}&seed={seed}&rate={rate}"
            procs.append(subprocess.Popen([CURL, "-sS", "--max-time", "30", "-o", str(tmp_path / f"{i}.bin"), url]))
        for proc in procs:
            assert proc.wait(40) == 0
        for i, (length, seed, rate) in enumerate(jobs):
            assert (tmp_path / f"{i}.bin").read_bytes() == httpstream.body(seed, 0, length)
        agent.wait(lambda: len(agent.ops("release")) == 3, what="three releases")
        for reg in agent.ops("register"):
            commits = agent.commits(reg["conn"])
            st = json.loads(commits[0].payload)
            assert commits[0]["input"] == st["in"] > 0 and commits[0]["output"] == 0
            assert all(c["unacked_len"] == 0 for c in commits)       # regenerable: no log
            outs = [c["output"] for c in commits]
            assert outs == sorted(outs) and outs[-1] == st["hlen"] + st["len"] == commits[-1]["write"]
            if st["rate"]:
                assert len(commits) >= 4                            # periodic commits while sending
        wait_until(lambda: server.stats["completed"] == 3, what="the handlers' end")
        assert server.stats["errors"] == 0
    finally:
        shut(server)


@needs_curl
@pytest.mark.parametrize("mode", ["agent", "no-agent"])
def test_httpstream_command_line(agent, tmp_path, mode):
    cmd = [sys.executable, "-m", "checkpointd.apps.httpstream", "--listen", "127.0.0.1:0"]
    cmd += ["--agent", agent.path] if mode == "agent" else ["--no-agent"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.rsplit(":", 1)[1])
        out = tmp_path / "dl.bin"
        subprocess.run([CURL, "-sS", "--max-time", "30", "-o", str(out),
                        f"http://127.0.0.1:{port}/stream?len=2000000&seed=77"], check=True, timeout=40)
        assert out.read_bytes() == httpstream.body(77, 0, 2_000_000)
        if mode == "agent":
            assert port in agent.served                                # serve: resumed ones come here
            agent.wait(lambda: agent.ops("release"), what="release")
            assert len(agent.ops("register")) == 1
        else:
            assert agent.messages == []
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_command_line_without_an_agent_says_so(tmp_path):
    res = subprocess.run([sys.executable, "-m", "checkpointd.apps.kv", "--listen", "127.0.0.1:0",
                          "--agent", str(tmp_path / "nope.sock")], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "no checkpointd agent at" in res.stderr


# -- KV, peers/kv_client.py ------------------------------------------------------------------------

def run_kv_client(port, *extra, timeout=60):
    res = subprocess.run([sys.executable, str(ROOT / "peers" / "kv_client.py"), "--connect",
                          f"127.0.0.1:{port}", "--json", *extra], capture_output=True, text=True,
                         timeout=timeout)
    return res.returncode, json.loads(res.stdout.strip().splitlines()[-1])


def test_kv_client_verifies_every_reply(agent):
    server = start(KV, agent)
    try:
        rc, rep = run_kv_client(port_of(server), "--connections", "4", "--seconds", "1.5",
                                "--rate", "300", "--seed", "9")
        assert rc == 0 and rep["ok"], rep
        assert rep["requests"] == rep["replies_verified"] > 1000
        assert rep["mismatches"] == rep["resets"] == rep["missing_replies"] == 0
        agent.wait(lambda: len(agent.ops("release")) == 4, what="four releases")
        for reg in agent.ops("register"):
            commits = agent.commits(reg["conn"])
            ins = [c["input"] for c in commits]
            assert ins == sorted(ins) and commits[-1]["input"] == commits[-1]["read"]
            assert all(c["output"] == c["write"] for c in commits)      # O = W after each batch
            state, _ = split_payload(commits[-1])
            store, n = kv.decode_state(state)
            assert n > 250 and all(k.startswith("k") for k in store)
    finally:
        shut(server)


def test_kv_command_line_closed_loop(agent):
    proc = subprocess.Popen([sys.executable, "-m", "checkpointd.apps.kv", "--listen", "127.0.0.1:0",
                             "--agent", agent.path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        rc, rep = run_kv_client(port, "--connections", "2", "--seconds", "0.5", "--closed-loop")
        assert rc == 0 and rep["ok"] and rep["requests_per_s"] > 0 and rep["p99_ms"] > 0, rep
    finally:
        proc.terminate()
        proc.wait(10)


# -- resume on a second instance, same socket ------------------------------------------------------

def resume_point(commit, *, write_final: int, unacked: bytes = b"") -> offsets.Resume:
    """offsets.resume for a checkpoint made of ``commit`` (anchored at arbitrary sequence
    numbers) when the peer has everything written so far: L = ``write_final``."""
    wseq = 70_000
    ck = offsets.StreamCheckpoint(
        input_offset=commit["input"], output_offset=commit["output"],
        rcv_anchor=offsets.Anchor(commit["read"], 5_000),
        snd_anchor=offsets.Anchor(commit["write"], wseq),
        snd_una=(wseq - len(unacked)) % offsets.SEQ_MOD, send_queue=unacked)
    return offsets.resume(ck, (wseq + write_final - commit["write"]) % offsets.SEQ_MOD)


@needs_curl
def test_httpstream_resumes_on_a_second_instance(tmp_path):
    agent1, agent2 = FakeAgent(tmp_path / "a1.sock"), FakeAgent(tmp_path / "a2.sock")
    server1 = start(HttpStream, agent1)
    server2 = HttpStream(None, AgentClient(agent2.path, regenerable=True)).start()
    length, seed = 1_500_000, 99
    out = tmp_path / "dl.bin"
    curl = subprocess.Popen([CURL, "-sS", "--max-time", "30", "-o", str(out),
                             f"http://127.0.0.1:{port_of(server1)}/stream?len={length}&seed={seed}&rate=2000000"])
    try:
        agent1.wait(lambda: agent1.ops("register"), what="register")
        conn = agent1.ops("register")[0]["conn"]
        agent1.commits(conn, wait_for=4)                       # the download is flowing
        p1 = server1.handles[conn]
        server1.abandon()                                      # "crash": no commit, no release
        assert server1.stats["abandoned"] == 1
        kept = agent1.socks[conn]
        W = tcp_written(kept)
        assert W == p1.write                                   # the kernel agrees with the library's W
        ck = agent1.commits(conn)[-2]                          # the newest one never became durable
        r = resume_point(ck, write_final=W)
        assert r.resend == b"" and r.stream_offset == W and r.discard == W - ck["output"] > 0
        agent2.resume(conn, kept, ck.payload, input=r.input_offset, output=r.output_offset,
                      discard=r.discard)
        agent1.socks.pop(conn).close()                         # the origin is gone
        assert curl.wait(40) == 0
        assert out.read_bytes() == httpstream.body(seed, 0, length)   # continuous: nothing lost or doubled
        agent2.wait(lambda: agent2.ops("release"), what="release by the second instance")
        c2 = agent2.commits(conn)
        assert c2[0]["read"] == r.input_offset and c2[-1]["write"] == len(httpstream.headers(length)) + length
        wait_until(lambda: server2.stats["completed"] == 1, what="the handler's end")
        assert server2.stats["resumed"] == 1 and server2.stats["errors"] == 0
    finally:
        curl.kill()
        curl.wait()
        shut(server1)
        shut(server2)
        agent1.close()
        agent2.close()


class KVPeer:
    """An in-test KV peer that can also do what its kernel would after a fail-over:
    send again every byte after the commit offset (``retransmit``)."""

    def __init__(self, port: int, seed: int):
        self.client = load_kv_client()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.gen = self.client.requests(random.Random(seed))
        self.model: dict = {}
        self.expected: collections.deque = collections.deque()
        self.all_replies = bytearray()
        self.sent = bytearray()
        self.received = bytearray()
        self.verified, self.mismatches = 0, []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.received += data
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                with self.lock:
                    want = self.expected.popleft() if self.expected else None
                if line.decode() == want:
                    self.verified += 1
                else:
                    self.mismatches.append((line.decode(), want))

    def send_requests(self, n: int, rng=random.Random(4)):
        i = 0
        while i < n:
            lines = [next(self.gen) for _ in range(min(n - i, rng.randrange(1, 4)))]
            with self.lock:
                for line in lines:
                    reply = self.client.model_apply(self.model, line)
                    self.expected.append(reply)
                    self.all_replies += (reply + "\n").encode()
            data = "".join(line + "\n" for line in lines).encode()
            self.sock.sendall(data)
            self.sent += data
            i += len(lines)
            time.sleep(0.001)

    def retransmit(self, offset: int):
        self.sock.sendall(self.sent[offset:])

    def wait_replies(self, timeout=20):
        wait_until(lambda: not self.expected, timeout, "the replies")


def test_kv_resumes_on_a_second_instance(tmp_path):
    agent1, agent2 = FakeAgent(tmp_path / "a1.sock"), FakeAgent(tmp_path / "a2.sock")
    server1 = start(KV, agent1)
    server2 = KV(None, AgentClient(agent2.path, regenerable=False)).start()
    peer = KVPeer(port_of(server1), seed=3)
    try:
        peer.send_requests(200)
        peer.wait_replies()
        conn = agent1.ops("register")[0]["conn"]
        agent1.wait(lambda: agent1.commits(conn) and agent1.commits(conn)[-1]["input"] == len(peer.sent),
                    what="the last commit")
        p1 = server1.handles[conn]
        server1.abandon()                       # at a point where all it read is committed
        kept = agent1.socks[conn]
        commits = agent1.commits(conn)
        last = commits[-1]
        W = tcp_written(kept)
        assert W == p1.write == last["write"] == len(peer.received) and last["read"] == len(peer.sent)
        # the newer half of the commits never became durable: resume from an older one
        ck = commits[len(commits) // 2]
        state, unacked = split_payload(ck)
        assert unacked == bytes(peer.received[ck["write"] - len(unacked):ck["write"]])  # the logged bytes are the stream's
        r = resume_point(ck, write_final=W, unacked=unacked)
        assert r.resend == b"" and r.input_offset == ck["input"] < len(peer.sent)
        assert r.discard == W - ck["output"] > 0
        agent2.resume(conn, kept, state, input=r.input_offset, output=r.output_offset, discard=r.discard)
        agent1.socks.pop(conn).close()          # the origin is gone
        peer.retransmit(r.input_offset)         # the peer's kernel resends what was never acknowledged
        peer.send_requests(200)
        peer.wait_replies()
        assert peer.mismatches == [] and peer.verified == 400
        assert bytes(peer.received) == bytes(peer.all_replies)   # one continuous reply stream
        agent2.wait(lambda: agent2.commits(conn) and agent2.commits(conn)[-1]["input"] == len(peer.sent),
                    what="the second instance's commits")
        c2 = agent2.commits(conn)
        assert c2[0]["read"] >= r.input_offset and c2[-1]["write"] == len(peer.received)
        store, n = kv.decode_state(split_payload(c2[-1])[0])
        assert n == 400 and store == peer.model
        peer.sock.shutdown(socket.SHUT_WR)      # the end: the application releases and closes
        peer.reader.join(10)
        assert not peer.reader.is_alive()
        agent2.wait(lambda: agent2.ops("release"), what="release")
        wait_until(lambda: server2.stats["completed"] == 1, what="the handler's end")
        assert server2.stats["resumed"] == 1 and server2.stats["errors"] == 0
    finally:
        peer.sock.close()
        shut(server1)
        shut(server2)
        agent1.close()
        agent2.close()
