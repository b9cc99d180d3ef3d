"""TCP_REPAIR on the real kernel, one connection at a time: build, dump, restore, pass,
refuse and undo (issue 2).

Every test moves bytes through the connection it repairs and checks each one: each end
sends a random stream of its own and keeps what it receives, and at the end the SHA-256
of what one end sent must equal that of what the other received. Every test with a
connection also checks that the peer saw no RST (nftables counters on the peer's input
and output, the ``rst_watch`` fixture).

The peer is a plain socket made in the peer's namespace (``netns.enter``), driven from the
test thread, never our library; the one exception is the constructor test, which builds
both ends from nothing the way CRIU's soccr/test/tcp-constructor.c does.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import random
import select
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest

from kernel import api, constants as C, netns, passing, repair
from kernel.errors import AddressError, ICIError, KernelError, PrivilegeError
from kernel.ici import F_SACK, F_TIMESTAMP, F_WINDOW, F_WSCALE, ICI
from kernel.isolate import Isolation, tuple_of

from polling import until

pytestmark = pytest.mark.netns

PORT = 7100
CHUNK = 256 << 10
PEER4, PEER6 = "10.77.0.1", "fd77::1"


# --- helpers --------------------------------------------------------------------------


def stream(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def ioctl(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def assert_same(got: bytes, want: bytes, what: str) -> None:
    """Equal SHA-256 digests; on failure say where the streams part."""
    if hashlib.sha256(got).digest() == hashlib.sha256(want).digest():
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    pytest.fail(f"{what}: {len(got)} bytes received, {len(want)} sent, first difference at "
                f"byte {first}")


@dataclass
class End:
    """One end of a connection as the test drives it: what it sends and what it got."""

    name: str
    sock: socket.socket
    out: bytes             # the whole stream this end sends
    sent: int = 0          # how much of it the socket has taken
    got: bytearray = field(default_factory=bytearray)
    read_limit: int | None = None  # stop reading (a slow application) once this much arrived

    @property
    def reading(self) -> bool:
        return self.read_limit is None or len(self.got) < self.read_limit

    def __post_init__(self):
        self.sock.setblocking(False)

    def attach(self, sock: socket.socket) -> None:
        """Carry on over another socket (the restored endpoint after a pass)."""
        self.sock = sock
        sock.setblocking(False)


class Duplex:
    """Both ends of one connection pumped from the test thread with select(): streaming
    in both directions at once, and stopping in between whenever the test wants."""

    def __init__(self, server: End, peer: End):
        self.server, self.peer = server, peer

    @property
    def ends(self):
        return (self.server, self.peer)

    def pump(self, until_true, timeout: float = 15.0, what: str = "transfer") -> None:
        deadline = time.monotonic() + timeout
        while not until_true():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not done in {timeout} s ({self.progress()})")
            by_sock = {e.sock: e for e in self.ends}
            readable, writable, _ = select.select(
                [e.sock for e in self.ends if e.reading],
                [e.sock for e in self.ends if e.sent < len(e.out)], [], 0.05)
            for sock in readable:
                end = by_sock[sock]
                want = CHUNK if end.read_limit is None else min(CHUNK, end.read_limit - len(end.got))
                try:
                    data = sock.recv(want)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    pytest.fail(f"{end.name} was reset ({self.progress()})")
                if not data:
                    pytest.fail(f"{end.name}: unexpected end of stream ({self.progress()})")
                end.got += data
            for sock in writable:
                end = by_sock[sock]
                try:
                    end.sent += sock.send(memoryview(end.out)[end.sent:end.sent + CHUNK])
                except BlockingIOError:
                    pass

    def stop_reading_at(self, each: int) -> None:
        """Both applications stop reading at ``each`` bytes, and pumping goes on until both
        endpoints hold data: received and not read, and written but not yet sendable."""
        self.server.read_limit = self.peer.read_limit = each
        self.pump(lambda: (not self.server.reading and not self.peer.reading
                           and ioctl(self.server.sock, C.SIOCINQ) > 0
                           and ioctl(self.server.sock, C.SIOCOUTQNSD) > 0), what="fill queues")

    def received(self, each: int):
        """A pump condition: both ends have received at least ``each`` bytes."""
        return lambda: len(self.server.got) >= each and len(self.peer.got) >= each

    def finish(self, timeout: float = 15.0) -> None:
        """Pump until every byte of both streams has arrived, then check all of them."""
        for end in self.ends:
            end.read_limit = None
        self.pump(lambda: len(self.server.got) >= len(self.peer.out)
                  and len(self.peer.got) >= len(self.server.out), timeout, "finish")
        self.verify()

    def verify(self) -> None:
        """What arrived so far is exactly a prefix of what was sent (complete after finish)."""
        for src, dst in ((self.server, self.peer), (self.peer, self.server)):
            assert_same(bytes(dst.got), src.out[:len(dst.got)], f"{src.name} -> {dst.name}")
            assert len(dst.got) <= src.sent

    def progress(self) -> str:
        return ", ".join(f"{e.name} sent {e.sent}/{len(e.out)} got {len(e.got)}" for e in self.ends)


class RstWatch:
    """Counts TCP segments with RST entering or leaving a namespace (nftables counters)."""

    TABLE = "tcpcp_test_rst"

    def __init__(self, ns: str):
        self.ns = ns
        netns.run(ns, ["nft", "-f", "-"], input=f"""table inet {self.TABLE} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    tcp flags & rst != 0 counter
  }}
  chain output {{
    type filter hook output priority 0; policy accept;
    tcp flags & rst != 0 counter
  }}
}}
""")

    def counts(self) -> dict[str, int]:
        out = json.loads(netns.run(self.ns, ["nft", "-j", "list", "table", "inet",
                                             self.TABLE]).stdout)
        found = {}
        for item in out["nftables"]:
            rule = item.get("rule")
            if rule:
                for expr in rule["expr"]:
                    if "counter" in expr:
                        found[rule["chain"]] = expr["counter"]["packets"]
        return found

    def assert_none(self) -> None:
        counts = self.counts()
        assert counts == {"input": 0, "output": 0}, f"the peer saw RST segments: {counts}"


@pytest.fixture
def rst_watch(topology):
    watch = RstWatch(topology.peer)
    yield watch
    watch.assert_none()


def vip_of(topology, family: int) -> str:
    return topology.vip4 if family == 4 else topology.vip6


def solicited_node_joined(ns: str, addr: str) -> bool:
    """Whether ``ns`` listens on the solicited-node multicast group of IPv6 ``addr``.

    The kernel joins it from its DAD worker, even for a nodad address, a moment after the
    address is added: a neighbour solicitation arriving before that is dropped and a
    fresh neighbour waits a whole retransmission time (1 s) before asking again.
    """
    group = ipaddress.ip_address("ff02::1:ff00:0").packed[:13] + \
        ipaddress.ip_address(addr).packed[13:]
    with netns.enter(ns), open("/proc/thread-self/net/igmp6") as table:
        return any(line.split()[2] == group.hex() for line in table)


def connect(topology, family: int, *, peer_rcvbuf: int | None = None):
    """A connection from a plain socket in the peer to the VIP on the origin: (server, peer)."""
    vip = vip_of(topology, family)
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    topology.add_vip(topology.origin, vip)
    if family == 6:
        until(lambda: solicited_node_joined(topology.origin, vip), 5,
              f"{topology.origin} answering neighbour solicitations for {vip}")
    with netns.enter(topology.origin):
        listener = socket.socket(fam, socket.SOCK_STREAM)
    with listener:
        listener.bind((vip, PORT))
        listener.listen(1)
        with netns.enter(topology.peer):
            peer = socket.socket(fam, socket.SOCK_STREAM)
        if peer_rcvbuf:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
        peer.settimeout(5)
        peer.connect((vip, PORT))
        listener.settimeout(5)
        server, _ = listener.accept()
    return server, peer


def sockets_in(ns: str) -> list[str]:
    """TCP sockets in a host, one line each, as `ss -tan` shows them."""
    return netns.run(ns, ["ss", "-tanH"]).stdout.splitlines()


def take_over(topology, ici: ICI, vip: str, *, early: bool) -> socket.socket:
    """The destination's half of a pass, in one of the two orders the design allows.

    early: create with freebind while the origin still holds the address, then move the
    address and activate (the order of kernel.api's docstring). Otherwise the
    destination isolates the tuple (so its kernel answers nothing while it has the address
    but no socket), takes the address, creates without freebind (it owns it now), lifts
    the isolation and activates.
    """
    if early:
        with netns.enter(topology.destination):
            restored = api.create(ici, freebind=True)
        topology.move_vip(vip, topology.origin, topology.destination)
        with netns.enter(topology.destination):
            return api.activate(restored)
    isolation = Isolation()
    with netns.enter(topology.destination):
        isolation.isolate([tuple_of(ici)])
    topology.move_vip(vip, topology.origin, topology.destination)
    with netns.enter(topology.destination):
        restored = api.create(ici)
        isolation.release([tuple_of(ici)])
        assert isolation.isolated() == set()
        return api.activate(restored)


def release_origin(topology, sock: socket.socket, ici: ICI, isolation: Isolation) -> None:
    with netns.enter(topology.origin):
        api.release(sock, ici, isolation)
        assert isolation.isolated() == set()


def stable(ici: ICI) -> ICI:
    """The fields of an isolated endpoint that must not move between two dumps.

    Not the clocks, and not rcv_wnd/rcv_wup: an isolated socket in repair mode still
    builds ACKs (its delayed-ACK timer, or the window update tcp_cleanup_rbuf() makes after
    the dump's MSG_PEEK), and building one moves rcv_wup to rcv_nxt and re-selects the
    window, although isolation drops the segment itself.
    """
    return ici.replace(ts_val=0, dump_time_ns=0, rcv_wnd=0, rcv_wup=0)


# --- 1. both ends from nothing, sequence numbers wrapping ----------------------------

S0 = 2**32 - 1000   # the server's first unacknowledged byte: wraps 1000 bytes in
C0 = 2**32 - 1500   # the client's: wraps inside the server's restored receive queue
WINDOW = 64 << 10
SERVER_STREAM = stream(4 << 20, 1)
CLIENT_STREAM = stream(4 << 20, 2)


def constructed(topology) -> tuple[ICI, ICI]:
    """The two ICIs of a connection that never had a handshake (tcp-constructor.c).

    The server holds 2000 received bytes its application has not read yet (across the
    wrap of its rcv_nxt) and 3000 bytes written but never sent (across the wrap of its
    write_seq); the client has had all it sent acknowledged and received nothing yet.
    """
    vip, now = ipaddress.ip_address(topology.vip4), time.time_ns()
    client_addr = ipaddress.ip_address(PEER4)
    common = dict(family=4, flags=F_WSCALE | F_SACK | F_TIMESTAMP | F_WINDOW, mss_clamp=1460,
                  snd_wscale=7, rcv_wscale=7, snd_wnd=WINDOW, max_window=WINDOW,
                  rcv_wnd=WINDOW, dump_time_ns=now)
    server = ICI(local_addr=vip, local_port=PORT, remote_addr=client_addr, remote_port=40100,
                 snd_una=S0, snd_nxt=S0, write_seq=(S0 + 3000) % 2**32,
                 copied_seq=C0, rcv_nxt=(C0 + 2000) % 2**32, snd_wl1=(C0 + 2000) % 2**32,
                 rcv_wup=(C0 + 2000) % 2**32, ts_val=100_000,
                 recv_queue=CLIENT_STREAM[:2000], unsent_queue=SERVER_STREAM[:3000], **common)
    client = ICI(local_addr=client_addr, local_port=40100, remote_addr=vip, remote_port=PORT,
                 snd_una=(C0 + 2000) % 2**32, snd_nxt=(C0 + 2000) % 2**32,
                 write_seq=(C0 + 2000) % 2**32, copied_seq=S0, rcv_nxt=S0, snd_wl1=S0,
                 rcv_wup=S0, ts_val=7_000_000, **common)
    return server.validate(), client.validate()


def test_constructed_connection_wraps_and_survives_a_dump_and_restore(topology, rst_watch):
    server_ici, client_ici = constructed(topology)
    assert server_ici.write_seq < S0 and server_ici.rcv_nxt < C0  # the wrap is in the queues
    topology.add_vip(topology.origin, topology.vip4)
    with netns.enter(topology.origin):
        server_restored = api.create(server_ici)
    with netns.enter(topology.peer):
        client_restored = api.create(client_ici)
    server, client = api.activate(server_restored), api.activate(client_restored)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)  # no autotuning
    duplex = Duplex(End("server", server, SERVER_STREAM, sent=3000),
                    End("client", client, CLIENT_STREAM, sent=2000))
    duplex.stop_reading_at(1 << 20)
    duplex.verify()

    # Mid-transfer, with both directions in flight: isolate, dump, move to B.
    isolation = Isolation()
    with netns.enter(topology.origin):
        ici = api.get(server, isolation)
        again = repair.dump(server)
    assert stable(again) == stable(ici), "an isolated endpoint's state moved between dumps"
    srv = duplex.server
    # Exact positions: every sequence number is the constructed one plus the stream offset.
    assert ici.write_seq == (S0 + srv.sent) % 2**32
    assert ici.copied_seq == (C0 + len(srv.got)) % 2**32
    assert ici.snd_una < S0 and ici.copied_seq < C0  # both wrapped past 2^32
    assert ici.send_queue == SERVER_STREAM[srv.sent - len(ici.send_queue):srv.sent]
    assert ici.recv_queue == CLIENT_STREAM[len(srv.got):len(srv.got) + len(ici.recv_queue)]
    assert ici.recv_queue and ici.unsent_queue
    assert (ici.sack, ici.timestamps, ici.wscale, ici.snd_wscale, ici.rcv_wscale) == \
        (True, True, True, 7, 7)
    assert ici.mss_clamp == 1460

    moved = take_over(topology, ici, topology.vip4, early=False)
    release_origin(topology, server, ici, isolation)
    srv.attach(moved)
    duplex.finish()

    # Everything acknowledged: both ends' sequence numbers are exactly where they must be.
    until(lambda: ioctl(moved, C.SIOCOUTQ) == 0 and ioctl(client, C.SIOCOUTQ) == 0, 5,
          "both send queues acknowledged")
    with netns.enter(topology.destination):
        repair.repair_on(moved)
        end_server = repair.dump(moved)
    with netns.enter(topology.peer):
        repair.repair_on(client)
        end_client = repair.dump(client)
    assert end_server.snd_una == end_server.write_seq == (S0 + len(SERVER_STREAM)) % 2**32
    assert end_server.rcv_nxt == end_server.copied_seq == (C0 + len(CLIENT_STREAM)) % 2**32
    assert (end_client.snd_una, end_client.rcv_nxt) == (end_server.rcv_nxt, end_server.snd_una)
    repair.close_silently(moved)
    repair.close_silently(client)


# --- 2. unread, unacknowledged and unsent data at the moment of passing --------------

def test_pass_with_unread_unacknowledged_and_unsent_data(topology, rst_watch):
    """The peer has sent what the server has not read; the server has sent what the peer
    has not acknowledged (the network loses the peer's ACKs) and written what it could not
    send yet (the peer stopped reading, its small window is full)."""
    server, peer = connect(topology, 4, peer_rcvbuf=16 << 10)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 512 << 10)
    to_server, to_peer = stream(1 << 20, 3), stream(2 << 20, 4)
    unread = 40_000
    peer.sendall(to_server[:unread])
    until(lambda: ioctl(server, C.SIOCINQ) == unread, 5, "the peer's bytes queued at the server")

    netns.run(topology.bridge, ["nft", "-f", "-"], input=f"""table bridge tcpcp_test_loss {{
  chain loss {{
    type filter hook forward priority 0; policy accept;
    ip saddr {PEER4} ip daddr {topology.vip4} tcp dport {PORT} drop
  }}
}}
""")
    server.setblocking(False)
    written = 0
    try:
        while written < len(to_peer):
            written += server.send(to_peer[written:written + CHUNK])
    except BlockingIOError:
        pass
    until(lambda: 0 < ioctl(server, C.SIOCOUTQNSD) < ioctl(server, C.SIOCOUTQ), 5,
          "data both in flight and unsent")

    isolation = Isolation()
    with netns.enter(topology.origin):
        ici = api.get(server, isolation)
    assert ici.recv_queue == to_server[:unread]
    assert ici.sent_queue and ici.unsent_queue, (len(ici.sent_queue), len(ici.unsent_queue))
    assert ici.send_queue == to_peer[:written]  # nothing acknowledged: the ACKs were lost
    netns.run(topology.bridge, ["nft", "delete", "table", "bridge", "tcpcp_test_loss"])

    moved = take_over(topology, ici, topology.vip4, early=True)
    release_origin(topology, server, ici, isolation)
    duplex = Duplex(End("server", moved, to_peer, sent=written),
                    End("peer", peer, to_server, sent=unread))
    duplex.finish()


# --- 3. and 4. a pass mid-transfer: peers without SACK, timestamps or window scaling; IPv6

@pytest.mark.parametrize("family, sysctl, early", [
    (4, None, False),
    (6, None, True),
    (6, None, False),
    (4, "tcp_sack", False),
    (4, "tcp_timestamps", True),
    (4, "tcp_window_scaling", False),
], ids=["v4", "v6-create-first", "v6", "v4-no-sack", "v4-no-timestamps", "v4-no-wscale"])
def test_pass_mid_transfer(topology, rst_watch, family, sysctl, early):
    if sysctl:
        netns.sysctl(topology.peer, f"net.ipv4.{sysctl}", 0)  # per namespace, v6 too
    server, peer = connect(topology, family, peer_rcvbuf=128 << 10)
    duplex = Duplex(End("server", server, stream(3 << 20, 5)),
                    End("peer", peer, stream(3 << 20, 6)))
    duplex.stop_reading_at(1 << 20)

    isolation = Isolation()
    with netns.enter(topology.origin):
        ici = api.get(server, isolation)
    expected = {"sack": sysctl != "tcp_sack", "timestamps": sysctl != "tcp_timestamps",
                "wscale": sysctl != "tcp_window_scaling"}
    assert {k: getattr(ici, k) for k in expected} == expected
    assert ici.has_window and ici.family == family
    assert ici.recv_queue and ici.unsent_queue
    assert ici.remote == ((PEER4 if family == 4 else PEER6), peer.getsockname()[1])
    if not expected["timestamps"]:
        assert ici.ts_val == 0
    if not expected["wscale"]:
        assert ici.snd_wscale == ici.rcv_wscale == 0

    moved = take_over(topology, ici, vip_of(topology, family), early=early)
    release_origin(topology, server, ici, isolation)
    duplex.server.attach(moved)
    duplex.finish()


# --- 5. bad input ---------------------------------------------------------------------

def hand_made(topology, **changes) -> ICI:
    """A valid established endpoint of the VIP, made by hand; ``changes`` spoil it."""
    base = ICI(family=4, local_addr=ipaddress.ip_address(topology.vip4), local_port=PORT,
               remote_addr=ipaddress.ip_address(PEER4), remote_port=40200,
               flags=F_WSCALE | F_SACK, snd_wscale=7, rcv_wscale=7,
               snd_una=1000, snd_nxt=1000, write_seq=1000, rcv_nxt=5000, copied_seq=5000)
    return base.replace(**changes)


@pytest.mark.parametrize("field_name, changes", [
    ("snd_una", dict(snd_una=1500, sent_queue=b"")),                    # beyond snd_nxt
    ("snd_nxt", dict(snd_nxt=1200)),                                     # beyond write_seq
    ("copied_seq", dict(copied_seq=5001)),                               # beyond rcv_nxt
    ("sent_queue", dict(snd_nxt=1100, write_seq=1100, sent_queue=b"x" * 99)),
    ("snd_wscale", dict(flags=F_SACK)),                                  # not negotiated
    ("mss_clamp", dict(mss_clamp=40)),
    ("state", dict(state=8)),
    ("flags", dict(snd_wnd=1000)),                                       # no F_WINDOW
])
def test_invalid_ici_is_refused_before_any_socket_exists(topology, field_name, changes):
    topology.add_vip(topology.destination, topology.vip4)
    before = sockets_in(topology.destination)
    bad = hand_made(topology, **changes)
    for freebind in (False, True):
        with netns.enter(topology.destination), pytest.raises(ICIError) as refused:
            api.create(bad, freebind=freebind)
        assert refused.value.field == field_name
        assert f"invalid ICI: {field_name}:" in str(refused.value)
    assert sockets_in(topology.destination) == before == []

    # The control: the same ICI unspoilt does make a socket, which `ss` shows.
    with netns.enter(topology.destination):
        restored = api.create(hand_made(topology))
    try:
        assert any(f"{topology.vip4}:{PORT}" in line and "ESTAB" in line
                   for line in sockets_in(topology.destination))
    finally:
        repair.close_silently(restored.sock)
    until(lambda: sockets_in(topology.destination) == [], 2, "the control socket gone")


def test_create_without_the_address_raises_address_error(topology):
    # The VIP is nowhere; the origin's own address belongs to the origin, not to B.
    for local in (topology.vip4, "10.77.0.2"):
        ici = hand_made(topology, local_addr=ipaddress.ip_address(local))
        with netns.enter(topology.destination), pytest.raises(AddressError) as refused:
            api.create(ici)
        assert local in str(refused.value)
        assert sockets_in(topology.destination) == []
    # With freebind the same ICI is accepted before the address arrives.
    with netns.enter(topology.destination):
        restored = api.create(hand_made(topology), freebind=True)
    repair.close_silently(restored.sock)


def test_without_cap_net_admin_the_error_says_so(topology, rst_watch):
    """A process without CAP_NET_ADMIN gets PrivilegeError, and the connection it tried
    to take is untouched: it carries on byte-exact afterwards."""
    server, peer = connect(topology, 4)
    read_fd, write_fd = os.pipe()
    with netns.enter(topology.origin):  # the child must start, and stay, in the origin
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody (all capabilities go with uid 0), then try
            status = 1
            try:
                os.close(read_fd)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                found = {}
                for name, call in (("repair_on", lambda: repair.repair_on(server)),
                                   ("get", lambda: api.get(server, None)),
                                   ("get_isolated", lambda: api.get(server, Isolation()))):
                    try:
                        call()
                        found[name] = None
                    except Exception as exc:  # reported to the parent, which asserts
                        found[name] = [type(exc).__name__, str(exc), getattr(exc, "errno", None)]
                os.write(write_fd, json.dumps(found).encode())
                status = 0
            finally:
                os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child crashed"
    found = json.loads(report)
    for name, error in found.items():
        assert error is not None, f"{name} succeeded without CAP_NET_ADMIN"
        kind, text, err = error
        assert kind == PrivilegeError.__name__, (name, error)
        assert err == errno.EPERM and "CAP_NET_ADMIN" in text, (name, text)
    with netns.enter(topology.origin):
        assert Isolation().isolated() == set()

    duplex = Duplex(End("server", server, stream(1 << 20, 7)),
                    End("peer", peer, stream(1 << 20, 8)))
    duplex.finish()


# --- 6. a pass that fails halfway is undone ---------------------------------------------

@pytest.mark.parametrize("failure", ["corrupt-record", "stale-endpoint"])
def test_failed_pass_is_undone_and_the_connection_carries_on(topology, rst_watch, failure):
    """corrupt-record: a byte of the record flips in transit, the destination refuses it
    (passing.export / import_ / undo). stale-endpoint: the destination already holds an
    endpoint with the same 4-tuple (left over from an earlier attempt), so its kernel
    refuses the new one at connect() after the address moved (api.get / create / undo)."""
    server, peer = connect(topology, 4, peer_rcvbuf=128 << 10)
    duplex = Duplex(End("server", server, stream(3 << 20, 9)),
                    End("peer", peer, stream(3 << 20, 10)))
    duplex.stop_reading_at(1 << 20)
    isolation = Isolation()
    before_b = sockets_in(topology.destination)

    if failure == "corrupt-record":
        with netns.enter(topology.origin):
            exported = passing.export([(server, b"application state")], isolation)
            assert len(isolation.isolated()) == 1
        raw = exported[0].ici.encode()
        record = bytearray(passing.pack(exported[0].ici, exported[0].app_state))
        record[bytes(record).index(raw) + 60] ^= 0x01  # a sequence number of the ICI
        with netns.enter(topology.destination), pytest.raises(ICIError) as refused:
            passing.import_([bytes(record)])
        assert refused.value.field == "crc"
        assert sockets_in(topology.destination) == before_b
        with netns.enter(topology.origin):
            passing.undo(exported, isolation)
    else:
        with netns.enter(topology.origin):
            ici = api.get(server, isolation)
        dest_isolation = Isolation()
        with netns.enter(topology.destination):
            dest_isolation.isolate([tuple_of(ici)])
        topology.move_vip(topology.vip4, topology.origin, topology.destination)
        with netns.enter(topology.destination):
            stale = api.create(ici.replace(snd_una=ici.snd_nxt, sent_queue=b""))
            with pytest.raises(KernelError) as refused:
                api.create(ici)
        assert (refused.value.step, refused.value.errno) == ("connect", errno.EADDRNOTAVAIL)
        assert len(sockets_in(topology.destination)) == 1  # the stale one only
        topology.move_vip(topology.vip4, topology.destination, topology.origin)
        repair.close_silently(stale.sock)
        with netns.enter(topology.destination):
            dest_isolation.release([tuple_of(ici)])
            assert dest_isolation.isolated() == set()
        with netns.enter(topology.origin):
            api.undo(server, ici, isolation)

    with netns.enter(topology.origin):
        assert isolation.isolated() == set()
    duplex.finish()  # the same sockets, both directions, every byte
    assert [line.split()[0] for line in sockets_in(topology.origin)] == ["ESTAB"]
