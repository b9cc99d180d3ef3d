"""The test and demo network: peer, origin and destination as namespaces on one bridge.

::

      tcpcp-<tag>-peer      tcpcp-<tag>-a         tcpcp-<tag>-b
      eth0 10.77.0.1        eth0 10.77.0.2        eth0 10.77.0.3
           fd77::1               fd77::2               fd77::3
        |                     |                     |
      v-peer ------------ v-a ------------------- v-b      (tcpcp-<tag>-br: br0)

The bridge has a namespace of its own so that nothing of the test network touches the
root namespace (no address, route or interface is added there), and so that loss can be
injected on the bridge (nftables) without touching any host. The VIP (10.77.0.100,
fd77::100) is assigned to no one at creation; tests move it with :meth:`Topology.add_vip`,
:meth:`~Topology.remove_vip` and :meth:`~Topology.announce` (:mod:`kernel.vip`).

Every namespace created is deleted by :meth:`Topology.destroy`: on leaving the ``with``
block (even on error), or at interpreter exit (``atexit``) as a second line of defence.
Processes still running in a deleted namespace keep it alive, unnamed, until they exit:
whoever starts a process in a host stops it.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import os
import re
import secrets
import socket
import time
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Mapping

from . import netns, vip

SUFFIX = {"peer": "peer", "origin": "a", "destination": "b"}  # role -> namespace suffix
ADDR4 = {"peer": "10.77.0.1", "origin": "10.77.0.2", "destination": "10.77.0.3"}
ADDR6 = {"peer": "fd77::1", "origin": "fd77::2", "destination": "fd77::3"}
PREFIX4, PREFIX6 = 24, 64
VIP4, VIP6 = "10.77.0.100", "fd77::100"
IFNAME = "eth0"
BRIDGE = "br0"
IFA_F_TENTATIVE = 0x40  # linux/if_addr.h
CLOSED_PORT = 9  # nothing listens here in a fresh host: a RST proves the path works

_live: set[str] = set()  # namespaces this process created and has not deleted yet


def live() -> list[str]:
    """Namespaces created by this process and not yet destroyed (leak checks)."""
    return sorted(_live)


class _Reaper:
    """Deletes the namespaces one Topology created; safe to call twice, and at exit.

    Only the process that created them reaps: a forked child running ``atexit`` must
    not tear down its parent's hosts.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.pid = os.getpid()
        atexit.register(self.reap)

    def created(self, name: str) -> None:
        self.names.append(name)
        _live.add(name)

    def reap(self) -> None:
        if os.getpid() != self.pid:
            return
        failed = []
        for name in reversed(self.names):
            try:
                if netns.exists(name):
                    netns.run(None, ["ip", "netns", "delete", name])
            except OSError as e:
                failed.append(f"{name}: {e}")
                continue
            self.names.remove(name)
            _live.discard(name)
        if failed:
            raise OSError(errno.EBUSY, "could not delete " + "; ".join(failed))
        atexit.unregister(self.reap)


@dataclass(frozen=True)
class Host:
    """One host's namespace and its eth0; ``ipv6`` is None when IPv6 is off."""

    role: str  # "peer", "origin" or "destination"
    ns: str
    ipv4: str
    ipv6: str | None
    mac: str


