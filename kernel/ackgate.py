"""The ACK gate: the host never acknowledges input beyond the application's commit offset.

Why: the kernel acknowledges bytes when they arrive. If the application consumed them
but had not yet committed its state to a checkpoint when the host crashed, they are lost
for good: the peer saw them acknowledged and dropped them from its send queue. With the
gate, the peer keeps every byte past the commit offset and sends it again to whoever
resurrects the connection (DESIGN.md, the exactly-once contract).

Pieces:

- ``kernel/ackgate.bpf.c``: tc clsact egress program (clamps ack_seq, widens the window,
  strips SACK above the commit offset, drops FIN/RST unless released, fixes checksums).
- Two hash maps keyed by the 36-byte 4-tuple: ``ackgate_conns`` (commit offset, window
  scale, flags: written by the agent, one BPF_MAP_UPDATE_ELEM per commit) and
  ``ackgate_stats`` (counters and what the program saw: written by the program). Their
  rows as plain data: kernel/gaterows.py.
- :class:`Gate` (one per host, i.e. network namespace): loads the program with our own
  map fds (kernel/bpfobj.py), attaches it to interfaces through pyroute2, finds and
  replaces a program a crashed agent left behind, and sends the pure ACK that must follow
  every commit (without it a stalled peer waits for its retransmission timer: throughput
  collapses to under 1 MB/s, DESIGN.md).
- :class:`Guard`: the handle of one guarded connection, holding a prepared syscall block so
  a commit costs one ``bpf()`` call plus one raw ``sendto()``.

Nothing is pinned: the maps live as long as an fd (ours) or an attached program refers to
them, so detaching and closing removes everything. A crashed agent leaves its program
attached and enforcing its last commits; the next :meth:`Gate.open` finds it by its tc
filter name and swaps in a fresh program atomically (tc replace), keeping the old maps'
entries when their layout matches (``adopt``), so no guarded connection is ever unguarded
in between.

Everything acts in the network namespace of the calling thread (as kernel.netns
explains); tests enter the host's namespace around :meth:`Gate.open`.

What the application must know (docs/ackgate.md):

- Never wait for input while holding uncommitted input. The peer can have only so much
  unacknowledged (its congestion window, its send buffer); once that is consumed and not
  committed, no more input comes until a commit. Commit on a timer, not per message.
- Input the kernel received before :meth:`Gate.guard_socket` was already acknowledged:
  guard at accept, before the protocol lets the peer send (a greeting), or accept that
  those first bytes are not protected.
- The peer's FIN takes one sequence number: commit ``total + 1`` after reading EOF; at
  the end, :meth:`Guard.remove` the connection.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import bpf, bpfobj, repair
from . import constants as C
from .errors import KernelError, TcpcpError
from .gaterows import (CONN, KEY_SIZE, SEEN_ACK, SEEN_TS, STATS, ZERO_STATS, Entry, Stats,
                       Tuple4, fmt, key_of, normalize, rewind_receive, tuple_of)
from .tcpseg import GUARDED, KEEP_SACK, RELEASED, ones_sum, pseudo_sum, seq_after, widened_window

__all__ = ["Gate", "Guard", "GateError", "GateFull", "Entry", "Stats", "build", "program",
           "leftovers", "key_of", "normalize", "tuple_of", "rewind_receive"]

SOURCE = Path(__file__).with_name("ackgate.bpf.c")
OBJECT = SOURCE.with_name("ackgate.bpf.o")
SECTION = "tc"
NAME = "tcpcp_ackgate"           # program name and tc filter name: how leftovers are found
MAP_CONNS, MAP_STATS = "ackgate_conns", "ackgate_stats"
DEFAULT_MAX_ENTRIES = 65536

TC_EGRESS = 0xFFFFFFF3           # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
TC_INGRESS = 0xFFFFFFF2
TC_PRIO = 0xAC                   # our filter's preference on egress
TC_HANDLE = 1
ETH_P_ALL = 0x0003
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772  # the program expects an Ethernet header



class GateError(KernelError):
    """A gate operation failed; ``errno`` says why, ``step`` what was being done."""


class GateFull(GateError):
    """The connection table is full: this connection is NOT protected (its ACKs go out
    unclamped). ``tuple`` names it; nothing is dropped because of it."""

    def __init__(self, tup: Tuple4, capacity: int):
        super().__init__("guard", errno.E2BIG,
                         f"ACK gate table full ({capacity} connections): {fmt(tup)} is "
                         "NOT protected; raise max_entries or remove finished connections")
        self.tuple = tup


# --- building the object ---------------------------------------------------------------

def build(force: bool = False, source: Path = SOURCE, output: Path = OBJECT) -> Path:
    """Compile the program if the object is missing or older than its source.

    Written to a temporary file and renamed, so a concurrent build or load never sees
    half an object. If the package directory is read-only the object goes to a cache
    directory instead.
    """
    if not force and output.exists() and output.stat().st_mtime >= source.stat().st_mtime:
        return output
    clang = shutil.which("clang")
    if clang is None:
        raise GateError("compile", errno.ENOENT, "clang not found: install clang and "
                        "libbpf-dev (scripts/setup does)")
    multiarch = f"/usr/include/{platform.machine()}-linux-gnu"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ackgate-", suffix=".o", dir=output.parent)
    except PermissionError:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tcpcp"
        cache.mkdir(parents=True, exist_ok=True)
        return build(force, source, cache / output.name)
    os.close(fd)
    cmd = [clang, "-O2", "-g", "-target", "bpf", "-I", multiarch, "-Wall", "-c",
           str(source), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):  # clang removes it on failure
            os.unlink(tmp)
        raise GateError("compile", errno.EINVAL, f"{' '.join(cmd)}: {done.stderr.strip()}")
    os.replace(tmp, output)
    return output


def program(obj: Path | None = None) -> bpfobj.Program:
    """The parsed program, compiled first when needed; its maps checked against ours."""
    path = obj if obj is not None else build()
    prog = bpfobj.load(path.read_bytes(), SECTION)
    want = {MAP_CONNS: (KEY_SIZE, CONN.size), MAP_STATS: (KEY_SIZE, STATS.size)}
    for name, (ksize, vsize) in want.items():
        spec = prog.maps.get(name)
        if spec is None or (spec.key_size, spec.value_size) != (ksize, vsize) \
                or spec.type != bpf.BPF_MAP_TYPE_HASH:
            raise GateError("load", errno.EINVAL, f"{path}: map {name} is {spec}, this "
                            f"code expects a hash of key {ksize}, value {vsize} bytes")
    return prog


# --- tc --------------------------------------------------------------------------------

def leftovers(ifname: str) -> list[dict]:
    """Our filters on ``ifname``'s egress in this namespace: pref, handle, program id.

    Read from ``tc -j`` because pyroute2 0.9 does not decode TCA_BPF_ID.
    """
    done = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, "egress"],
                          capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    found = []
    for f in json.loads(done.stdout):
        opts = f.get("options") or {}
        if opts.get("bpf_name") == NAME and "prog" in opts:
            found.append({"pref": f["pref"], "handle": int(str(opts.get("handle", "0")), 0),
                          "prog_id": opts["prog"]["id"]})
    return found


def _index(ipr: IPRoute, ifname: str) -> int:
    links = ipr.link_lookup(ifname=ifname)
    if not links:
        raise GateError("attach", errno.ENODEV, f"no interface {ifname!r} in this namespace")
    link = ipr.link("get", index=links[0])[0]
    if link["ifi_type"] not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        raise GateError("attach", errno.EOPNOTSUPP, f"{ifname} has link type "
                        f"{link['ifi_type']}: the program expects an Ethernet header")
    return links[0]


def _netlink(step: str, e: NetlinkError) -> GateError:
    return GateError(step, e.code, "tc")


# --- the gate ----------------------------------------------------------------------------

class Gate:
    """The ACK gate of one host: one program and its maps, attached to some interfaces."""

    def __init__(self, prog_fd: int, conns: bpf.Map, stats: bpf.Map, adopted: list[Entry]):
        self.prog_fd = prog_fd
        self.conns, self.stats = conns, stats
        self.adopted = adopted          # entries inherited from a crashed agent's program
        self.attached: dict[str, bool] = {}  # ifname -> clsact created by us
        self._raw: dict[int, socket.socket] = {}

    @classmethod
    def open(cls, ifnames: Iterable[str] = ("eth0",), *, max_entries: int = DEFAULT_MAX_ENTRIES,
             adopt: bool = True, obj: Path | None = None) -> "Gate":
        """Load the gate and attach it to ``ifnames`` in the calling thread's namespace.

        A program a previous agent left on one of these interfaces is replaced in place;
        with ``adopt`` its connection table is kept (when its layout matches), so the
        connections it guarded stay guarded across the restart.
        """
        ifnames = list(ifnames)
        prog = program(obj)
        conns = stats = None
        adopted: list[Entry] = []
        if adopt:
            for ifname in ifnames:
                for left in leftovers(ifname):
                    maps = _adoptable(left["prog_id"])
                    if maps:
                        conns, stats = maps
                        break
                if conns:
                    break
        if conns is None:
            conns = bpf.Map.create(MAP_CONNS, bpf.BPF_MAP_TYPE_HASH, KEY_SIZE, CONN.size,
                                   max_entries)
            stats = bpf.Map.create(MAP_STATS, bpf.BPF_MAP_TYPE_HASH, KEY_SIZE, STATS.size,
                                   max_entries)
        else:
            adopted = [_entry(k, v) for k, v in conns.items().items()]
        try:
            prog_fd = bpf.prog_load(prog.patched({MAP_CONNS: conns.fd, MAP_STATS: stats.fd}),
                                    name=NAME, license=prog.license)
        except BaseException:
            conns.close()
            stats.close()
            raise
        gate = cls(prog_fd, conns, stats, adopted)
        try:
            for ifname in ifnames:
                gate.attach(ifname)
            gate._open_raw()
        except BaseException:
            gate.close()
            raise
        return gate

    # -- interfaces ------------------------------------------------------------------
    def attach(self, ifname: str) -> None:
        """Put the program on ``ifname``'s egress, replacing any leftover of ours.

        ``tc replace`` at our preference and handle swaps the program atomically: there
        is no moment without a gate. Leftovers at other positions go after ours is in.
        """
        with IPRoute() as ipr:
            index = _index(ipr, ifname)
            created = False
            try:
                ipr.tc("add", "clsact", index)
                created = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _netlink(f"add clsact on {ifname}", e) from None
            old = leftovers(ifname)
            try:
                ipr.tc("replace-filter", "bpf", index, handle=TC_HANDLE, fd=self.prog_fd,
                       name=NAME, parent=TC_EGRESS, prio=TC_PRIO, classid=1,
                       direct_action=True, protocol=ETH_P_ALL)
            except NetlinkError as e:
                raise _netlink(f"attach to {ifname} egress", e) from None
            for left in old:
                if (left["pref"], left["handle"]) != (TC_PRIO, TC_HANDLE):
                    _del_filter(ipr, index, left["pref"], left["handle"])
        # A leftover of ours means a previous agent of ours set the qdisc up: its
        # clean-up is ours now.
        self.attached[ifname] = created or bool(old) or self.attached.get(ifname, False)

    def detach(self, ifname: str) -> None:
        """Take the program off ``ifname``; the clsact qdisc goes too if we added it and
        nothing else uses it."""
        created = self.attached.pop(ifname, False)
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                return
            _del_filter(ipr, links[0], TC_PRIO, TC_HANDLE)
            if created and not any(ipr.get_filters(index=links[0], parent=p)
                                   for p in (TC_EGRESS, TC_INGRESS)):
                try:
                    ipr.tc("del", "clsact", links[0])
                except NetlinkError:
                    pass

    def close(self, detach: bool = True) -> None:
        """Detach everywhere (unless ``detach`` is False: then the program keeps
        enforcing the last commits after we are gone, as after a crash) and free
        everything we hold."""
        if detach:
            for ifname in list(self.attached):
                self.detach(ifname)
        for sock in self._raw.values():
            sock.close()
        self._raw.clear()
        self.conns.close()
        self.stats.close()
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connections -------------------------------------------------------------------
    def guard(self, tup: Tuple4, commit_seq: int, rcv_wscale: int, *,
              released: bool = False, keep_sack: bool = False) -> "Guard":
        """Start guarding a connection: from now on the peer sees no ACK beyond
        ``commit_seq``, and no FIN or RST (unless ``released``). ``keep_sack``: SACK
        blocks pass until :meth:`Guard.keep_sack` turns it off (Guard.keep_sack says why).

        ``rcv_wscale`` is this host's receive window scale for the connection (TCP_INFO
        ``tcpi_rcv_wscale``): the program needs it to widen windows correctly. Raises
        :class:`GateFull` when the table is full; the connection is then unprotected.
        """
        tup = normalize(tup)
        if not 0 <= rcv_wscale <= 14:
            raise ValueError(f"window scale {rcv_wscale} out of range 0..14")
        key = key_of(tup)
        flags = GUARDED | (RELEASED if released else 0) | (KEEP_SACK if keep_sack else 0)
        fresh_stats = False
        try:
            self.stats.update(key, ZERO_STATS, bpf.BPF_NOEXIST)
            fresh_stats = True
        except bpf.BpfError as e:
            if e.errno == errno.E2BIG:
                raise GateFull(tup, self.stats.max_entries) from None
            if e.errno != errno.EEXIST:
                raise
        try:
            self.conns.update(key, CONN.pack(commit_seq & 0xFFFFFFFF, rcv_wscale, flags, 0))
        except bpf.BpfError as e:
            if fresh_stats:
                self.stats.delete(key)
            if e.errno == errno.E2BIG:
                raise GateFull(tup, self.conns.max_entries) from None
            raise
        return Guard(self, tup, key, commit_seq & 0xFFFFFFFF, rcv_wscale, flags)

    def guard_socket(self, sock: socket.socket, *, read_offset: int = 0,
                     released: bool = False) -> "Guard":
        """Guard a connected socket at the application's read position.

        The commit offset starts at copied_seq (nothing the application has not read is
        committed) and stream offsets count from ``read_offset`` there: ``Guard.commit_at``
        then takes the offsets the application thinks in. copied_seq is read in repair
        mode, so call this where the application is not using the socket (right after
        accept). Bytes the kernel received before this call were already acknowledged;
        guard before the peer sends, or accept that they are not protected.
        """
        tup = _socket_tuple(sock)
        wscale = _rcv_wscale(sock)
        copied = _copied_seq(sock)
        guard = self.guard(tup, copied, wscale, released=released)
        guard.base_seq = (copied - read_offset) & 0xFFFFFFFF
        return guard

    def get(self, tup: Tuple4) -> "Guard | None":
        """A handle on a connection already in the table (adopted after a restart)."""
        tup = normalize(tup)
        raw = self.conns.lookup(key_of(tup))
        if raw is None:
            return None
        e = _entry(key_of(tup), raw)
        return Guard(self, tup, key_of(tup), e.commit_seq, e.rcv_wscale, e.flags)

    def entries(self) -> dict[Tuple4, tuple[Entry, Stats | None]]:
        out = {}
        for key, raw in self.conns.items().items():
            st = self.stats.lookup(key)
            out[tuple_of(key)] = (_entry(key, raw), Stats.decode(st) if st else None)
        return out

    # -- the pure ACK after a commit -----------------------------------------------------
    def _open_raw(self) -> None:
        """Raw sockets for the pure ACKs, made now: a socket belongs to the namespace of
        the thread that creates it, so later sends work from any thread."""
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                self._raw[family] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except OSError as e:
                if family == socket.AF_INET or e.errno not in (errno.EAFNOSUPPORT,):
                    raise GateError("raw socket", e.errno or errno.EIO,
                                    "the pure ACK after a commit needs CAP_NET_RAW") from None

    def _send(self, family: int, packet: bytes, dst) -> None:
        sock = self._raw.get(family)
        if sock is None:
            raise GateError("send ACK", errno.EAFNOSUPPORT, "no raw socket for this family")
        sock.sendto(packet, dst)


def _adoptable(prog_id: int) -> tuple[bpf.Map, bpf.Map] | None:
    """The maps of a leftover program, if they are ours and laid out as we expect."""
    try:
        fd = bpf.prog_fd_by_id(prog_id)
    except bpf.BpfError:
        return None
    try:
        desc = bpf.prog_info(fd)
    finally:
        os.close(fd)
    found = {}
    for map_id in desc.map_ids:
        try:
            m = bpf.Map.from_id(map_id)
        except bpf.BpfError:
            continue
        want = {MAP_CONNS: CONN.size, MAP_STATS: STATS.size}.get(m.name)
        info = m.info()
        if want and info.type == bpf.BPF_MAP_TYPE_HASH and m.key_size == KEY_SIZE \
                and m.value_size == want and m.name not in found:
            found[m.name] = m
        else:
            m.close()
    if set(found) == {MAP_CONNS, MAP_STATS}:
        return found[MAP_CONNS], found[MAP_STATS]
    for m in found.values():
        m.close()
    return None


def _del_filter(ipr: IPRoute, index: int, pref: int, handle: int) -> None:
    try:
        ipr.tc("del-filter", "bpf", index, handle=handle, parent=TC_EGRESS, prio=pref,
               protocol=ETH_P_ALL)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL):
            raise _netlink("detach", e) from None


def _entry(key: bytes, raw: bytes) -> Entry:
    commit, ws, flags, _ = CONN.unpack_from(raw)
    return Entry(tuple_of(key), commit, ws, flags)


class Guard:
    """One guarded connection. A commit is one bpf() syscall on a prepared block, then
    one pure ACK carrying the new offset.

    Not thread-safe per handle (one application thread commits a connection); different
    handles may be used from different threads.
    """

    def __init__(self, gate: Gate, tup: Tuple4, key: bytes, commit_seq: int, rcv_wscale: int,
                 flags: int):
        self.gate, self.tuple, self.key = gate, tup, key
        self._lock = threading.Lock()   # commit_seq and flags are written together
        self.commit_seq, self.rcv_wscale, self.flags = commit_seq, rcv_wscale, flags
        self.base_seq: int | None = None  # sequence number of stream offset 0, if known
        # BPF_EXIST: a commit never re-creates a connection someone removed meanwhile.
        self._update, self._ubuf = gate.conns.prepared(key, bpf.BPF_EXIST)
        self._lookup, self._lbuf = gate.stats.prepared(key)
        laddr, lport, raddr, rport = tup
        src, dst = ipaddress.ip_address(laddr), ipaddress.ip_address(raddr)
        self._family = socket.AF_INET if src.version == 4 else socket.AF_INET6
        self._dst = (str(dst), 0) if src.version == 4 else (str(dst), 0, 0, 0)
        self._ports = (lport, rport)
        self._pseudo = {n: pseudo_sum(src.packed, dst.packed, n) for n in (20, 32)}
        self._ip = {n: _ip_header(src, dst, n) for n in (20, 32)}

    # -- commits -------------------------------------------------------------------
    def commit(self, seq: int, *, ack: bool = True) -> bool:
        """Raise the commit offset to sequence number ``seq``; False if it is not higher.

        The caller promises that the application state up to ``seq`` is durable, and that
        ``seq`` is not beyond what the application has read. With ``ack`` a pure ACK
        carrying the new offset leaves at once; without it the peer learns the offset
        only with the kernel's next ACK, which a peer whose window is full never causes.
        """
        seq &= 0xFFFFFFFF
        with self._lock:
            if not seq_after(seq, self.commit_seq):
                return False
            self._write(seq, self.flags)
            self.commit_seq = seq
        if ack:
            self.send_ack()
        return True

    def commit_at(self, offset: int, *, ack: bool = True) -> bool:
        """:meth:`commit` by stream offset (needs ``base_seq``: see Gate.guard_socket).

        The peer's FIN takes one sequence number after the last byte: an application
        that has read EOF (and committed that fact) commits ``total + 1``, or the peer's
        FIN stays unacknowledged. At the end of a connection, :meth:`remove` it.
        """
        if self.base_seq is None:
            raise TcpcpError(f"{fmt(self.tuple)}: stream offsets need base_seq")
        return self.commit((self.base_seq + offset) & 0xFFFFFFFF, ack=ack)

    def offset_of(self, seq: int) -> int:
        if self.base_seq is None:
            raise TcpcpError(f"{fmt(self.tuple)}: stream offsets need base_seq")
        return (seq - self.base_seq) & 0xFFFFFFFF

    def release(self) -> None:
        """Let FIN and RST through: the application is closing on purpose. ACKs stay
        clamped (input may still arrive after our FIN and must be committed); once the
        application is done with the connection, :meth:`remove` it."""
        with self._lock:
            self._write(self.commit_seq, self.flags | RELEASED)
            self.flags |= RELEASED

    def keep_sack(self, on: bool) -> None:
        """Let SACK blocks pass (``on``), or strip those above the commit again.

        Stripping them is the rule (docs/ackgate.md): a block above a clamped ACK makes
        the peer resend what was received but not committed, and after a crash SACKed
        ranges wait for the peer to detect reneging. A just-passed endpoint is the
        exception: segments the isolated (or dead) origin dropped leave holes, and
        without SACK the peer finds out only from its retransmission timer, re-armed by
        every commit's ACK (request/response pauses of a second and more were measured).
        A switchover and a resurrection keep SACK on for their first second only
        (``keep_sack_for``).
        """
        with self._lock:
            flags = (self.flags | KEEP_SACK) if on else (self.flags & ~KEEP_SACK)
            self._write(self.commit_seq, flags)
            self.flags = flags

    def remove(self) -> Stats | None:
        """Stop guarding; the last counters are returned."""
        st = self.stats()
        self.gate.conns.delete(self.key)
        self.gate.stats.delete(self.key)
        return st

    def _write(self, seq: int, flags: int) -> None:
        CONN.pack_into(self._ubuf, KEY_SIZE, seq, self.rcv_wscale, flags, 0)
        try:
            bpf.call(bpf.BPF_MAP_UPDATE_ELEM, self._update, "commit")
        except bpf.BpfError as e:
            if e.errno == errno.ENOENT:
                raise GateError("commit", e.errno, f"{fmt(self.tuple)} is not guarded "
                                "(removed?)") from None
            raise

    def stats(self) -> Stats | None:
        try:
            bpf.call(bpf.BPF_MAP_LOOKUP_ELEM, self._lookup, "stats")
        except bpf.BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return Stats.decode(self._lbuf.raw[KEY_SIZE:])

    # -- the pure ACK ------------------------------------------------------------------
    def send_ack(self) -> bool:
        """Send a pure ACK carrying the commit offset, as the kernel would have.

        Its sequence number is the highest the program saw us send (the peer accepts it:
        it cannot have received more), its window puts the right edge where the kernel
        last put it, its timestamps are the newest we sent (PAWS). Without anything seen
        yet, or when the kernel's right edge is not past the offset, nothing is sent: the
        kernel's own next ACK, clamped, carries the offset then. Returns whether it sent.
        """
        st = self.stats()
        if st is None or not st.seen & SEEN_ACK:
            return False
        window = widened_window(st.right_edge, self.commit_seq, self.rcv_wscale)
        if window == 0:
            return False
        if st.seen & SEEN_TS:
            opts = struct.pack("!BBBBII", 1, 1, 8, 10, st.ts_val, st.ts_ecr)
        else:
            opts = b""
        n = 20 + len(opts)
        tcp = struct.pack("!HHIIBBHHH", self._ports[0], self._ports[1], st.snd_end,
                          self.commit_seq, (n // 4) << 4, 0x10, window, 0, 0) + opts
        csum = ~ones_sum(tcp, self._pseudo[n]) & 0xFFFF
        tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
        try:
            self.gate._send(self._family, self._ip[n] + tcp, self._dst)
        except OSError as e:
            raise GateError("send ACK", e.errno or errno.EIO, fmt(self.tuple)) from None
        return True


def _ip_header(src, dst, tcp_len: int) -> bytes:
    """IP header for a raw IPPROTO_RAW send. IPv4: the kernel fills in the checksum and
    the id (raw(7)); IPv6: complete as given."""
    if src.version == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 0, 0x4000, 64, 6, 0,
                           src.packed, dst.packed)
    return struct.pack("!IHBB16s16s", 6 << 28, tcp_len, 6, 64, src.packed, dst.packed)


# --- reading a socket ----------------------------------------------------------------------

def _socket_tuple(sock: socket.socket) -> Tuple4:
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError as e:
        raise GateError("guard", e.errno or errno.ENOTCONN, "not a connected socket") from None
    return normalize((local[0], local[1], remote[0], remote[1]))


def _rcv_wscale(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, C.TCP_INFO, 8)
    if not info[5] & C.TCPI_OPT_WSCALE:
        return 0
    return info[6] >> 4  # tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4


def _copied_seq(sock: socket.socket, attempts: int = 16) -> int:
    """copied_seq = rcv_nxt - SIOCINQ, rcv_nxt read in repair mode (left without probe).

    A socket in repair mode still takes in segments, so rcv_nxt and SIOCINQ are read
    as rcv_nxt, SIOCINQ, rcv_nxt until both rcv_nxt readings agree: data arriving
    between two separate reads would otherwise be subtracted twice, the commit offset
    would lag the application's position forever, and a resurrection would replay
    bytes the application had already consumed (seen under load: 15 segments).
    """
    repair.repair_on(sock)
    try:
        for _ in range(attempts):
            before = repair._queue_seq(sock, C.TCP_RECV_QUEUE, "recv")
            inq = repair._ioctl(sock, C.SIOCINQ, "SIOCINQ")
            after = repair._queue_seq(sock, C.TCP_RECV_QUEUE, "recv")
            if before == after:
                break
        else:
            raise GateError("guard", errno.EAGAIN, f"data kept arriving during {attempts} "
                            "reads of copied_seq")
        repair._setint(sock, socket.IPPROTO_TCP, C.TCP_REPAIR_QUEUE, C.TCP_NO_QUEUE,
                       "TCP_REPAIR_QUEUE none")
    finally:
        repair.repair_off(sock, window_probe=False)
    return (before - inq) & 0xFFFFFFFF


def keep_sack_for(guards: list, seconds: float) -> None:
    """Guards made with ``keep_sack``: back to stripping SACK after ``seconds``, in a
    timer thread. A guard removed meanwhile (its connection ended) is skipped."""
    def stop():
        for guard in guards:
            try:
                guard.keep_sack(False)
            except (OSError, TcpcpError):
                pass
    if guards:
        timer = threading.Timer(seconds, stop)
        timer.daemon = True
        timer.start()
