"""The ACK gate on this kernel: the program, the maps, and what the unmodified peer sees.

Every peer here is a plain program (peers/bulk_sender.py or the short script below) or
a standard tool (ss); what it sees on the wire is read with an AF_PACKET capture in its
namespace. The origin runs the gate; crashes are simulated as DESIGN.md says: silence
the host's network first, then let the endpoint vanish (repair-mode close).
"""

import errno
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kernel import ackgate, bpf, netns, repair, tcpseg
from kernel.tcpseg import GUARDED, KEEP_SACK, RELEASED, TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN
from polling import until

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
SENDER = ROOT / "peers" / "bulk_sender.py"
PORT = 7400
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
SOL_PACKET, PACKET_AUXDATA, PACKET_STATISTICS, PACKET_IGNORE_OUTGOING = 263, 8, 6, 23
TP_STATUS_CSUMNOTREADY = 1 << 3
SO_RCVBUFFORCE = 33

# The peer that waits: connects, sends 1000 bytes, says so, waits for "go", sends 1000
# more (a closed endpoint answers those with RST), then reports how the connection ended.
HOLD_PEER = r"""
import json, socket, sys
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(10)
s.connect((host, port))
s.sendall(b"a" * 1000)
print("sent", flush=True)
sys.stdin.readline()
end = None
try:
    s.sendall(b"b" * 1000)
    s.settimeout(wait)
    end = "fin" if s.recv(100) == b"" else "data"
except ConnectionResetError:
    end = "rst"
except TimeoutError:
    end = "timeout"
except OSError as e:
    end = "error " + str(e)
print(json.dumps({"end": end}), flush=True)
"""


def addr(topology, role, family):
    host = topology.hosts[getattr(topology, role)]
    return host.ipv4 if family == 4 else host.ipv6


def add_loss(topology, percent):
    """Drop ``percent`` % of TCP frames crossing the bridge (no netem in this kernel)."""
    netns.run(topology.bridge, ["nft", "-f", "-"], input=(
        "table bridge tcpcp_loss {\n  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f"    meta l4proto tcp numgen random mod 100 < {percent} counter drop\n  }}\n}}\n"))


def silence(ns):
    """A host crash, as the network sees it: nothing in, nothing out, from now on."""
    netns.run(ns, ["nft", "-f", "-"], input=(
        "table inet tcpcp_crash {\n"
        "  chain in { type filter hook input priority -500; policy drop; }\n"
        "  chain out { type filter hook output priority -500; policy drop; }\n}\n"))


def send_q(ns, port):
    """Send-Q (bytes not yet acknowledged, the FIN counting one) of the peer's
    connections to ``port``, by the peer's local port, as ``ss`` reports it."""
    out = netns.run(ns, ["ss", "-Htn", f"( dport = :{port} )"]).stdout
    found = {}
    for line in out.splitlines():
        state, recv_q, sendq, local = line.split()[:4]
        found[int(local.rsplit(":", 1)[1])] = int(sendq)
    return found


