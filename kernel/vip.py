"""The virtual IP that moves with the connections, and telling the link it moved.

Passing an endpoint moves its local address too (paper, step "move traffic"): the
destination takes the virtual IP (VIP) the peer talks to. The peer's neighbour cache
still maps the VIP to the origin's MAC, and would keep doing so until the entry ages out
(seconds), so the destination announces the new mapping at once:

- IPv4: a gratuitous ARP, broadcast, sender = target = VIP, sender MAC = ours. Linux
  updates an *existing* neighbour entry from it without ``arp_accept`` (``arp_process``
  treats sip == tip as a GARP and overrides the lock time); ``arp_accept`` only governs
  creating new entries. Two frames go out: a request (RFC 5227's announcement form) and a
  reply with target MAC = sender MAC (Linux only counts a *reply* as gratuitous when
  tha == sha: measured on 6.18, a reply with tha 0 or ff:ff:.. left an entry refreshed
  less than ``locktime`` (1 s) ago unchanged; the request or the tha == sha reply alone
  each moved it, to STALE, which is used at once).
- IPv6: an unsolicited neighbour advertisement to ff02::1 with the override flag set and
  the solicited flag clear, carrying the target link-layer address option, hop limit 255
  (receivers drop any other). A raw ICMPv6 socket has its checksum filled by the kernel.

``ns=None`` everywhere means the calling thread's own namespace (production: the agent
runs in the host); a name enters that namespace first (tests: hosts are namespaces).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
import threading
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import netns

IFA_F_NODAD = 0x02  # linux/if_addr.h
ETH_P_ARP = 0x0806  # linux/if_ether.h
ARPOP_REQUEST, ARPOP_REPLY = 1, 2  # linux/if_arp.h
ND_NEIGHBOR_ADVERT = 136  # netinet/icmp6.h
NA_FLAG_OVERRIDE = 0x20000000  # router 0x80000000 and solicited 0x40000000 stay clear
ND_OPT_TARGET_LINKADDR = 2
SIOCGIFHWADDR = 0x8927  # linux/sockios.h
ALL_NODES = "ff02::1"
BROADCAST = b"\xff" * 6


def _where(ns: str | None) -> str:
    return f" in network namespace {ns!r}" if ns else ""


def _index(ipr: IPRoute, ns: str | None, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise OSError(errno.ENODEV, f"no interface {ifname!r}{_where(ns)}")
    return found[0]


def add_vip(ns: str | None, addr: str, ifname: str, prefixlen: int | None = None) -> bool:
    """Assign ``addr`` to ``ifname``; return False if it was already there.

    IPv6 addresses get ``nodad``: duplicate address detection would keep the VIP
    tentative (unusable) for a second or more, and the origin has already let go of it.
    The default prefix is a host prefix (/32, /128): the VIP claims one address only.
    """
    ip = ipaddress.ip_address(addr)
    plen = prefixlen if prefixlen is not None else ip.max_prefixlen
    flags = IFA_F_NODAD if ip.version == 6 else 0
    with netns.iproute(ns, f"add {ip}/{plen} on {ifname}") as ipr:
        index = _index(ipr, ns, ifname)
        try:
            ipr.addr("add", index=index, address=str(ip), prefixlen=plen, flags=flags)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return False
            raise
    if ip.version == 6:
        _wait_solicited_node(ns, ip, ifname)
    return True


def solicited_node(ip: ipaddress.IPv6Address) -> str:
    """The solicited-node group of ``ip`` as /proc/net/igmp6 prints it (pure)."""
    return "ff0200000000000000000001ff" + ip.packed[-3:].hex()


def _wait_solicited_node(ns: str | None, ip, ifname: str, deadline_s: float = 1.0) -> None:
    """Return once the kernel has joined the address's solicited-node group.

    Even with nodad the join lands a moment after the address; a neighbour solicitation
    arriving before it is dropped and the sender waits a second to ask again. A takeover
    that announces with an unsolicited NA does not depend on it, so a timeout is not an
    error: the address works, only a first solicitation may go unanswered.
    """
    group = solicited_node(ip)
    end = time.monotonic() + deadline_s
    with netns.within(ns):
        while time.monotonic() < end:
            try:
                with open("/proc/thread-self/net/igmp6") as f:
                    if any(ifname in line and group in line for line in f):
                        return
            except OSError:
                return
            time.sleep(0.002)


def remove_vip(ns: str | None, addr: str, ifname: str) -> bool:
    """Remove ``addr`` from ``ifname``, whatever its prefix; False if it was not there.

    Idempotent on purpose: making sure a host no longer holds the VIP (fencing) must not
    fail because it already let go.
    """
    ip = ipaddress.ip_address(addr)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with netns.iproute(ns, f"remove {ip} from {ifname}") as ipr:
        index = _index(ipr, ns, ifname)
        held = [m for m in ipr.get_addr(family=family, index=index)
                if ipaddress.ip_address(m.get("IFA_ADDRESS")) == ip]
        if not held:
            return False
        try:
            ipr.addr("del", index=index, address=str(ip), prefixlen=held[0]["prefixlen"])
        except NetlinkError as e:
            if e.code == errno.EADDRNOTAVAIL:  # gone meanwhile
                return False
            raise
    return True


def arp_announcement(mac: bytes, ip: bytes) -> list[bytes]:
    """The two gratuitous ARP frames (request, then reply), padded to 60 bytes."""
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)

    def arp(op: int, tha: bytes) -> bytes:
        # htype Ethernet, ptype IPv4, hlen 6, plen 4, op, sha, spa, tha, tpa
        body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, ip, tha, ip)
        return (eth + body).ljust(60, b"\0")

    return [arp(ARPOP_REQUEST, b"\0" * 6), arp(ARPOP_REPLY, mac)]


def neighbour_advertisement(mac: bytes, target: bytes) -> bytes:
    """An unsolicited NA (override set, solicited clear); the kernel fills the checksum."""
    return struct.pack("!BBHI16sBB6s", ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE, target,
                       ND_OPT_TARGET_LINKADDR, 1, mac)


def _hwaddr(sock: socket.socket, ifname: str) -> bytes:
    ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("16s16x", ifname.encode()))
    return ifreq[18:24]  # ifr_name[16], then sockaddr: sa_family (2), sa_data


def _open(ns: str | None, ip, ifname: str) -> tuple[socket.socket, int]:
    """The sending socket and ``ifname``'s index, both resolved in the calling thread's ns."""
    try:
        if ip.version == 4:
            # protocol 0: a send-only socket; a protocol (or a bind) would register a
            # receive hook, and (un)registering one waits for an RCU grace period (~8 ms)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        else:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    except PermissionError:
        raise PermissionError(errno.EPERM, f"announce {ip}{_where(ns)}: raw sockets need "
                              "CAP_NET_RAW (run as root)") from None
    try:
        return sock, socket.if_nametoindex(ifname)
    except OSError:
        sock.close()
        raise OSError(errno.ENODEV, f"no interface {ifname!r}{_where(ns)}") from None


def announce(ns: str | None, addr: str, ifname: str) -> float:
    """Tell everyone on ``ifname``'s link that ``addr`` is now at our MAC.

    Returns the seconds until the last frame was handed to the device (entering the
    namespace, opening the socket, sending): the part of a takeover it accounts for.
    Closing an AF_PACKET socket always waits for an RCU grace period (``packet_release``
    calls ``synchronize_net``, ~8 ms here); that comes after and delays no frame.
    """
    ip = ipaddress.ip_address(addr)
    start = time.perf_counter()
    with netns.within(ns):
        sock, index = _open(ns, ip, ifname)
    try:
        try:
            mac = _hwaddr(sock, ifname)
            if ip.version == 4:
                for frame in arp_announcement(mac, ip.packed):
                    sock.sendto(frame, (ifname, ETH_P_ARP))
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
                sock.sendto(neighbour_advertisement(mac, ip.packed), (ALL_NODES, 0, 0, index))
            sent = time.perf_counter()
        except OSError as e:
            raise OSError(e.errno, f"announce {ip} on {ifname}{_where(ns)}: "
                          f"{e.strerror or e}") from None
    finally:
        # The frames are out; the close's RCU wait (~8 ms) is nobody's business on a
        # takeover's critical path, so it happens in the background.
        threading.Thread(target=sock.close, name="announce-close", daemon=True).start()
    return sent - start
