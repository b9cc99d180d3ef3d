"""The application library (checkpointd/app.py) against a fake agent that speaks
checkpointd/protocol.py: registration with the socket's descriptor, R/W counting, commits
and their ``durable`` replies, the unacknowledged-output copy trimmed by SIOCOUTQ, release,
and the resume path (discard swallowed exactly, commits deferred while resent bytes are in
flight). Root-free: loopback TCP and a Unix socket in tmp_path."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from checkpointd import protocol
from checkpointd.app import AgentClient, AppError, Unprotected, conn_key, outq


class FakeAgent:
    """Speaks the agent's side of checkpointd/protocol.py and records everything.

    Keeps the descriptor of every registered socket (as the real agent does), so that the
    connection survives the application dropping its own: tests hand it back with
    ``resume``. ``durable``: answer commits at once; ``refuse``: answer registers with
    ``error``; ``silent``: answer registers with nothing.
    """

    def __init__(self, path, *, durable=True, refuse=None, silent=False):
        self.path = str(path)
        self.durable, self.refuse, self.silent = durable, refuse, silent
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.messages: list[tuple[socket.socket, protocol.Message]] = []
        self.socks: dict[str, socket.socket] = {}     # conn -> the agent's descriptor
        self.chans: list[socket.socket] = []
        self.served: dict[int, socket.socket] = {}
        self.cv = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                chan, _ = self.listener.accept()
            except OSError:
                return
            with self.cv:
                self.chans.append(chan)
                self.cv.notify_all()
            threading.Thread(target=self._serve, args=(chan,), daemon=True).start()

    def _serve(self, chan):
        while True:
            try:
                msg = protocol.recv(chan)
            except OSError:
                return
            if msg is None:
                return
            with self.cv:
                self.messages.append((chan, msg))
                if msg.fd is not None:
                    self.socks[msg["conn"]] = socket.socket(fileno=msg.fd)
                if msg.op == "serve":
                    self.served[msg["port"]] = chan
                self.cv.notify_all()
            try:
                if msg.op == "register":
                    if self.refuse:
                        protocol.send(chan, "error", conn=msg["conn"], reason=self.refuse)
                    elif not self.silent:
                        protocol.send(chan, "registered", conn=msg["conn"])
                elif msg.op == "commit" and self.durable:
                    protocol.send(chan, "durable", conn=msg["conn"], seq=msg["seq"])
                elif msg.op == "release":
                    with self.cv:
                        s = self.socks.pop(msg["conn"], None)
                    if s is not None:
                        s.close()
                    protocol.send(chan, "released", conn=msg["conn"])
            except OSError:
                return

    # -- for the tests ---------------------------------------------------------------------
    def ops(self, op, conn=None):
        with self.cv:
            return [m for _, m in self.messages if m.op == op and (conn is None or m["conn"] == conn)]

    def commits(self, conn=None, wait_for=0, timeout=10.0):
        """The commits received (for ``conn``), after waiting until there are
        ``wait_for`` of them (commits are asynchronous)."""
        if wait_for:
            self.wait(lambda: len(self.ops("commit", conn)) >= wait_for, timeout,
                      f"{wait_for} commits of {conn}")
        return self.ops("commit", conn)

    def wait(self, pred, timeout=10.0, what="condition"):
        deadline = time.monotonic() + timeout
        with self.cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fake agent: timed out waiting for {what}")
                self.cv.wait(min(left, 0.05))

    def send(self, op, payload=b"", fd=None, chan=None, **fields):
        with self.cv:
            chan = chan or self.chans[-1]
        protocol.send(chan, op, payload, fd=fd, **fields)

    def resume(self, conn, sock, state, *, input, output, discard, chan=None):
        """Hand ``sock`` to the application as the real agent does after resurrection
        (keeping a descriptor of its own, as the real agent does)."""
        self.wait(lambda: self.chans, what="an application channel")
        with self.cv:
            self.socks[conn] = socket.socket(fileno=os.dup(sock.fileno()))
        self.send("resume", state, fd=sock.fileno(), chan=chan, conn=conn, input=input,
                  output=output, discard=discard, unacked_len=0)

    def close(self):
        self.listener.close()
        with self.cv:
            for c in self.chans:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            for s in self.socks.values():
                s.close()
            self.socks.clear()


@pytest.fixture
def agent(tmp_path):
    a = FakeAgent(tmp_path / "agent.sock")
    yield a
    a.close()


@pytest.fixture
def client(agent):
    c = AgentClient(agent.path, timeout=5)
    yield c
    c.close()


def tcp_pair(rcvbuf=None, sndbuf=None):
    """(server side, peer side) of a loopback TCP connection. Small buffers make the
    peer's window close quickly when it does not read, so that SIOCOUTQ stays > 0."""
    ls = socket.create_server(("127.0.0.1", 0))
    peer = socket.socket()
    if rcvbuf:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    peer.connect(ls.getsockname())
    srv, _ = ls.accept()
    ls.close()
    if sndbuf:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return srv, peer