class Capture:
    """TCP segments arriving at ``ns``'s eth0 (incoming only), with whether each was
    still CHECKSUM_PARTIAL (TP_STATUS_CSUMNOTREADY: check field = pseudo-header sum)."""

    def __init__(self, ns, ifname="eth0"):
        with netns.enter(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.05)
        self.segments = []  # (Segment, partial)
        self.raw = []       # the IP packets, for byte comparisons
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(20))
            except TimeoutError:
                continue
            except OSError:
                return
            etype = struct.unpack_from("!H", data, 12)[0]
            if etype not in (ETH_P_IP, ETH_P_IPV6):
                continue
            status = 0
            for level, kind, payload in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status = struct.unpack_from("=I", payload)[0]
            seg = tcpseg.parse(data[14:])
            if seg is not None:
                self.segments.append((seg, bool(status & TP_STATUS_CSUMNOTREADY)))
                self.raw.append(bytes(data[14:]))

    def drops(self):
        return struct.unpack("=II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]

    def stop(self):
        self._stop.set()
        self._thread.join()
        dropped = self.drops()
        self.sock.close()
        return dropped

    def from_(self, addr, port):
        return [(s, p) for s, p in self.segments if s.src == addr and s.sport == port]


@pytest.fixture
def gate(topology):
    """The gate on the origin's eth0, closed (and detached) after the test."""
    with netns.enter(topology.origin):
        g = ackgate.Gate.open([topology.ifname])
    yield g
    with netns.enter(topology.origin):
        g.close()


def listen(ns, address, port=PORT):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns.enter(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(8)
    sock.settimeout(10)
    return sock


def target(address, port=PORT):
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# --- the program against its reference model ---------------------------------------------

def _options():
    """TCP options: well-formed lists of known kinds in any order, or arbitrary bytes."""
    block = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
    one = st.one_of(
        st.just(b"\x01"), st.just(b"\x00"),
        st.integers(0, 65535).map(lambda m: struct.pack("!BBH", 2, 4, m)),
        st.integers(0, 14).map(lambda w: bytes([3, 3, w])),
        st.just(bytes([4, 2])),
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(
            lambda t: struct.pack("!BBII", 8, 10, *t)),
        st.lists(block, min_size=1, max_size=4).map(
            lambda bs: bytes([5, 2 + 8 * len(bs)]) + b"".join(struct.pack("!II", *b) for b in bs)),
        st.binary(min_size=1, max_size=6),
    )
    return st.one_of(
        st.lists(one, max_size=6).map(b"".join),
        st.binary(max_size=40),
    ).map(lambda o: (o + b"\x01" * (-len(o) % 4))[:40])


SEQS = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]))


@pytest.fixture(scope="module")
def loaded():
    """The program with its maps, loaded but attached nowhere (BPF_PROG_TEST_RUN)."""
    if os.geteuid() != 0:
        pytest.skip("loading eBPF needs root")
    g = ackgate.Gate.open([])
    yield g
    g.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_options(), flags=st.sampled_from([TH_ACK, TH_ACK | TH_PSH, TH_ACK | TH_FIN,
                                                  TH_RST, TH_ACK | TH_RST, TH_SYN | TH_ACK, TH_PSH, 0]),
       ack=SEQS, delta=st.integers(-70000, 70000), window=st.integers(0, 65535),
       wscale=st.integers(0, 15), entry_flags=st.sampled_from([GUARDED, GUARDED | RELEASED, 0]),
       payload=st.binary(max_size=64), v6=st.booleans(), doff=st.one_of(st.none(), st.integers(0, 15)))
def test_the_program_does_what_the_model_says(loaded, options, flags, ack, delta, window, wscale,
                                              entry_flags, payload, v6, doff):
    """BPF_PROG_TEST_RUN on arbitrary segments (CHECKSUM_NONE): verdict and bytes match
    kernel/tcpseg.gate, and the checksum stays valid."""
    src, dst = ("fd77::100", "fd77::1") if v6 else ("10.77.0.100", "10.77.0.1")
    tup = (src, 7000, dst, 40000)
    commit = (ack + delta) & 0xFFFFFFFF
    loaded.conns.update(ackgate.key_of(tup), struct.pack("=IBBH", commit, wscale, entry_flags, 0))
    pkt = tcpseg.build(src, dst, 7000, 40000, 12345, ack, flags=flags, window=window,
                       options=options, payload=payload, doff=doff)
    frame = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ETH_P_IPV6 if v6 else ETH_P_IP) + pkt
    verdict, out = bpf.test_run(loaded.prog_fd, frame)
    l4 = 40 if v6 else 20
    passed, want = tcpseg.gate(pkt[l4:], len(pkt) - l4, commit, wscale, entry_flags)
    assert verdict == (0 if passed else 2)  # TC_ACT_OK, TC_ACT_SHOT
    if passed:
        assert out[14:14 + l4] == pkt[:l4]
        got = out[14 + l4:14 + len(pkt)]
        assert got[:16] == want[:16] and got[18:] == want[18:]
        assert tcpseg.checksum_ok(pkt[8:24] if v6 else pkt[12:16], pkt[24:40] if v6 else pkt[16:20], got)