@dataclass(frozen=True)
class Topology:
    """Names and addresses of one test network. Immutable; only destroy() changes things."""

    tag: str
    peer: str
    origin: str
    destination: str
    bridge: str
    hosts: Mapping[str, Host]  # by namespace name
    vip4: str = VIP4
    vip6: str | None = VIP6
    ifname: str = IFNAME
    _reaper: _Reaper | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, tag: str | None = None, ipv6: bool = True,
               timeout: float = 10.0, extra: tuple[str, ...] = ()) -> Topology:
        """Build the network and return once the peer reaches both hosts.

        ``tag`` (default: 6 random hex digits) names the namespaces ``tcpcp-<tag>-*``.
        ``extra``: more hosts on the same bridge (say ``("etcd1",)``), named
        ``tcpcp-<tag>-<name>`` with addresses 10.77.0.10, .11, ... and fd77::10, ...
        On any failure whatever was already created is deleted before raising.
        """
        tag = tag if tag is not None else secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-z][0-9a-z-]{0,31}", tag):
            raise ValueError(f"bad topology tag {tag!r}: lowercase letters, digits, '-'")
        for i, name in enumerate(extra):
            if not re.fullmatch(r"[0-9a-z]{1,8}", name) or name in SUFFIX.values():
                raise ValueError(f"bad extra host name {name!r}")
        names = {role: f"tcpcp-{tag}-{suffix}" for role, suffix in SUFFIX.items()}
        names.update({name: f"tcpcp-{tag}-{name}" for name in extra})
        bridge = f"tcpcp-{tag}-br"
        reaper = _Reaper()
        try:
            for name in [bridge, *names.values()]:
                netns.run(None, ["ip", "netns", "add", name])
                reaper.created(name)
            _quiet(bridge, ipv6=False)
            for name in names.values():
                _quiet(name, ipv6)
            _build_bridge(bridge, names)
            hosts = {}
            for role, name in names.items():
                a4, a6 = _addresses(role, extra)
                mac = _build_host(name, a4, a6 if ipv6 else None)
                hosts[name] = Host(role, name, a4, a6 if ipv6 else None, mac)
            topo = cls(tag, names["peer"], names["origin"], names["destination"], bridge,
                       MappingProxyType(hosts), vip6=VIP6 if ipv6 else None, _reaper=reaper)
            topo.wait_ready(timeout)
            return topo
        except BaseException:
            try:
                reaper.reap()
            except OSError:
                pass  # the original error matters more; atexit retries
            raise

    # --- lifetime -------------------------------------------------------------------
    def destroy(self) -> None:
        """Delete every namespace this topology created, and nothing else. Idempotent."""
        if self._reaper is not None:
            self._reaper.reap()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    @property
    def namespaces(self) -> tuple[str, ...]:
        extra = tuple(h.ns for h in self.hosts.values() if h.role not in SUFFIX)
        return (self.peer, self.origin, self.destination, self.bridge, *extra)

    def role(self, role: str) -> Host:
        """The host with this role ("peer", "origin", "destination", or an extra name)."""
        for host in self.hosts.values():
            if host.role == role:
                return host
        raise ValueError(f"topology {self.tag} has no host {role!r}")

    def host(self, ns: str) -> Host:
        try:
            return self.hosts[ns]
        except KeyError:
            raise ValueError(f"{ns!r} is not a host of topology {self.tag}") from None

    def mac(self, ns: str) -> str:
        return self.host(ns).mac

    # --- the virtual IP ---------------------------------------------------------------
    def add_vip(self, host_ns: str, addr: str) -> bool:
        """Give ``host_ns`` the VIP on eth0 (in the hosts' subnet: /24 or /64)."""
        self.host(host_ns)
        prefix = PREFIX4 if ipaddress.ip_address(addr).version == 4 else PREFIX6
        return vip.add_vip(host_ns, addr, self.ifname, prefix)

    def remove_vip(self, host_ns: str, addr: str) -> bool:
        self.host(host_ns)
        return vip.remove_vip(host_ns, addr, self.ifname)

    def announce(self, host_ns: str, addr: str) -> float:
        """Gratuitous ARP / unsolicited NA for ``addr`` from ``host_ns``; seconds taken."""
        self.host(host_ns)
        return vip.announce(host_ns, addr, self.ifname)

    def move_vip(self, addr: str, src: str, dst: str) -> float:
        """Take ``addr`` from ``src``, give it to ``dst`` and announce it; seconds taken."""
        start = time.perf_counter()
        self.remove_vip(src, addr)
        self.add_vip(dst, addr)
        self.announce(dst, addr)
        return time.perf_counter() - start

    # --- readiness --------------------------------------------------------------------
    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll until links are up, no address is tentative and the peer reaches both
        hosts on every family; raise TimeoutError saying what was still missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = self._not_ready()
            if missing is None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topology {self.tag} not ready after {timeout} s: "
                                   f"{missing}")
            time.sleep(0.01)

    def _not_ready(self) -> str | None:
        for host in self.hosts.values():
            with netns.iproute(host.ns, "check readiness") as ipr:
                link = ipr.link("get", ifname=self.ifname)[0]
                if link.get("IFLA_OPERSTATE") != "UP":
                    return f"{self.ifname} in {host.ns} is {link.get('IFLA_OPERSTATE')}"
                for msg in ipr.get_addr(index=link["index"]):
                    flags = msg.get("IFA_FLAGS", msg["flags"])
                    if flags & IFA_F_TENTATIVE:
                        return f"{msg.get('IFA_ADDRESS')} in {host.ns} is tentative"
        for host in self.hosts.values():
            if host.ns == self.peer:
                continue
            for addr in filter(None, (host.ipv4, host.ipv6)):
                if not _reaches(self.peer, addr):
                    return f"{self.peer} does not reach {addr} ({host.role})"
        return None