def fill(sock, data_source, send=None):
    """Write into ``sock`` (non-blocking, through ``send``: the socket's or a handle's)
    until the peer's window is closed; returns the bytes written. ``data_source(offset,
    n)`` gives the bytes."""
    send = send or sock.send
    sock.setblocking(False)
    written = bytearray()
    idle = 0
    while idle < 3:
        try:
            n = send(data_source(len(written), 16384))
            written += data_source(len(written), n)
            idle = 0
        except BlockingIOError:
            idle += 1
            time.sleep(0.02)
    sock.setblocking(True)
    return bytes(written)


def stream_bytes(offset, n):
    """A deterministic output stream: byte i is (i * 7 + i // 251) mod 256."""
    return bytes(((i * 7 + i // 251) & 0xFF) for i in range(offset, offset + n))


def read_exactly(sock, n, timeout=10):
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def wait_until(pred, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- connecting, registering --------------------------------------------------------------------

def test_no_agent_is_a_clear_error(tmp_path):
    with pytest.raises(AppError, match="no checkpointd agent at .*missing.sock"):
        AgentClient(str(tmp_path / "missing.sock"))


def test_register_hands_over_the_descriptor_with_offsets_and_key(agent, client):
    srv, peer = tcp_pair()
    with srv, peer:
        p = client.register(srv, b"initial", input=0, output=0)
        (reg,) = agent.ops("register")
        lport, rport = srv.getsockname()[1], peer.getsockname()[1]
        assert reg["conn"] == p.conn == f"127.0.0.1:{lport}-127.0.0.1:{rport}"
        assert (reg["input"], reg["output"], reg["read"], reg["write"]) == (0, 0, 0, 0)
        assert reg.payload == b"initial"
        kept = agent.socks[p.conn]
        assert os.fstat(kept.fileno()).st_ino == os.fstat(srv.fileno()).st_ino  # the same socket
        assert (p.read, p.write, p.state, p.resumed) == (0, 0, b"initial", False)
        with pytest.raises(AppError, match="already registered"):
            client.register(srv, b"")


def test_register_with_bytes_already_exchanged(agent, client):
    srv, peer = tcp_pair()
    with srv, peer:
        peer.sendall(b"hello")
        assert read_exactly(srv, 5) == b"hello"
        srv.sendall(b"hi")
        p = client.register(srv, b"s", input=5, output=2, read=5, write=2, conn="custom-key")
        (reg,) = agent.ops("register")
        assert (reg["conn"], reg["input"], reg["output"], reg["read"], reg["write"]) == ("custom-key", 5, 2, 5, 2)
        assert (p.read, p.write) == (5, 2)
        with pytest.raises(AppError, match="input 6 > read 5"):
            client.register(srv, b"", input=6, read=5, conn="other")


def test_conn_key_brackets_ipv6():
    try:
        ls = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    with ls:
        peer = socket.create_connection(("::1", ls.getsockname()[1]))
        srv, _ = ls.accept()
        with srv, peer:
            assert conn_key(srv) == f"[::1]:{ls.getsockname()[1]}-[::1]:{peer.getsockname()[1]}"
    with socket.socket() as unconnected, pytest.raises(AppError, match="not a connected"):
        conn_key(unconnected)


def test_register_refused_or_unanswered(tmp_path):
    refusing = FakeAgent(tmp_path / "refuse.sock", refuse="gate full")
    silent = FakeAgent(tmp_path / "silent.sock", silent=True)
    srv, peer = tcp_pair()
    try:
        with AgentClient(refusing.path) as c, pytest.raises(AppError, match="refused: gate full"):
            c.register(srv, b"")
        with AgentClient(silent.path) as c, pytest.raises(AppError, match="no answer .* 0.2 s"):
            c.register(srv, b"", timeout=0.2)
    finally:
        srv.close()
        peer.close()
        refusing.close()
        silent.close()


# -- counting and committing -------------------------------------------------------------------

def test_reads_and_writes_are_counted_and_commits_carry_them(agent, client):
    srv, peer = tcp_pair()
    with srv, peer:
        p = client.register(srv, b"", regenerable=True)
        peer.sendall(b"GET 1\nGET 2\n")
        got = b""
        while len(got) < 12:
            got += p.recv(4)
        assert p.read == 12
        assert p.send(b"abc") == 3
        p.sendall(memoryview(b"defgh"))
        assert p.write == 8 and read_exactly(peer, 8) == b"abcdefgh"
        s1 = p.commit(b"state-1", input=6, output=3)
        s2 = p.commit(b"state-2", input=12, output=8)
        assert (s1, s2) == (1, 2)
        assert p.wait_durable(s2, timeout=5) and p.durable_seq == 2
        c1, c2 = agent.commits(p.conn, wait_for=2)
        assert (c1["seq"], c1["input"], c1["output"], c1["read"], c1["write"], c1["unacked_len"]) == (1, 6, 3, 12, 8, 0)
        assert c1.payload == b"state-1" and c2.payload == b"state-2"
        assert (c2["input"], c2["output"]) == (12, 8)


def test_commit_refuses_offsets_beyond_what_was_read_or_written(agent, client):
    srv, peer = tcp_pair()
    with srv, peer:
        p = client.register(srv, b"")
        with pytest.raises(AppError, match="input offset 1 is beyond the 0 bytes read"):
            p.commit(b"", input=1, output=0)
        with pytest.raises(AppError, match="output offset 5 is beyond the 0 bytes written"):
            p.commit(b"", input=0, output=5)
        assert agent.commits() == []


def test_durable_is_asynchronous(tmp_path):
    agent = FakeAgent(tmp_path / "a.sock", durable=False)
    srv, peer = tcp_pair()
    try:
        with AgentClient(agent.path) as client:
            p = client.register(srv, b"", regenerable=True)
            seq = p.commit(b"x", input=0, output=0)     # returns before any reply
            assert p.durable_seq == 0
            assert p.wait_durable(seq, timeout=0.1) is False
            agent.send("durable", conn=p.conn, seq=seq)
            assert p.wait_durable(seq, timeout=5) is True
            # an error the agent reports for a connection surfaces on the next use
            agent.send("error", conn=p.conn, reason="checkpoint refused")
            wait_until(lambda: p.error is not None, what="the error")
            with pytest.raises(AppError, match="checkpoint refused"):
                p.commit(b"y", input=0, output=0)
            with pytest.raises(AppError, match="checkpoint refused"):
                p.wait_durable(seq + 1, timeout=1)
    finally:
        srv.close()
        peer.close()
        agent.close()


def test_unacked_output_is_logged_and_trimmed_by_siocoutq(agent, client):
    srv, peer = tcp_pair(rcvbuf=4096, sndbuf=16384)
    with srv, peer:
        p = client.register(srv, b"", regenerable=False)
        written = fill(srv, stream_bytes, p.send)   # through the library; the peer does not read
        q = outq(srv)
        assert q > 0, "the peer's window should be closed"
        p.commit(b"STATE", input=0, output=p.write)
        (c,) = agent.commits(p.conn, wait_for=1)
        n = c["unacked_len"]
        assert n == q and c["write"] == len(written) == p.write
        assert c.payload == b"STATE" + written[-n:]
        assert len(p._history) == n           # trimmed to what the peer lacks
        # the peer reads everything: nothing is unacknowledged any more
        assert read_exactly(peer, len(written)) == written
        wait_until(lambda: outq(srv) == 0, what="the peer's ACKs")
        p.commit(b"STATE2", input=0, output=p.write)
        c2 = agent.commits(p.conn, wait_for=2)[-1]
        assert c2["unacked_len"] == 0 and c2.payload == b"STATE2" and len(p._history) == 0


def test_regenerable_output_logs_nothing(agent, client):
    srv, peer = tcp_pair(rcvbuf=4096, sndbuf=16384)
    with srv, peer:
        p = client.register(srv, b"", regenerable=True)
        fill(srv, stream_bytes, p.send)
        assert outq(srv) > 0
        p.commit(b"S", input=0, output=p.write)
        (c,) = agent.commits(p.conn, wait_for=1)
        assert c["unacked_len"] == 0 and c.payload == b"S" and len(p._history) == 0


def test_long_history_is_trimmed_while_sending(agent, client):
    srv, peer = tcp_pair()
    with srv, peer:
        p = client.register(srv, b"", regenerable=False)
        got = []
        t = threading.Thread(target=lambda: got.append(read_exactly(peer, 6 << 20, timeout=20)))
        t.start()
        chunk = os.urandom(64 << 10)
        for _ in range(96):
            p.sendall(chunk)
        t.join()
        assert got[0] == chunk * 96
        wait_until(lambda: outq(srv) == 0, what="the peer's ACKs")
        p.sendall(b"x")
        assert len(p._history) < (2 << 20)   # not 6 MiB: trimmed through SIOCOUTQ


# -- release, agent gone --------------------------------------------------------------------------

def test_release_then_close(agent, client):
    srv, peer = tcp_pair()
    with peer:
        p = client.register(srv, b"")
        p.release()
        assert [m["conn"] for m in agent.ops("release")] == [p.conn] and p.released
        assert p.conn not in agent.socks
        with pytest.raises(AppError, match="released"):
            p.commit(b"", input=0, output=0)
        p.release()                            # idempotent
        p.close()
        assert peer.recv(1) == b""             # FIN


def test_agent_going_away_is_reported(agent, client):
    srv, peer = tcp_pair()
    with srv, peer:
        p = client.register(srv, b"", regenerable=True)
        resumed = []
        t = threading.Thread(target=lambda: resumed.extend(client.resumed()))
        t.start()
        agent.close()
        t.join(5)
        assert not t.is_alive() and resumed == []
        assert not client.connected
        with pytest.raises(AppError):
            p.commit(b"", input=0, output=0)
        with pytest.raises(AppError, match="closed"):
            client.register(srv, b"", conn="again")


def test_unprotected_has_the_same_interface():
    srv, peer = tcp_pair()
    with peer:
        p = Unprotected(srv, b"s")
        peer.sendall(b"ab")
        assert p.recv(2) == b"ab" and p.read == 2
        p.sendall(b"xyz")
        assert p.send(b"!") == 1 and p.write == 4
        assert p.commit(b"", input=2, output=4) == 1 and p.wait_durable(1)
        p.close()
        assert read_exactly(peer, 5) == b"xyz!"


# -- resume ---------------------------------------------------------------------------------------

def test_serve_announces_ports(agent, tmp_path):
    with AgentClient(agent.path, ports=(8080, 7070)):
        agent.wait(lambda: set(agent.served) == {8080, 7070}, what="serve")


def test_resume_swallows_exactly_the_discard(agent):
    srv, peer = tcp_pair()
    O, D, I = 1000, 300, 17
    regen = stream_bytes(O, 2000)            # what the application regenerates from O
    with peer, AgentClient(agent.path, regenerable=True) as client:
        agent.resume("k1", srv, b"STATE", input=I, output=O, discard=D)
        srv.close()                           # the application gets its own descriptor
        p = next(client.resumed(timeout=5))
        assert (p.conn, p.state, p.input, p.output, p.resumed) == ("k1", b"STATE", I, O, True)
        assert (p.read, p.write, p.discard_remaining) == (I, O + D, D)
        assert p.send(regen[:100]) == 100                 # all swallowed
        assert (p.discard_remaining, p.discarded, p.write) == (200, 100, O + D)
        p.sendall(regen[100:250])                          # swallowed
        n = p.send(regen[250:400])                         # 50 swallowed, then 100 sent
        assert n == 150 and p.discard_remaining == 0 and p.discarded == D
        p.sendall(regen[400:])
        assert p.write == O + len(regen)
        assert read_exactly(peer, len(regen) - D) == regen[D:]   # exactly D bytes dropped
        peer.sendall(b"more input")
        assert p.recv(100) == b"more input" and p.read == I + 10
        p.commit(b"S2", input=I + 10, output=O + len(regen))
        (c,) = agent.commits("k1", wait_for=1)
        assert (c["input"], c["output"], c["read"], c["write"]) == (I + 10, O + 2000, I + 10, O + 2000)
        p.release()


def test_resume_logged_output_includes_the_swallowed_bytes(agent):
    """The regenerated copy of [O, P) that send swallows is the stream's newest output once
    the discard is over: a commit may log it when the peer still lacks it."""
    srv, peer = tcp_pair(rcvbuf=4096, sndbuf=16384)
    with peer, AgentClient(agent.path, regenerable=False) as client:
        written = fill(srv, stream_bytes)           # the origin's output, W0 bytes
        W0, q = len(written), outq(srv)
        assert q > 0
        O = W0 - q - 10                              # the state lags the stream by q + 10 bytes
        D = W0 - O                                   # L = W0: discard max(L, W0) - O
        agent.resume("k2", srv, b"S", input=0, output=O, discard=D)
        srv.close()
        p = next(client.resumed(timeout=5))
        p.sock.setblocking(False)
        assert p.send(stream_bytes(O, D)) == D       # regenerated, all swallowed
        with pytest.raises(BlockingIOError):         # the window is still closed
            p.send(stream_bytes(W0, 100))
        p.commit(b"S'", input=0, output=W0)
        c = agent.commits("k2", wait_for=1)[-1]
        n = c["unacked_len"]
        assert 0 < n <= D and c["write"] == W0
        assert c.payload == b"S'" + written[W0 - n:]
        assert read_exactly(peer, W0) == written


def test_commit_waits_while_resent_bytes_are_in_flight(agent):
    """Right after a resume the socket's queue holds bytes the agent resent, which the
    library never saw: a commit that would have to log them waits until the peer has
    acknowledged them, then goes out by itself."""
    srv, peer = tcp_pair(rcvbuf=4096, sndbuf=16384)
    with peer, AgentClient(agent.path, regenerable=False) as client:
        written = fill(srv, stream_bytes)            # [L, W0) of it: "resent", unacknowledged
        W0 = len(written)
        assert outq(srv) > 0
        agent.resume("k3", srv, b"S", input=0, output=W0, discard=0)
        srv.close()
        p = next(client.resumed(timeout=5))
        seq = p.commit(b"S'", input=0, output=W0)
        time.sleep(0.2)
        assert agent.commits("k3") == [] and not p.wait_durable(seq, timeout=0)
        assert read_exactly(peer, W0) == written      # the peer catches up and acknowledges
        assert p.wait_durable(seq, timeout=5)
        (c,) = agent.commits("k3", wait_for=1)
        assert (c["seq"], c["output"], c["write"], c["unacked_len"]) == (seq, W0, W0, 0)
        p.sendall(b"next")
        assert read_exactly(peer, 4) == b"next"
