"""The test network itself: namespaces, reachability, the VIP moving between hosts, and
the namespace helpers everything else relies on (enter, run, sysctl)."""

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kernel import netns, vip
from kernel.topology import Topology

from polling import until

pytestmark = pytest.mark.netns

PORT = 7777
NAME = re.compile(r"tcpcp-[0-9a-f]{6}-(peer|a|b|br)")


class Responder:
    """A listener in one host that answers every connection with its name, then closes.

    Dual-stack (``::`` without V6ONLY) so one listener serves the VIP on both families.
    """

    def __init__(self, ns, text):
        with netns.enter(ns):
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::", PORT))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.text = text
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(self.text)

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def responders(topology):
    made = [Responder(topology.origin, b"A"), Responder(topology.destination, b"B")]
    yield
    for r in made:
        r.close()


def ask(ns, addr, timeout=0.3):
    """Connect from host ``ns`` to ``addr``:PORT; the answer, or None if no answer."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns.enter(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, PORT))
            return sock.recv(16)
        except OSError:
            return None


def neighbour_mac(ns, addr):
    """The link-layer address ``ns``'s neighbour cache holds for ``addr``, per `ip neigh`."""
    out = netns.run(None, ["ip", "-n", ns, "neigh", "show", addr, "dev", "eth0"]).stdout
    found = re.search(r"lladdr ([0-9a-f:]{17})", out)
    return found.group(1) if found else None


# --- the namespaces -------------------------------------------------------------------

def test_four_namespaces_with_unique_names_gone_after_destroy(topology):
    names = topology.namespaces
    assert [NAME.fullmatch(n).group(1) for n in names] == ["peer", "a", "b", "br"]
    assert len({n.rsplit("-", 1)[0] for n in names}) == 1  # one tag for all four
    listed = netns.run(None, ["ip", "netns", "list"]).stdout
    assert all(n in listed for n in names)
    assert set(topology.hosts) == {topology.peer, topology.origin, topology.destination}
    macs = [h.mac for h in topology.hosts.values()]
    assert len(set(macs)) == 3 and all(re.fullmatch(r"[0-9a-f:]{17}", m) for m in macs)
    for host in topology.hosts.values():
        shown = netns.run(host.ns, ["ip", "-o", "link", "show", "eth0"]).stdout
        assert host.mac in shown and "state UP" in shown

    topology.destroy()
    topology.destroy()  # idempotent
    listed = netns.run(None, ["ip", "netns", "list"]).stdout
    assert not any(n in listed for n in names)


def test_context_manager_destroys_even_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Topology.create() as topo:
            names = topo.namespaces
            raise RuntimeError("boom")
    assert not any(netns.exists(n) for n in names)


