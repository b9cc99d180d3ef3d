"""Planned switchover by passing: the paper's Section 2 between two agents.

Origin (the primary, ``pass_out``, the ``PassConnections`` action)::

    freeze the applications          each connection stops at its next quiescent point:
                                     its last commit reflects every byte read (and, for
                                     logged output, written); the library reports that
                                     exact state (``frozen``)
    isolate every connection         one nft transaction (the fence)
    dump the frozen ones             TCP_REPAIR, receive and send queues whole; if the
                                     send queues hold more than PROBE_ABOVE bytes in
                                     all, each peer is probed while this host still
                                     holds the address (kernel/probe.py): its rcv_nxt
                                     L travels with the ICI
    POST /pass to the target         sealed (checkpointd/passwire.py); the target
                                     validates all of it and creates every endpoint in
                                     repair mode behind the ACK gate before answering
    the rest by checkpoint           connections not frozen in time (an application busy
                                     mid-message) get a final durable record instead
    tell the applications            ``passed`` (their handler stops), SHUT_RD wakes
                                     idle handlers, the endpoints are closed in repair
                                     mode: no FIN, no RST
    (then ReleaseVip, after which the isolation of the passed tuples is lifted, and
    ReleaseLeader, which pokes the target)

Destination (a standby, ``accept`` on ``POST /pass``, ``activate`` at the takeover)::

    open and check the message       key, cluster, target, epoch of the leader it
                                     follows, age, nonce, every ICI, every address a VIP
    create every endpoint            repair mode, FREEBIND (the VIP is not here yet),
                                     the send queue from L on as unsent data; guarded
                                     at once, with SACK blocks let through
    ... acquire the leader key, take the VIP (the ordinary takeover) ...
    activate, nudge, hand over       the application resumes at exactly R and W with the
                                     frozen state; its first record is written at once;
                                     after KEEP_SACK_S the gate strips SACK again

Why the gate starts at the newest durable input and not at R: the peer was never
acknowledged beyond it, and a record of R exists only once the destination's first
commit round is durable. (Until then the connection's record is the origin's, of the
origin's epoch, which the epoch rule makes a later takeover refuse: the same window as
a resurrection's between activation and adoption; docs/failover.md.) Why the send queue
goes from L (or whole, without a probe) as unsent data: restored "sent" bytes would wait
for a first retransmission timeout of one second. Why a probe only for large queues: it
costs a raw packet per connection and a wait for the answers (at 100 connections the
pass took ~190 ms with it, ~120-150 without), while resending a small queue whole costs
the peer only duplicates it drops. Why SACK: segments the isolated origin dropped leave holes, and
only SACK tells a Linux peer at once (kernel/ackgate.py, ``Guard.keep_sack``). Why the
nudge: a peer whose timer backed off while the origin was isolated.

If the target refuses or cannot be reached, every dumped endpoint leaves repair mode
where it stopped (the isolation stays: the switchover goes on) and all connections go by
checkpoint, as before this module existed: still lossless for applications whose output
is regenerable or logged. The applications stay frozen (a thawed handler would move its
state past the final checkpoint's) until the connections are dropped, which tells them
``passed``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from kernel import ackgate, nudge, probe, repair
from kernel.errors import TcpcpError
from kernel.isolate import tuple_of

from . import passwire, protocol
from .conns import Registration

PASS_TIMEOUT = 5.0          # seconds for the target to validate and create everything
KEEP_SACK_S = 1.0           # after activation, SACK blocks pass this long (Guard.keep_sack)
PROBE_WAIT_S = 0.03         # per round of waiting for the peers' answers (two rounds)
PROBE_ABOVE = 8 << 20       # send-queue bytes in all beyond which the peers are probed
TELL_FOR_S = 2.0            # how long a message to a slow application is retried


@dataclass
class Outcome:
    """What ``pass_out`` did: the keys passed live, and figures for the note."""

    passed: list = field(default_factory=list)     # Conn objects, endpoints in repair mode
    frozen: int = 0
    asked: int = 0
    phases_ms: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Frozen:
    """A connection's exact state as its library reported it when it stopped."""

    conn: str
    input: int      # the last commit's I (== read: quiescent)
    output: int     # the last commit's O (== write unless regenerable)
    read: int
    write: int
    regenerable: int
    state: bytes
    at: float = 0.0   # when the report arrived (agent's monotonic clock)


