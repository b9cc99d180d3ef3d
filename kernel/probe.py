"""Learn how far the peer got before re-creating an endpoint.

The peer may have received and acknowledged more than the dump knows: the origin's
kernel kept transmitting until isolation, and after a crash the checkpoint is older
still. If the peer's ACK lands beyond a restored socket's snd_nxt, the kernel drops the
peer's segments and answers with rate-limited challenge ACKs: a permanent stall. So the
destination asks first.

The question is a raw segment carrying one old byte (seq = snd_una - 1): for the peer it
is a duplicate, which it answers at once with a pure ACK (quick-ack path, not the
rate-limited out-of-window path a bare ACK would take). The answer's ack number is L, the
peer's rcv_nxt; its sequence number is how far the peer has sent.

While asking, the destination's kernel has no socket for the connection and would answer
the peer with RST: the caller keeps the tuples isolated on the destination (input and
output dropped). The question itself is sent through AF_PACKET, which netfilter's output
hook never sees, and the answer is read from AF_PACKET, which sees it before the input
hook drops it.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import select
import socket
import struct
import time
from dataclasses import dataclass

from .ici import ICI

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


@dataclass(frozen=True)
class Answer:
    """What one peer told us: L (its rcv_nxt), its snd_nxt, its window (unscaled)."""

    acked: int
    peer_seq: int
    window: int


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def segment(ici: ICI, ts_val: int | None, *, payload: bytes = b"\0") -> bytes:
    """The IP packet (header included) of a probe for ``ici`` (pure; tested without root)."""
    seq = (ici.snd_una - len(payload)) & 0xFFFFFFFF
    window = min(0xFFFF, ici.rcv_wnd >> ici.rcv_wscale) if ici.has_window else 0xFFFF
    options = b""
    if ici.timestamps and ts_val is not None:
        options = b"\x01\x01\x08\x0a" + struct.pack("!II", ts_val, 0)
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", ici.local_port, ici.remote_port, seq, ici.rcv_nxt,
                      offset << 4, TH_ACK | TH_PSH, window, 0, 0) + options + payload
    src, dst = ici.local_addr.packed, ici.remote_addr.packed
    if ici.family == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64,
                         socket.IPPROTO_TCP, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        return ip + tcp
    pseudo = src + dst + struct.pack("!IxxxB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, src, dst)
    return ip + tcp


def parse(packet: bytes):
    """(src, sport, dst, dport, seq, ack, flags, window, payload length) of an IP/TCP
    packet, or None. The packet must be exactly the IP datagram (AF_PACKET SOCK_DGRAM)."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != socket.IPPROTO_TCP or len(packet) < ihl + 20 or ihl < 20:
            return None
        (total,) = struct.unpack_from("!H", packet, 2)  # frames may carry Ethernet padding
        src, dst, tcp = packet[12:16], packet[16:20], packet[ihl:total]
    elif version == 6 and len(packet) >= 60:
        if packet[6] != socket.IPPROTO_TCP:  # extension headers are not expected here
            return None
        (length,) = struct.unpack_from("!H", packet, 4)
        src, dst, tcp = packet[8:24], packet[24:40], packet[40:40 + length]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq, ack, offset, flags, window = struct.unpack_from("!HHIIBBH", tcp)
    payload = max(0, len(tcp) - (offset >> 4) * 4)
    return (_ip(src), sport, _ip(dst), dport, seq, ack, flags, window, payload)


@functools.lru_cache(maxsize=4096)
def _ip(raw: bytes):
    return ipaddress.ip_address(raw)


def _mac_of(ifname: str, addr) -> bytes:
    """The neighbour's MAC from the kernel's table, resolving it with a ping if needed."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        for _ in range(2):
            for entry in ipr.get_neighbours(family=family, ifindex=idx):
                if entry.get_attr("NDA_DST") == str(addr) and entry.get_attr("NDA_LLADDR"):
                    return bytes.fromhex(entry.get_attr("NDA_LLADDR").replace(":", ""))
            _solicit(addr)
    raise OSError(f"no link-layer address for {addr} on {ifname}")


def _solicit(addr) -> None:
    """Make the kernel resolve ``addr`` (a UDP datagram to the discard port does it)."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"", (str(addr), 9))
        except OSError:
            pass
    time.sleep(0.02)