def test_atexit_deletes_what_was_not_destroyed():
    code = ("from kernel.topology import Topology\n"
            "t = Topology.create()\n"
            "print(' '.join(t.namespaces))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    names = done.stdout.split()
    assert len(names) == 4
    assert not any(netns.exists(n) for n in names)


def test_bridge_namespace_holds_br0_and_one_port_per_host(topology):
    out = netns.run(topology.bridge, ["ip", "-o", "link", "show", "master", "br0"]).stdout
    assert sorted(re.findall(r"(v-\w+)@", out)) == ["v-a", "v-b", "v-peer"]
    details = netns.run(topology.bridge, ["ip", "-d", "link", "show", "br0"]).stdout
    assert "stp_state 0" in details and "forward_delay 0" in details


def test_nothing_added_to_the_root_namespace(topology):
    out = netns.run(None, ["ip", "-o", "addr"]).stdout
    assert "10.77.0." not in out and "fd77::" not in out


# --- reachability ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_peer_reaches_origin_and_destination(topology, responders, family):
    for ns, answer in ((topology.origin, b"A"), (topology.destination, b"B")):
        addr = getattr(topology.hosts[ns], family)
        assert ask(topology.peer, addr) == answer
        netns.run(topology.peer, ["ping", "-c", "1", "-W", "2", addr])


# --- the VIP moving -------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 6])
def test_vip_moves_from_origin_to_destination(topology, responders, version):
    peer, origin, dest = topology.peer, topology.origin, topology.destination
    addr = topology.vip4 if version == 4 else topology.vip6
    if version == 4:  # the update below must not depend on arp_accept
        assert netns.sysctl(peer, "net.ipv4.conf.all.arp_accept") == "0"
        assert netns.sysctl(peer, "net.ipv4.conf.eth0.arp_accept") == "0"

    assert topology.add_vip(origin, addr)
    assert until(lambda: ask(peer, addr), 5, f"peer reaches {addr} on the origin") == b"A"
    assert neighbour_mac(peer, addr) == topology.mac(origin)

    assert topology.remove_vip(origin, addr)
    assert not topology.remove_vip(origin, addr)  # idempotent
    assert topology.add_vip(dest, addr)
    # Nothing has told the peer yet: its existing entry still points at the origin.
    assert neighbour_mac(peer, addr) == topology.mac(origin)

    taken = topology.announce(dest, addr)
    assert 0 < taken < 0.5
    until(lambda: neighbour_mac(peer, addr) == topology.mac(dest), 1,
          f"peer's neighbour entry for {addr} moves to the destination's MAC")
    start = time.monotonic()
    assert until(lambda: ask(peer, addr), 1, f"peer reaches {addr} on the destination") \
        == b"B"
    assert time.monotonic() - start < 0.5


def test_add_vip_is_idempotent_and_uses_nodad(topology):
    assert topology.add_vip(topology.origin, topology.vip6)
    assert not topology.add_vip(topology.origin, topology.vip6)
    shown = netns.run(topology.origin, ["ip", "-6", "addr", "show", "eth0"]).stdout
    line = next(l for l in shown.splitlines() if "fd77::100/64" in l)
    assert "nodad" in line and "tentative" not in line


def test_vip_errors_name_the_interface_and_namespace(topology):
    with pytest.raises(OSError) as raised:
        vip.add_vip(topology.origin, "10.77.0.100", "nosuch0")
    assert raised.value.errno == errno.ENODEV and topology.origin in str(raised.value)
    with pytest.raises(OSError) as raised:
        vip.announce(topology.origin, "fd77::100", "nosuch0")
    assert raised.value.errno == errno.ENODEV
    with pytest.raises(ValueError):
        topology.add_vip(topology.bridge, topology.vip4)  # the bridge is not a host


# --- netns helpers --------------------------------------------------------------------

def test_enter_moves_the_thread_and_restores_it_when_the_body_raises(topology):
    home = netns.current()
    with pytest.raises(KeyError):
        with netns.enter(topology.origin):
            assert netns.current() == netns.inode(topology.origin) != home
            with netns.enter(topology.peer):  # nesting returns to the outer one
                assert netns.current() == netns.inode(topology.peer)
            assert netns.current() == netns.inode(topology.origin)
            raise KeyError("body failed")
    assert netns.current() == home


def test_sockets_stay_in_the_namespace_they_were_made_in(topology, responders):
    with netns.enter(topology.peer):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:  # 10.77.0.2 is unreachable from the root namespace, reachable from peer
        sock.settimeout(2)
        sock.connect((topology.hosts[topology.origin].ipv4, PORT))
        assert sock.recv(16) == b"A"


def test_enter_unknown_namespace_raises_enoent_and_stays_home():
    home = netns.current()
    with pytest.raises(FileNotFoundError) as raised:
        with netns.enter("tcpcp-no-such-namespace"):
            pass
    assert raised.value.errno == errno.ENOENT
    assert "tcpcp-no-such-namespace" in str(raised.value)
    assert netns.current() == home


def test_sysctl_is_per_thread_and_touches_only_its_namespace(topology):
    root_before = netns.sysctl(None, "net.ipv4.ip_forward")
    other = "0" if root_before == "1" else "1"
    seen_by_other_thread = []
    with netns.enter(topology.origin):
        # another thread of this process is still in the root namespace meanwhile
        t = threading.Thread(target=lambda: seen_by_other_thread.append(
            netns.sysctl(None, "net.ipv4.ip_forward")))
        t.start()
        t.join()
    assert netns.sysctl(topology.origin, "net.ipv4.ip_forward", other) == other
    outside = netns.run(topology.origin, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout
    assert outside.strip() == other  # what a process inside the namespace sees
    assert netns.sysctl(None, "net.ipv4.ip_forward") == root_before
    assert seen_by_other_thread == [root_before]
    assert netns.sysctl(topology.peer, "net.ipv6.conf.eth0.accept_dad") == "0"
    with pytest.raises(FileNotFoundError, match="no sysctl"):
        netns.sysctl(topology.peer, "net.ipv4.no_such_knob")


def test_run_and_popen_execute_inside_and_report_stderr(topology):
    out = netns.run(topology.destination, ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout
    assert "10.77.0.3/24" in out
    with pytest.raises(netns.CommandError) as raised:
        netns.run(topology.destination, ["ip", "link", "show", "nosuch0"])
    assert topology.destination in str(raised.value)
    assert "nosuch0" in str(raised.value) and raised.value.returncode != 0
    assert netns.run(topology.peer, ["false"], check=False).returncode == 1
    proc = netns.popen(topology.peer, ["cat"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    assert proc.communicate("hello", timeout=10)[0] == "hello"


def test_without_root_errors_say_what_privilege_is_missing(topology):
    """Run as nobody: creating hosts, entering one and announcing are refused clearly.

    nobody may not be able to read the checkout (a fresh clone in a 0700 directory), so
    the child imports world-readable copies of ``kernel`` and ``pyroute2``."""
    import pyroute2
    readable = tempfile.mkdtemp(prefix="tcpcp-nobody-")
    os.chmod(readable, 0o755)
    shutil.copytree(Path(__file__).resolve().parents[2] / "kernel", Path(readable) / "kernel")
    shutil.copytree(Path(pyroute2.__file__).parent, Path(readable) / "pyroute2")
    for root, dirs, files in os.walk(readable):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    code = f"""
import sys
import tempfile
sys.path.insert(0, {readable!r})
from kernel import netns, vip
from kernel.topology import Topology
for what, call in [("create", lambda: Topology.create()),
                   ("enter", lambda: netns.enter({topology.origin!r}).__enter__()),
                   ("announce", lambda: vip.announce(None, "10.77.0.100", "tcpcp-nosuch"))]:
    try:
        call()
        print(what, "NOT REFUSED")
    except PermissionError as e:
        print(what, "PermissionError", e)
"""
    try:
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, cwd="/")
    finally:
        shutil.rmtree(readable, ignore_errors=True)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert set(lines) == {"create", "enter", "announce"}, done.stdout + done.stderr
    assert all(v.startswith("PermissionError") for v in lines.values()), lines
    assert "root" in lines["create"] and "CAP_NET_ADMIN" in lines["create"]
    assert "root" in lines["enter"]
    assert "CAP_NET_RAW" in lines["announce"]