def _addresses(role: str, extra: tuple[str, ...]) -> tuple[str, str]:
    if role in ADDR4:
        return ADDR4[role], ADDR6[role]
    i = extra.index(role)
    return f"10.77.0.{10 + i}", f"fd77::{10 + i:x}"


def _reaches(src_ns: str, addr: str) -> bool:
    """A TCP connect to a closed port: refused means the round trip works."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns.enter(src_ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(0.2)
        try:
            return sock.connect_ex((addr, CLOSED_PORT)) == errno.ECONNREFUSED
        except OSError:
            return False


def _quiet(ns: str, ipv6: bool) -> None:
    """Sysctls set before eth0 arrives (a device takes ``default`` when it enters a
    namespace): no DAD, so addresses are usable at once; no router solicitations or
    autoconfiguration on a link without routers; no IPv6 at all where unwanted."""
    for scope in ("all", "default"):
        if not ipv6:
            netns.sysctl(ns, f"net.ipv6.conf.{scope}.disable_ipv6", 1)
            continue
        netns.sysctl(ns, f"net.ipv6.conf.{scope}.accept_dad", 0)
        netns.sysctl(ns, f"net.ipv6.conf.{scope}.accept_ra", 0)
        netns.sysctl(ns, f"net.ipv6.conf.{scope}.router_solicitations", 0)


def _build_bridge(bridge: str, hosts: Mapping[str, str]) -> None:
    """br0 without STP or forward delay (ports forward at once) or multicast snooping
    (ND multicast is flooded, never filtered), one veth per host: v-<suffix> on br0 here,
    its other end created directly in the host as eth0."""
    with netns.iproute(bridge, "build the bridge") as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0,
                 br_mcast_snooping=0)
        br = ipr.link_lookup(ifname=BRIDGE)[0]
        for role, ns in hosts.items():
            port = f"v-{SUFFIX.get(role, role)}"
            ipr.link("add", ifname=port, kind="veth",
                     peer={"ifname": IFNAME, "net_ns_fd": ns})
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br, state="up")
        ipr.link("set", index=br, state="up")


def _build_host(ns: str, addr4: str, addr6: str | None) -> str:
    """lo and eth0 up, the host's addresses on eth0 (IPv6 with nodad); eth0's MAC."""
    with netns.iproute(ns, f"configure {IFNAME}") as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        index = ipr.link_lookup(ifname=IFNAME)[0]
        ipr.link("set", index=index, state="up")
        ipr.addr("add", index=index, address=addr4, prefixlen=PREFIX4)
        if addr6:
            ipr.addr("add", index=index, address=addr6, prefixlen=PREFIX6,
                     flags=vip.IFA_F_NODAD)
        return ipr.link("get", index=index)[0].get("IFLA_ADDRESS")