class Prober:
    """AF_PACKET sockets for asking peers, opened before a pass and reused.

    Opening, binding and closing packet sockets each wait for the kernel to synchronise
    (8-16 ms apiece), which is more than probing a thousand peers costs: so the
    destination opens them while preparing, not on the critical path of the pass.
    Create it inside the destination's network namespace.
    """

    def __init__(self, ifname: str):
        self.ifname = ifname
        self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            self._filter(accept=False)  # until asked, the kernel queues nothing for us
            self.rx.bind((ifname, ETH_P_ALL))
            self.rx.setblocking(False)
            # Answers from a thousand peers arrive in a burst beside bulk data: room for all.
            self.rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        except BaseException:
            self.rx.close()
            raise
        self._macs: dict = {}
        self.rounds = 0
        self._poll = select.poll()
        self._poll.register(self.rx, select.POLLIN)

    def _filter(self, accept: bool) -> None:
        """A one-instruction classic BPF filter: ``ret #0`` (drop all) or ``ret #-1``.

        An unfiltered ETH_P_ALL socket would copy every packet of the host's bulk traffic
        while the pass is being prepared, and draining that backlog would delay the answers.
        """
        self._prog = (ctypes.c_uint8 * 8)(*struct.pack("=HBBI", 0x06, 0, 0, 0xFFFFFFFF if accept else 0))
        fprog = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(self._prog))
        self.rx.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()

    def __enter__(self) -> "Prober":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drain(self) -> None:
        while True:
            try:
                self.rx.recv(65535)
            except BlockingIOError:
                return

    def begin(self) -> None:
        """Start a round of questions: from now on answers are collected.

        Questions are then sent one by one (``send``) as each endpoint is dumped, so
        peers answer while the next ones are dumped, and ``collect`` waits for the rest.
        """
        self._drain()  # what the socket caught before the question is not an answer
        self._filter(accept=True)
        self._icis: dict[int, ICI] = {}
        self._want: dict = {}
        self._seen: dict[int, Answer] = {}
        self._answered: set[int] = set()

    def send(self, i: int, ici: ICI, ts_val: int | None = None) -> None:
        """Ask the peer of ``ici`` (known as ``i`` in the answers) how far it got."""
        self._collect()  # whatever arrived so far predates this question
        self._icis[i] = ici
        self._want[(ici.remote_addr, ici.remote_port, ici.local_addr, ici.local_port)] = i
        proto = ETH_P_IPV6 if ici.family == 6 else ETH_P_IP
        mac = self._macs.get(ici.remote_addr)
        if mac is None:
            mac = self._macs[ici.remote_addr] = _mac_of(self.ifname, ici.remote_addr)
        self.tx.sendto(segment(ici, ts_val), (self.ifname, proto, 0, 0, mac))

    def collect(self, *, timeout: float = 0.03, retries: int = 5, ts_for=None) -> dict[int, Answer]:
        """Wait for answers; ask again whoever is silent; end the round. {index: Answer}."""
        try:
            for attempt in range(retries):
                deadline = time.monotonic() + timeout
                while len(self._answered) < len(self._icis):
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._poll.poll(left * 1000):  # poll: fds > 1024
                        break
                    self._collect()
                self.rounds = attempt + 1
                silent = [i for i in self._icis if i not in self._answered]
                if not silent or attempt == retries - 1:
                    break
                for i in silent:
                    ici = self._icis[i]
                    self.send(i, ici, ts_for(ici) if ts_for else None)
            return self._answers
        finally:
            self._filter(accept=False)

    def ask(self, icis: list[ICI], *, timeout: float = 0.03, retries: int = 5,
            ts_for=None) -> dict[int, Answer]:
        """Probe every peer; return {index in icis: Answer} for those that answered.

        Call it where the answers arrive (the host that holds the virtual IP), with the
        tuples isolated there. ``ts_for(ici)`` gives the timestamp value to send.
        """
        self.begin()
        for i, ici in enumerate(icis):
            self.send(i, ici, ts_for(ici) if ts_for else None)
        return self.collect(timeout=timeout, retries=retries, ts_for=ts_for)

    def _collect(self) -> None:
        """Read what arrived.

        Any packet the peer sent after our question carries its current ack: the answer
        to the question is a pure ACK, or data with the ACK piggybacked when our question
        opened the peer's window. Acks only grow, and nothing can advance the peer's
        rcv_nxt while the endpoint is isolated, so the largest ack seen (in 32-bit serial
        order) after the question is L.
        """
        while True:
            try:
                packet, addr = self.rx.recvfrom(65535)
            except BlockingIOError:
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            fields = parse(packet)
            if fields is None:
                continue
            src, sport, dst, dport, seq, ack, flags, window, _payload = fields
            i = self._want.get((src, sport, dst, dport))
            if i is None or not flags & TH_ACK or flags & (TH_RST | TH_SYN):
                continue
            old = self._seen.get(i)
            if old is not None:
                ack, seq = _serial_max(ack, old.acked), _serial_max(seq, old.peer_seq)
            self._seen[i] = Answer(acked=ack, peer_seq=seq, window=window)
            self._answered.add(i)

    @property
    def _answers(self) -> dict[int, Answer]:
        return {i: self._seen[i] for i in self._answered}


def _serial_max(a: int, b: int) -> int:
    return a if ((a - b) & 0xFFFFFFFF) < 1 << 31 else b