def test_unguarded_segments_come_out_identical(loaded):
    opts = b"\x01\x01\x05\x0a" + struct.pack("!II", 10, 20) + b"\x01\x01\x01\x01"
    pkt = tcpseg.build("10.77.0.9", "10.77.0.1", 9, 9, 1, 99999, options=opts, flags=TH_ACK | TH_FIN)
    frame = b"\x02" * 12 + struct.pack("!H", ETH_P_IP) + pkt
    assert bpf.test_run(loaded.prog_fd, frame) == (0, frame)


# --- crash at the origin, resurrection at the commit offset ------------------------------

SEED, TOTAL, COMMIT_AT, BEYOND = 7, 3 << 20, 1 << 20, 256 << 10


@pytest.mark.parametrize("family,loss", [(4, 0), (4, 2), (6, 0), (6, 2)],
                         ids=["v4", "v4-loss2", "v6", "v6-loss2"])
def test_input_past_the_last_commit_survives_a_crash(topology, gate, family, loss):
    """The application consumed bytes past its last commit, then the host died. Restored
    at the commit offset on the destination, the connection delivers every byte from the
    commit offset on, exactly once and in order, and the peer never notices."""
    vip = topology.vip4 if family == 4 else topology.vip6
    topology.add_vip(topology.origin, vip)
    if loss:
        add_loss(topology, loss)
    data = random.Random(SEED).randbytes(TOTAL)   # what bulk_sender.py --seed sends
    lsock = listen(topology.origin, vip)
    peer = netns.popen(topology.peer, [sys.executable, str(SENDER), "--connect", target(vip),
                                       "--bytes", str(TOTAL), "--seed", str(SEED), "--wait", "60",
                                       "--greeting"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = lsock.accept()
        lsock.close()
        guard = gate.guard_socket(conn)
        conn.sendall(b"hello\n")          # the peer may send now: every byte is gated
        got = bytearray()
        conn.settimeout(20)
        while len(got) < COMMIT_AT:       # consume and commit as it comes
            chunk = conn.recv(min(1 << 16, COMMIT_AT - len(got)))
            assert chunk, "peer closed early"
            got += chunk
            guard.commit_at(len(got))
        committed = len(got)
        conn.settimeout(0.3)              # consume on, commit no more
        deadline = time.monotonic() + 2
        while len(got) < committed + BEYOND and time.monotonic() < deadline:
            try:
                got += conn.recv(1 << 16)
            except TimeoutError:
                break
        assert len(got) > committed, "nothing consumed past the commit: scenario not reached"
        assert got == data[:len(got)]
        stats = guard.stats()
        assert stats.clamped > 0

        silence(topology.origin)          # the host dies...
        repair.repair_on(conn)
        ici = repair.dump(conn)
        repair.close_silently(conn)       # ...and its endpoint vanishes without a word
        assert tcpseg.seq_after(ici.rcv_nxt, guard.commit_seq)

        # The endpoint exists before the address arrives: a segment finding the
        # destination without a socket would make its kernel answer RST.
        with netns.enter(topology.destination):
            restored = repair.restore(ackgate.rewind_receive(ici, guard.commit_seq),
                                      freebind=True)
        topology.move_vip(vip, topology.origin, topology.destination)
        repair.activate(restored)
        sock = restored.sock
        sock.settimeout(30)
        rest = bytearray()
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            rest += chunk
        assert len(rest) == TOTAL - committed, (len(rest), TOTAL - committed)
        assert rest == data[committed:]
        sock.sendall(b"OK")
        sock.close()
        out, err = peer.communicate(timeout=30)
        report = json.loads(out)
        assert report == {**report, "end": "fin", "reply": "OK", "sent": TOTAL}, err
    finally:
        stop(peer)


# --- SACK above the commit offset --------------------------------------------------------

def test_sack_above_the_commit_never_reaches_the_peer(topology, gate):
    """Under 2% loss the origin's kernel SACKs out-of-order data; on the wire, the guarded
    connection's blocks never reach above its ACK (which never passes the commit), while
    the unguarded neighbour's do. Every checksum holds, offloaded (CHECKSUM_PARTIAL) or
    not."""
    add_loss(topology, 2)
    # veth hands 64 KB GSO frames across: one frame, one drop candidate. Small frames
    # make the loss bite per segment, as on a real link.
    netns.run(topology.peer, ["ip", "link", "set", "dev", topology.ifname, "gso_max_segs", "2"])
    origin, peer_ip = addr(topology, "origin", 4), addr(topology, "peer", 4)
    lsock = listen(topology.origin, origin)
    cap = Capture(topology.peer)
    total = 2 << 20
    peers = [netns.popen(topology.peer, [sys.executable, str(SENDER), "--connect", target(origin),
                                         "--bytes", str(total), "--seed", str(i), "--wait", "60",
                                         "--greeting"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    try:
        conns = [lsock.accept()[0] for _ in peers]
        guarded = gate.guard_socket(conns[0])
        for c in conns:      # input may come only now: all of the guarded one is gated
            c.sendall(b"hello\n")
        totals = [0, 0]

        def drain(i):
            conn = conns[i]
            conn.settimeout(30)
            while totals[i] < total:
                n = len(conn.recv(1 << 20))
                assert n
                totals[i] += n
                if i == 0:
                    guarded.commit_at(totals[i])

        threads = [threading.Thread(target=drain, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert totals == [total, total]
        stats = guarded.stats()
        guarded.remove()
        for c in conns:
            c.close()
        for p in peers:
            out, _ = p.communicate(timeout=30)
            assert json.loads(out)["end"] == "fin"
    finally:
        for p in peers:
            stop(p)
        dropped = cap.stop()
    assert stats.sack_stripped > 0, stats
    gport = guarded.tuple[3]
    mine = [(s, p) for s, p in cap.from_(origin, PORT) if s.dport == gport]
    other = [(s, p) for s, p in cap.from_(origin, PORT) if s.dport != gport]
    assert mine and other and not dropped
    above = [s for s, _ in mine for left, right in s.sack_blocks() if tcpseg.seq_after(right, s.ack)]
    assert not above, f"{len(above)} guarded segments carry SACK above their ACK"
    assert any(tcpseg.seq_after(right, s.ack) for s, _ in other for _, right in s.sack_blocks()), \
        "the unguarded connection never SACKed: the loss did not bite, the test proves nothing"
    bad = [s for s, partial in mine + other if not s.checksum_ok(partial)]
    assert not bad, f"{len(bad)} segments with a wrong checksum"
    assert any(partial for _, partial in mine) and any(not partial for _, partial in mine), \
        "expected both offloaded (kernel) and complete (pure ACK) checksums"


# --- a killed process -----------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
@pytest.mark.parametrize("unread", [True, False], ids=["rst", "fin"])
def test_a_killed_process_never_closes_the_connection(topology, gate, family, unread):
    """SIGKILL makes the kernel close the socket: RST when input was left unread, FIN
    otherwise, and RST again for whatever the peer sends next. None of it leaves."""
    origin = addr(topology, "origin", family)
    lsock = listen(topology.origin, origin)
    peer = netns.popen(topology.peer, [sys.executable, "-c", HOLD_PEER, origin, str(PORT), "1.5"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    holder = None
    try:
        conn, _ = lsock.accept()
        guard = gate.guard_socket(conn)
        assert peer.stdout.readline().strip() == "sent"
        if unread:
            until(lambda: repair._ioctl(conn, repair.C.SIOCINQ, "SIOCINQ") == 1000, 5, "data in")
        else:
            conn.settimeout(5)
            got = b""
            while len(got) < 1000:
                got += conn.recv(1000)
            guard.commit_at(1000)
        cap = Capture(topology.peer)
        # The socket's last reference goes to a process of ours, which is then killed.
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                  pass_fds=[conn.fileno()])
        conn.close()
        holder.kill()
        holder.wait()
        time.sleep(0.2)
        peer.stdin.write("go\n")
        peer.stdin.flush()
        out, err = peer.communicate(timeout=20)
        dropped = cap.stop()
    finally:
        stop(peer)
        if holder is not None:
            stop(holder)
    assert json.loads(out.splitlines()[-1])["end"] == "timeout", (out, err)
    seen = cap.from_(origin, PORT)
    assert not dropped
    assert not [s for s, _ in seen if s.flags & (TH_FIN | TH_RST)]
    stats = guard.stats()
    assert stats.fin_rst_dropped >= 2, stats   # the close, and the answer to more data


def test_a_released_connection_closes_normally(topology, gate):
    origin = addr(topology, "origin", 4)
    lsock = listen(topology.origin, origin)
    peer = netns.popen(topology.peer, [sys.executable, "-c", HOLD_PEER, origin, str(PORT), "5"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    try:
        conn, _ = lsock.accept()
        guard = gate.guard_socket(conn)
        assert peer.stdout.readline().strip() == "sent"
        conn.settimeout(5)
        got = b""
        while len(got) < 1000:
            got += conn.recv(1000)
        guard.commit_at(1000)
        guard.release()
        conn.shutdown(socket.SHUT_WR)
        peer.stdin.write("go\n")
        peer.stdin.flush()
        out, _ = peer.communicate(timeout=20)
        conn.close()
    finally:
        stop(peer)
    assert json.loads(out.splitlines()[-1])["end"] == "fin"
    assert guard.stats().fin_rst_dropped == 0


# --- neighbours, both families ----------------------------------------------------------------

def test_unguarded_connections_and_both_families(topology, gate):
    """Four connections on one interface, guarded and not, IPv4 and IPv6. The guarded
    ones are acknowledged up to their commit and no further (the peer keeps the rest in
    its send queue); the unguarded ones as the kernel says (everything), and have no
    entry. (Byte-for-byte identity of unguarded segments: the test-run tests above.)"""
    total, commit = 40000, 20000
    plan = [(4, True), (4, False), (6, True), (6, False)]
    lsocks = {f: listen(topology.origin, addr(topology, "origin", f)) for f in (4, 6)}
    cap = Capture(topology.peer)
    peers, conns = [], []   # (family, conn, guard or None, the peer's port)
    try:
        for i, (family, guarded) in enumerate(plan):
            peers.append(netns.popen(topology.peer, [
                sys.executable, str(SENDER), "--connect", target(addr(topology, "origin", family)),
                "--bytes", str(total), "--seed", str(i), "--wait", "30", "--greeting"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            conn, _ = lsocks[family].accept()
            guard = gate.guard_socket(conn) if guarded else None
            conn.sendall(b"hello\n")   # guarded before any input arrives
            conns.append((family, conn, guard, conn.getpeername()[1]))
        for family, conn, guard, _ in conns:
            conn.settimeout(10)
            got = 0
            while got < total:
                n = len(conn.recv(65536))
                assert n
                got += n
                if guard is not None:
                    guard.commit_at(min(got, commit))
        # the peers have sent their FIN too (sequence space: one more byte)
        want = {port: (total + 1 - commit if guard else 0) for _, _, guard, port in conns}
        until(lambda: send_q(topology.peer, PORT) == want, 5,
              f"peer's Send-Q per connection {want} (now {send_q(topology.peer, PORT)})")
        time.sleep(0.3)   # and it stays so: nothing else acknowledges the guarded ones
        assert send_q(topology.peer, PORT) == want
        guarded_ports = {t[3] for t in gate.entries()}
        assert guarded_ports == {port for _, _, guard, port in conns if guard}
        for _, conn, guard, _ in conns:
            if guard is not None:
                guard.commit_at(total + 1)   # all input and the EOF
                guard.remove()
            conn.close()
        for p in peers:
            out, err = p.communicate(timeout=30)
            assert json.loads(out)["end"] == "fin", err
    finally:
        for p in peers:
            stop(p)
        dropped = cap.stop()
    assert not dropped
    for family, conn, guard, port in conns:
        segs = [(s, p) for s, p in cap.from_(addr(topology, "origin", family), PORT)
                if s.dport == port]
        assert segs
        assert all(s.checksum_ok(partial) for s, partial in segs)


# --- the pure ACK after a commit ---------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
def test_a_commit_reaches_a_silent_peer_at_once(topology, gate, family):
    """The peer has sent everything, FIN included, and waits. Only the agent's pure ACK
    can tell it about the commit; it must be on the wire at once, well-formed, and
    accepted."""
    origin = addr(topology, "origin", family)
    lsock = listen(topology.origin, origin)
    total = 10000   # within the initial window: all of it can be in flight unacknowledged
    cap = Capture(topology.peer)
    peer = netns.popen(topology.peer, [sys.executable, str(SENDER), "--connect", target(origin),
                                       "--bytes", str(total), "--wait", "30", "--greeting"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = lsock.accept()
        guard = gate.guard_socket(conn)
        conn.sendall(b"hello\n")
        port = conn.getpeername()[1]
        conn.settimeout(10)
        got = 0
        while chunk := conn.recv(65536):
            got += len(chunk)
        assert got == total
        until(lambda: send_q(topology.peer, PORT) == {port: total + 1}, 5,
              "everything in flight, nothing acknowledged")
        time.sleep(0.3)   # every ACK the kernel had to send is out: the peer is idle
        before = len(cap.segments)
        t0 = time.monotonic()
        assert guard.commit_at(total + 1)   # all input and the EOF
        until(lambda: send_q(topology.peer, PORT) == {port: 0}, 1, "peer learns of the commit")
        elapsed = time.monotonic() - t0
        stats = guard.remove()
        conn.close()
        out, _ = peer.communicate(timeout=30)
        assert json.loads(out)["end"] == "fin"
    finally:
        stop(peer)
        cap.stop()
    assert elapsed < 0.2
    acks = [s for s, _ in cap.segments[before:] if s.sport == PORT and s.ack == guard.commit_seq]
    assert acks, "no segment carried the commit"
    first = acks[0]
    assert first.flags == TH_ACK and not first.payload
    assert first.checksum_ok()                                  # built by us: complete
    assert tcpseg.timestamps(first.options) is not None         # timestamps were negotiated
    assert first.window == tcpseg.widened_window(stats.right_edge, guard.commit_seq,
                                                 guard.rcv_wscale)


# --- malformed options from a raw socket ----------------------------------------------------------

COMMIT = 0xFFFFFF00   # just below the wrap: acks "beyond" it wrap around
NOP2 = b"\x01\x01"
TS = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)


def _sack(*blocks):
    return bytes([5, 2 + 8 * len(blocks)]) + b"".join(struct.pack("!II", *(x & 0xFFFFFFFF for x in b))
                                                   for b in blocks)


C = COMMIT
CRAFTED = [  # name, flags, ack, options, payload, doff
    ("plain ACK beyond the commit", TH_ACK, C + 5000, b"", b"", None),
    ("TS, then SACK above", TH_ACK, C + 5000, TS + NOP2 + _sack((C + 6000, C + 7000)), b"", None),
    ("SACK then TS, no padding", TH_ACK, C + 5000, _sack((C + 6000, C + 7000)) + TS[2:], b"", None),
    ("four blocks, two kept", TH_ACK, C + 5000,
     _sack((C - 900, C - 800), (C + 10, C + 20), (C - 700, C - 600), (C + 30, C + 40)) + NOP2, b"", None),
    ("two SACK options", TH_ACK, C + 5000, _sack((C + 1, C + 2)) + _sack((C - 9, C - 8)), b"", None),
    ("SACK at an odd offset", TH_ACK, C + 5000, b"\x01" + _sack((C + 6000, C + 7000)) + b"\x00", b"", None),
    ("SACK of a bad length", TH_ACK, C + 5000, bytes([5, 11]) + b"\xee" * 9 + b"\x00", b"", None),
    ("EOL before a SACK", TH_ACK, C + 5000, b"\x00" + _sack((C + 6000, C + 7000))[:-1] + b"\x00" * 4, b"", None),
    ("zero-length option", TH_ACK, C + 5000, bytes([5, 0]) + _sack((C + 6000, C + 7000)), b"", None),
    ("length-1 option", TH_ACK, C + 5000, bytes([3, 1]) + _sack((C + 6000, C + 7000)), b"", None),
    ("option past the header", TH_ACK, C + 5000, bytes([8, 30]) + b"\x01" * 10, b"", None),
    ("kind without a length", TH_ACK, C + 5000, b"\x01" * 11 + b"\x05", b"", None),
    ("unknown kinds", TH_ACK, C + 5000,
     struct.pack("!BBH", 2, 4, 1460) + bytes([3, 3, 7, 4, 2, 30, 6]) + b"abcd" + _sack((C + 1, C + 9)) + b"\x00",
     b"", None),
    ("header longer than the packet", TH_ACK, C + 5000, b"", b"", 15),
    ("header shorter than 20", TH_ACK, C + 5000, b"", b"", 4),
    ("with payload", TH_ACK | TH_PSH, C + 5000, TS + NOP2 + _sack((C + 6000, C + 7000)), b"x" * 333, None),
    ("ACK below the commit, SACK above", TH_ACK, C - 10, NOP2 + _sack((C + 100, C + 200)), b"", None),
    ("D-SACK below the commit", TH_ACK, C + 5000, NOP2 + _sack((C - 500, C - 100)), b"", None),
    ("SYN-ACK", TH_SYN | TH_ACK, C + 5000, b"", b"", None),
    ("no ACK flag", TH_PSH, C + 5000, b"", b"data", None),
    ("FIN", TH_FIN | TH_ACK, C + 5000, b"", b"", None),
    ("RST", TH_RST, 0, b"", b"", None),
]


@pytest.mark.parametrize("family, keep_sack", [(4, False), (6, False), (4, True)],
                         ids=["v4", "v6", "v4-keep-sack"])
def test_crafted_segments_with_broken_options(topology, gate, family, keep_sack):
    """Segments of a guarded tuple, sent from a raw socket through the program: each one
    arrives as the model says (or is dropped only for FIN/RST), with a valid checksum.
    With ``keep_sack`` (a just-passed endpoint) every SACK block passes as it was."""
    src, dst = addr(topology, "origin", family), addr(topology, "peer", family)
    sport, dport, wscale = 7500, 7501, 7
    guard = gate.guard((src, sport, dst, dport), COMMIT, wscale, keep_sack=keep_sack)
    gate_flags = GUARDED | (KEEP_SACK if keep_sack else 0)
    cap = Capture(topology.peer)
    with netns.enter(topology.origin):
        raw = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_RAW,
                            socket.IPPROTO_RAW)
    sent = []
    with raw:
        for i, (name, flags, ack, opts, payload, doff) in enumerate(CRAFTED):
            opts = opts + b"\x00" * (-len(opts) % 4)
            pkt = tcpseg.build(src, dst, sport, dport, 1_000_000 + i * 1000, ack & 0xFFFFFFFF,
                               flags=flags, window=512, options=opts, payload=payload, doff=doff)
            raw.sendto(pkt, (dst, 0) if family == 4 else (dst, 0, 0, 0))
            sent.append((name, pkt))
    l4 = 20 if family == 4 else 40
    expect = {}
    for name, pkt in sent:
        passed, want = tcpseg.gate(pkt[l4:], len(pkt) - l4, COMMIT, wscale, gate_flags)
        if passed:
            expect[struct.unpack_from("!I", pkt, l4 + 4)[0]] = (name, want)
    until(lambda: len([s for s, _ in cap.from_(src, sport)]) >= len(expect), 5,
          f"{len(expect)} crafted segments at the peer")
    time.sleep(0.1)
    dropped = cap.stop()
    assert not dropped
    got = {s.seq: (s, raw_ip) for (s, _), raw_ip in zip(cap.segments, cap.raw) if s.sport == sport}
    assert set(got) == set(expect), f"missing: {[expect[k][0] for k in set(expect) - set(got)]}"
    for seq, (name, want) in expect.items():
        seg, raw_ip = got[seq]
        tcp = raw_ip[l4:]
        assert tcp[:16] == want[:16] and tcp[18:] == want[18:], name
        assert tcpseg.checksum_ok(seg.ip_src, seg.ip_dst, tcp), name
    stats = gate.get((src, sport, dst, dport)).stats()
    assert stats.fin_rst_dropped == 2
    assert stats.clamped > 0 and (stats.sack_stripped == 0 if keep_sack else stats.sack_stripped > 0)
    if keep_sack:   # and back to the rule
        guard.keep_sack(False)
        assert gate.get((src, sport, dst, dport)).flags == GUARDED


# --- lifecycle --------------------------------------------------------------------------------------

def test_a_leftover_program_is_replaced_and_its_table_adopted(topology):
    """An agent dies with its program attached (close without detach): the program keeps
    enforcing. The next agent replaces it in place, keeps its table, and on close leaves
    nothing behind: no filter, no qdisc of ours."""
    tup = (addr(topology, "origin", 4), 7000, addr(topology, "peer", 4), 40000)
    with netns.enter(topology.origin):
        first = ackgate.Gate.open([topology.ifname])
        first.guard(tup, 12345, 7)
        first.close(detach=False)
        left = ackgate.leftovers(topology.ifname)
        assert len(left) == 1
        second = ackgate.Gate.open([topology.ifname])
        try:
            now = ackgate.leftovers(topology.ifname)
            assert len(now) == 1 and now[0]["prog_id"] != left[0]["prog_id"]
            assert [e.tuple for e in second.adopted] == [tup]
            guard = second.get(tup)
            assert guard.commit_seq == 12345 and guard.rcv_wscale == 7
        finally:
            second.close()
        assert ackgate.leftovers(topology.ifname) == []
    qdiscs = netns.run(topology.origin, ["tc", "qdisc", "show", "dev", topology.ifname]).stdout
    assert "clsact" not in qdiscs


def test_a_full_table_is_a_clear_error_and_drops_nothing(topology):
    """With room for two connections, the third is refused with E2BIG and named; its
    traffic flows as if there were no gate."""
    origin = addr(topology, "origin", 4)
    with netns.enter(topology.origin):
        g = ackgate.Gate.open([topology.ifname], max_entries=2)
    lsock = listen(topology.origin, origin)
    peer = None
    try:
        g.guard((origin, 1, "10.77.0.1", 1), 0, 0)
        g.guard((origin, 2, "10.77.0.1", 2), 0, 0)
        peer = netns.popen(topology.peer, [sys.executable, str(SENDER), "--connect", target(origin),
                                           "--bytes", "200000", "--wait", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        conn, _ = lsock.accept()
        with pytest.raises(ackgate.GateFull) as err:
            g.guard_socket(conn)
        assert err.value.errno == errno.E2BIG
        assert err.value.tuple == ackgate.normalize((*conn.getsockname()[:2], *conn.getpeername()[:2]))
        assert "NOT protected" in str(err.value)
        conn.settimeout(10)
        got = 0
        while got < 200000:
            got += len(conn.recv(65536))
        conn.close()
        out, _ = peer.communicate(timeout=30)
        assert json.loads(out)["end"] == "fin"
    finally:
        if peer is not None:
            stop(peer)
        with netns.enter(topology.origin):
            g.close()
