"""The paper's API against the real kernel: get, size, create (three port choices), activate,
undo. The peer is a plain socket in the peer namespace."""

import socket

import pytest

from kernel import api, constants as C, netns
from kernel.isolate import Isolation

pytestmark = pytest.mark.netns


def _connected(topo, port=7100):
    """A server socket in A and a plain client socket in the peer, with data both ways."""
    a_addr = topo.hosts[topo.origin].ipv4
    with netns.enter(topo.origin):
        ls = socket.socket()
        ls.bind((a_addr, port))
        ls.listen()
    with netns.enter(topo.peer):
        client = socket.create_connection((a_addr, port), timeout=5)
    server, _ = ls.accept()
    ls.close()
    server.settimeout(5)
    client.sendall(b"p" * 1000)
    server.sendall(b"s" * 2000)
    assert _read(server, 1000) == b"p" * 1000
    assert _read(client, 2000) == b"s" * 2000
    return server, client


def _read(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed"
        out += chunk
    return out


def _in_repair(sock):
    return int.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, C.TCP_REPAIR, 4), "little") == 1


def test_size_is_known_before_get_and_bounds_the_record(topology):
    server, client = _connected(topology)
    client.sendall(b"unread")  # sits in the server's receive queue
    with netns.enter(topology.origin):
        iso = Isolation()
        import time
        time.sleep(0.05)
        before = api.size(server)
        ici = api.get(server, iso)
        try:
            assert ici.recv_queue == b"unread"
            assert before >= ici.size() == len(ici.encode())
        finally:
            api.undo(server, ici, iso)
    assert _read(server, 6) == b"unread"
    client.close()
    server.close()


def test_three_port_choices_then_undo_leaves_the_connection_usable(topology):
    server, client = _connected(topology)
    with netns.enter(topology.origin):
        iso = Isolation()
        ici = api.get(server, iso)
        assert _in_repair(server)
        assert iso.isolated(), "the per-connection rule is in place while passing"
    with netns.enter(topology.destination):
        same = api.create(ici, freebind=True)                      # 1: the ICI's port
        assert same.sock.getsockname()[1] == ici.local_port and _in_repair(same.sock)
        api.release(same.sock, ici, None)
        anyp = api.create(ici, port=api.ANY, freebind=True)        # 2: port cleared
        assert anyp.sock.getsockname()[1] not in (0, ici.local_port) and _in_repair(anyp.sock)
        api.release(anyp.sock, ici, None)
        bound = socket.socket()                                    # 3: already bound
        bound.setsockopt(socket.IPPROTO_IP, C.IP_FREEBIND, 1)
        bound.setsockopt(socket.IPPROTO_IP, C.IP_TRANSPARENT, 1)
        bound.bind((str(ici.local_addr), 0))
        port = bound.getsockname()[1]
        mine = api.create(ici, sock=bound)
        assert mine.sock is bound and bound.getsockname()[1] == port and _in_repair(bound)
        api.release(bound, ici, None)
    with netns.enter(topology.origin):
        api.undo(server, ici, iso)          # the pass is abandoned: origin carries on
        assert not iso.isolated(), "isolation removed after undo"
    assert not _in_repair(server)
    client.sendall(b"again")
    assert _read(server, 5) == b"again"
    server.sendall(b"still here")
    assert _read(client, 10) == b"still here"
    client.close()
    server.close()


def test_get_failure_leaves_no_isolation_behind(topology):
    """A socket that is not connected: get() fails cleanly and isolates nothing."""
    with netns.enter(topology.origin):
        iso = Isolation()
        lonely = socket.socket()
        with pytest.raises(Exception):
            api.get(lonely, iso)
        assert not iso.isolated()
        lonely.close()