@dataclass
class Incoming:
    """Endpoints created in repair mode for a pass, waiting for the takeover."""

    pass_: passwire.Pass
    items: list                  # (PassedConn, ICI, Restored)
    until: float                 # monotonic: dropped (silently) if not activated by then
    guards: list = field(default_factory=list)   # the ACK gate's, one per item (or None)


# -- origin ----------------------------------------------------------------------------------

def partner_url(agent, target: str) -> str | None:
    """The REST API of the agent named ``target``, among ``api.partners`` (each says its
    host name on GET /status)."""
    for partner in agent.config.api_partners:
        url = (partner if "//" in partner else f"http://{partner}").rstrip("/")
        try:
            with urllib.request.urlopen(url + "/status", timeout=0.5) as r:
                if json.load(r).get("host") == target:
                    return url
        except (OSError, ValueError):
            continue
    return None


def pass_out(agent, target: str, epoch: int) -> Outcome:
    """Freeze, isolate, dump and send every connection that can go live; see the module
    docstring. Always leaves every connection isolated (fenced). Never raises for the
    target's refusal: ``Outcome.error`` says it and ``passed`` is empty."""
    out = Outcome()
    t0 = agent.clock()

    def mark(name):
        out.phases_ms[name] = round((agent.clock() - t0) * 1000, 1)

    with agent.lock:
        candidates = [c for c in agent.conns.values()
                      if c.app is not None and c.guard is not None and not c.exposed]
    with agent.frozen_cv:
        agent.frozen = {}
    _ask_freeze(agent, candidates)   # the applications stop while we find the target
    url = partner_url(agent, target)
    mark("target_found")
    if url is None:
        out.error = f"no partner in api.partners answers as {target}"
        frozen = {}
    elif candidates:
        out.asked = len(candidates)
        frozen = _wait_frozen(agent, candidates)
        mark("frozen")
        out.frozen = len(frozen)
        at = sorted(f.at for f in frozen.values())
        if at:   # how fast the applications stopped: first, median, last report
            out.phases_ms.update(frozen_first=round((at[0] - t0) * 1000, 1),
                                 frozen_median=round((at[len(at) // 2] - t0) * 1000, 1),
                                 frozen_last=round((at[-1] - t0) * 1000, 1))
    else:
        frozen = {}
    agent._fence()
    mark("isolated")
    # From here the applications stay frozen whatever happens: their connections leave
    # this host either way (live, or by the final checkpoint of the frozen state), and a
    # thawed handler would move its state past what was passed.
    if url is None or not frozen:
        return out
    dumped = []
    for c in candidates:
        msg = frozen.get(c.key)
        if msg is None:
            continue
        try:
            repair.repair_on(c.sock)
            ici = repair.dump(c.sock)
        except TcpcpError as exc:
            _quietly_off(c.sock)
            agent.note(f"{c.key}: not passed live, dump failed: {exc}")
            continue
        dumped.append((c, msg, ici))
    mark("dumped")
    answers = {}
    queued = sum(len(ici.send_queue) for _, _, ici in dumped)
    prober = _prober(agent) if queued > PROBE_ABOVE else None
    if prober is not None:
        for i, (_, _, ici) in enumerate(dumped):
            try:
                prober.send(i, ici, _ts_for(ici))
            except OSError:
                pass             # unanswered: its whole send queue is resent
        try:
            # short rounds: an unanswered peer only costs its whole send queue resent
            answers = prober.collect(timeout=PROBE_WAIT_S, retries=2, ts_for=_ts_for)
        except OSError as exc:
            agent.note(f"switchover: probing the peers failed ({exc}); the destination resends "
                       "whole send queues")
        finally:
            prober.close()
        mark("probed")
    p = passwire.Pass(
        cluster=agent.config.cluster_name, origin=agent.config.host_name, target=target,
        epoch=epoch, wall_ns=agent.wall(),
        conns=tuple(passwire.PassedConn(
            key=c.key, ici=ici.encode(), state=f.state, input=f.read, output=f.output,
            write=f.write, durable_input=min(c.durable_input, f.read),
            regenerable=bool(f.regenerable),
            peer_acked=answers[i].acked if i in answers else None)
            for i, (c, f, ici) in enumerate(dumped)),
        by_checkpoint=tuple(sorted(set(agent.conns) - {c.key for c, _, _ in dumped})))
    try:
        blob = passwire.seal(p, agent.keyring)
        mark("sealed")
        answer = _post(url + "/pass", blob, PASS_TIMEOUT)
        if not answer.get("ok"):
            raise PassFailed(answer.get("error") or "refused")
    except (OSError, ValueError, PassFailed, TcpcpError) as exc:
        out.error = f"{target} did not take the pass: {exc}"
        for c, _, _ in dumped:
            _quietly_off(c.sock)
        mark("undone")
        return out
    mark("accepted")
    out.passed = [c for c, _, _ in dumped]
    return out


def finish_out(agent, passed: list, target: str) -> "threading.Thread":
    """The target holds the passed endpoints: let go of ours. The applications hear
    ``passed`` first (their handlers are frozen, so none can read in between), then
    SHUT_RD wakes the idle ones (nothing is sent: the socket is in repair mode and TCP
    sends nothing for SHUT_RD anyway). The isolation stays until the VIP is gone."""
    keys = {c.key for c in passed}
    with agent.lock:
        for key in keys:
            agent.conns.pop(key, None)
        agent.passed_tuples.extend(c.tuple for c in passed)

    t = threading.Thread(target=let_go, args=(passed, f"passed to {target}"),
                         name="checkpointd-let-go", daemon=True)
    t.start()
    return t


def let_go(conns: list, reason: str) -> None:
    """This host no longer serves ``conns``: tell their applications (``passed``, so that
    a handler stops instead of reading an end of stream), put each endpoint in repair mode
    so that no close can send FIN or RST, wake idle handlers with SHUT_RD (TCP sends
    nothing for it), remove the ACK gate's entry, close our descriptor.

    The messages are not dropped when an application's channel is full (its handler
    would then wait frozen for good): each is retried for up to TELL_FOR_S; run this in
    a thread of its own where an application may be slow to read."""
    for c in conns:
        if c.app is not None:
            _tell(c.app, "passed", conn=c.key, reason=reason)
        try:
            repair.repair_on(c.sock)
        except (OSError, TcpcpError):
            pass
        try:
            c.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        if c.guard is not None:
            try:
                c.guard.remove()
            except OSError:
                pass
        repair.close_silently(c.sock)
    for chan in {c.app for c in conns if c.app is not None}:
        _tell(chan, "thaw")   # the freeze is over (the channel's other connections go on)


def _tell(chan, op: str, **fields) -> None:
    deadline = time.monotonic() + TELL_FOR_S
    while True:
        try:
            protocol.send(chan, op, flags=socket.MSG_DONTWAIT, **fields)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.005)
        except OSError:
            return   # the application is gone


class PassFailed(Exception):
    pass


def _prober(agent):
    """The peers' acknowledged positions are asked while this host still holds the
    address (the answers come here): the destination then resends only what they lack."""
    try:
        prober = probe.Prober(agent.config.interface)
        prober.begin()
        return prober
    except OSError as exc:
        agent.note(f"switchover: cannot probe the peers ({exc})")
        return None


def _ts_for(ici):
    """The timestamp clock the restored socket will run (never behind the probe's)."""
    return repair.advanced_timestamp(ici.ts_val, time.time_ns() - ici.dump_time_ns
                                     + repair.DEFAULT_TS_SKEW_NS)


def _ask_freeze(agent, conns: list) -> None:
    for chan in {c.app for c in conns}:
        try:
            protocol.send(chan, "freeze")
        except OSError:
            pass


def _wait_frozen(agent, conns: list) -> dict:
    """Each connection's exact state (``Frozen``), as they arrive, until
    ``switchover.freeze_timeout`` or the fencing deadline, whichever is first."""
    keys = {c.key for c in conns}
    cfg = agent.config
    deadline = agent.clock() + cfg.freeze_timeout
    with agent.frozen_cv:
        while not keys <= set(agent.frozen):
            # the connections still serve, unisolated: stop waiting well before the
            # fencing deadline of the newest renewal (the lease is renewed meanwhile)
            renewed = max(agent.renewed_at or 0.0, agent.machine.state.last_renew or 0.0)
            left = min(deadline, cfg.fence_deadline(renewed) - cfg.fence_margin) - agent.clock()
            if left <= 0:
                break
            agent.frozen_cv.wait(min(left, 0.05))
        return {k: agent.frozen[k] for k in keys if k in agent.frozen}


def _quietly_off(sock) -> None:
    try:
        repair.repair_off(sock, window_probe=True)
    except OSError:
        pass


def _post(url: str, blob: bytes, timeout: float) -> dict:
    req = urllib.request.Request(url, data=blob, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        try:
            return json.load(exc)
        except ValueError:
            raise PassFailed(f"HTTP {exc.code}") from None


# -- destination -----------------------------------------------------------------------------

def accept(agent, blob: bytes) -> dict:
    """POST /pass: check everything, then create every endpoint in repair mode. All or
    nothing; a refusal creates nothing and says why."""
    from .decide import Role

    cfg = agent.config
    with agent.ha_lock:
        st = agent.machine.state
    if st.role is not Role.STANDBY:
        raise passwire.PassRefused("target", f"this host is {st.role.value}, not a standby")
    p, icis = passwire.open_(blob, agent.keyring, cluster=cfg.cluster_name, target=cfg.host_name,
                             now_ns=agent.wall(), max_age_s=cfg.lease_ttl + cfg.clock_skew)
    if (st.holder, st.epoch) != (p.origin, p.epoch):
        raise passwire.PassRefused("epoch", (
            f"from {p.origin} in epoch {p.epoch}, but this host follows {st.holder} in "
            f"epoch {st.epoch}"))
    vips = set(cfg.vips)
    for pc, ici in zip(p.conns, icis):
        if ipaddress.ip_address(ici.local_addr) not in vips:
            raise passwire.PassRefused("target", f"{pc.key}: {ici.local_addr} is not one of network.vips")
    with agent.lock:
        if p.nonce in agent.pass_nonces:
            raise passwire.PassRefused("replay", f"nonce {p.nonce} was seen before")
        agent.pass_nonces.add(p.nonce)
        old, agent.incoming = agent.incoming, None
    if old is not None:
        drop_incoming(agent, old, "superseded by a newer pass")
    made = []
    try:
        for pc, ici in zip(p.conns, icis):
            # the send queue from the peer's rcv_nxt on (all of it if the probe went
            # unanswered) as new data, sent at activation: restored "sent" bytes would
            # wait for a first retransmission timeout of one second (no RTT sample yet)
            acked = ici.snd_una if pc.peer_acked is None else pc.peer_acked
            made.append((pc, ici, repair.restore(ici, freebind=True, validated=True,
                                                 peer_acked=acked)))
    except BaseException:
        for _, _, r in made:
            repair.close_silently(r.sock)
        raise
    incoming = Incoming(p, made, agent.clock() + 2 * cfg.lease_ttl)
    # the ACK gate before anything can reach them: a socket in repair mode already
    # receives and acknowledges (only its ACKs, clamped here, leave; it sends no data)
    incoming.guards = [agent._guard(tuple_of(ici), _held(pc, ici), ici.rcv_wscale, keep_sack=True)
                       for pc, ici, _ in made]
    with agent.lock:
        agent.incoming = incoming
    by_checkpoint = incoming_tuples(incoming)
    if by_checkpoint:   # no RST from this kernel for them once the VIP is here
        agent.isolation.isolate(by_checkpoint)
    # The address moves at the takeover, not now. Taking it now was tried: these
    # endpoints would queue what the peers send from then on, but a peer segment the
    # isolated origin dropped just before leaves a hole, the ACK gate strips the SACK
    # blocks that would tell the peer, and the peer recovers only by its retransmission
    # timer, re-armed by every commit's ACK: request/response pauses grew from ~0.3 s to
    # ~1.5 s (docs/failover.md).
    agent.note(f"pass from {p.origin} (epoch {p.epoch}): {len(made)} endpoints created in repair "
               f"mode behind the ACK gate, {len(p.by_checkpoint)} connections to come by checkpoint")
    return {"ok": True, "host": cfg.host_name, "accepted": len(made),
            "by_checkpoint": len(p.by_checkpoint)}


def drop_incoming(agent, incoming: Incoming, why: str) -> None:
    """Let the endpoints of a pass go silently, with their gate entries and isolation."""
    for _, _, r in incoming.items:
        repair.close_silently(r.sock)
    for guard in incoming.guards:
        if guard is not None:
            try:
                guard.remove()
            except OSError:
                pass
    agent.isolation.release(incoming_tuples(incoming))
    agent.note(f"dropped {len(incoming.items)} passed endpoints from {incoming.pass_.origin}: {why}")


def activate(agent, epoch: int) -> tuple[set[str], list]:
    """At the takeover (``Resurrect(epoch)``), before anything is read from etcd: guard,
    activate and hand over every endpoint passed in that epoch. Returns their keys, which
    the resurrection from records then skips, and the tuples isolated for the connections
    announced to come by checkpoint (lifted once that resurrection is done)."""
    from .agent import Commit, Conn, tcp_bytes

    with agent.lock:
        incoming, agent.incoming = agent.incoming, None
    if incoming is None:
        return set(), []
    if incoming.pass_.epoch != epoch:
        drop_incoming(agent, incoming, f"passed in epoch {incoming.pass_.epoch}, taking over {epoch}")
        return set(), []
    t0 = agent.clock()
    guards = incoming.guards
    quoted = [ici.replace(rcv_nxt=_held(pc, ici), recv_queue=b"") for pc, ici, _ in incoming.items]
    active = []
    for (pc, ici, restored), guard, quote in zip(incoming.items, guards, quoted):
        try:
            repair.activate(restored)
        except TcpcpError as exc:
            agent.note(f"{pc.key}: passed endpoint not activated: {exc}")
            if guard is not None:
                guard.remove()
            repair.close_silently(restored.sock)
            continue
        active.append((pc, ici, restored, guard, quote))
    t_active = agent.clock()
    # peers whose segments were dropped while the origin was isolated may have backed
    # off: undo as many steps as the pass can have cost (RFC 6069, kernel/nudge.py)
    nudge.nudge([q for *_, q in active],
                count=nudge.backoffs((agent.wall() - incoming.pass_.wall_ns) / 1e9))
    done = set()
    for pc, ici, restored, guard, _ in active:
        sock = restored.sock
        acked, received = tcp_bytes(sock)
        reg = Registration(ici.replace(recv_queue=b"", rcv_nxt=ici.copied_seq), read=pc.input,
                           write=pc.write, bytes_acked=acked, rcv_wscale=ici.rcv_wscale,
                           bytes_received=received)
        unacked = b"" if pc.regenerable else ici.send_queue
        conn = Conn(pc.key, sock, None, reg, guard, state=pc.state)
        conn.durable_input = pc.durable_input
        # the first record under this epoch: the passed exact state, written at once
        first = Commit(0, pc.input, pc.output, pc.input, pc.write, pc.state, unacked, agent.clock())
        conn.last_commit, conn.pending = first, first
        fields = dict(input=pc.input, output=pc.output, discard=pc.write - pc.output,
                      unacked=unacked)
        with agent.lock:
            agent.conns[conn.key] = conn
            chan = agent.apps.get(ici.local_port)
            if chan is None:
                agent.unclaimed.setdefault(ici.local_port, []).append((conn, fields))
        if chan is not None:
            agent._hand_over(chan, conn, fields)
        done.add(pc.key)
    agent.counters["passed_in"] = agent.counters.get("passed_in", 0) + len(done)
    # the peers learn of the holes the isolated origin left from our SACK blocks for a
    # moment; then the gate's rule (no SACK above the commit) applies again
    ackgate.keep_sack_for([g for *_, g, _ in active if g is not None], KEEP_SACK_S)
    agent.note(f"activated {len(active)} passed connections in {(t_active - t0) * 1000:.1f} ms, "
               f"handed them over in {(agent.clock() - t_active) * 1000:.1f} ms")
    with agent.wake:
        agent._queued = True
        agent.wake.notify_all()
    return done, incoming_tuples(incoming)


def _held(pc: passwire.PassedConn, ici) -> int:
    """The sequence number of the newest durable input: where the origin's gate held the
    peer's acknowledgement, and where ours starts."""
    return (ici.copied_seq - (pc.input - pc.durable_input)) & 0xFFFFFFFF


def incoming_tuples(incoming: Incoming) -> list:
    return [t for t in map(_tuple_of_key, incoming.pass_.by_checkpoint) if t is not None]


def _tuple_of_key(key: str):
    """``laddr:lport-raddr:rport`` (IPv6 in brackets, as ``record.conn_key`` writes
    it) as an isolation 4-tuple; None if it is not one."""
    m = _KEY.match(key)
    if m is None:
        return None
    try:
        lh, rh = (str(ipaddress.ip_address(h.strip("[]"))) for h in (m["lh"], m["rh"]))
    except ValueError:
        return None
    lp, rp = int(m["lp"]), int(m["rp"])
    if not (0 < lp < 65536 and 0 < rp < 65536):
        return None
    return (lh, lp, rh, rp)


_KEY = re.compile(r"^(?P<lh>\[[0-9A-Fa-f:.]+\]|[0-9.]+):(?P<lp>\d{1,5})-"
                  r"(?P<rh>\[[0-9A-Fa-f:.]+\]|[0-9.]+):(?P<rp>\d{1,5})$")
