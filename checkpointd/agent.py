"""checkpointd: the agent on each host of an HA pair. Thin I/O around pure decisions.

Three loops, each in its own thread:

- **apps** (``_serve_apps``): applications connect over a Unix SOCK_SEQPACKET socket
  (checkpointd/protocol.py). ``register`` hands over a socket; the agent dumps it once
  (repair mode, while the application waits), starts guarding it with the ACK gate and
  answers ``registered``. ``commit`` queues the application's state and offsets.
- **committer** (``_commit_loop``): every ``commit_interval`` it seals the newest commit of
  every connection (checkpointd/conns.py builds the record's ICI) and writes them to etcd
  in fenced transactions (only while this host holds the leader lease); once durable it
  raises each connection's ACK gate (one bpf() call and a pure ACK) and answers
  ``durable``. The peer is never acknowledged beyond what etcd holds.
- **HA** (``run``): observes etcd (lease renewals, the leader key), calls
  ``decide.RoleMachine.observe`` and performs the actions it returns, in order, logging
  the reason sentence (Patroni's style). Resurrection is resurrect/core.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field

from kernel import ackgate, repair, vip
from kernel.errors import TcpcpError
from kernel.isolate import Isolation, tuple_of

from . import decide, protocol, switchover
from .config import Config
from .conns import Registration, checkpoint_ici
from .store import record as records
from .store.base import CheckpointStore, Lease
from .store.base import history_value, parse_control_value
from .store.errors import NotLeader, StoreError
from .store.keyring import Keyring
from .store.layout import Layout

log = logging.getLogger("checkpointd")

_TCP_INFO = 11
_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received at offset 120
BATCH = 100                    # records per etcd transaction (etcd allows 128 operations)


def tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """(bytes acknowledged by the peer, bytes received): counters that need no repair mode."""
    return _BYTES.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 136), 120)


def tcp_timestamp(sock: socket.socket) -> int:
    return struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, 24, 4))[0]


class UnknownConnection(KeyError):
    """A request names a connection this agent does not hold (any more)."""


@dataclass
class Commit:
    seq: int
    input: int
    output: int
    read: int
    write: int
    state: bytes
    unacked: bytes
    queued: float = 0.0    # monotonic time the application's commit arrived (metrics)


@dataclass
class Conn:
    """One protected connection on this host."""

    key: str
    sock: socket.socket            # the agent's own descriptor of the endpoint
    app: socket.socket | None      # the application's channel, for replies
    reg: Registration
    guard: ackgate.Guard | None
    pending: Commit | None = None
    durable_seq: int = -1
    durable_input: int = 0
    last_written: float = 0.0
    state: bytes = b""             # newest durable application state
    last_commit: "Commit | None" = None  # newest durable commit (periodic re-checkpoints)
    owed_durable: int = 0          # a "durable" answer the application's channel had no room for
    exposed: bool = False          # the ACK gate was released (fail-safe): the kernel acks freely
    protected_from: int = 0        # records are safe only from this input offset on
    stale_record: bool = False     # a record from before the release may still be in etcd
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tuple(self):
        return tuple_of(self.reg.ici)


class Agent:
    def __init__(self, config: Config, store: CheckpointStore, keyring: Keyring, *,
                 gate: ackgate.Gate | None = None, isolation: Isolation | None = None,
                 clock=time.monotonic, wall=time.time_ns, metrics=None):
        self.config, self.store, self.keyring = config, store, keyring
        self.layout = Layout(config.cluster_name)
        self.gate = gate
        self.metrics = metrics        # checkpointd.metrics.AgentMetrics, or None
        self.isolation = isolation or Isolation()
        self.clock, self.wall = clock, wall
        self.machine = decide.RoleMachine(config, clock=clock)
        self.lease: Lease | None = None
        self.conns: dict[str, Conn] = {}
        self.apps: dict[int, socket.socket] = {}     # local port -> application channel
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.poked = threading.Event()    # look at etcd now (a partner released the key)
        self.fenced = False
        self.events: list[tuple[float, str]] = []    # (monotonic time, what happened)
        self.counters = {"checkpoints": 0, "commit_batches": 0, "refused": 0,
                         "resurrected": 0, "fenced": 0}
        self._queued = False   # a commit is waiting for the committer
        self._released: set[str] = set()   # closed connections whose records must go
        self._stale_pending = False        # some records predate a released ACK gate
        self._last_role: decide.Role | None = None
        self._pending_resurrection = None        # prepared by Isolate, used by Resurrect
        # resurrected connections whose application has not connected yet, by local port
        self.unclaimed: dict[int, list] = {}
        self.last_resurrection: dict | None = None
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        # fault injection for drills (``checkpointd run --fault-point``): armed by SIGUSR1
        self.fault_point: str | None = None
        self.fault_armed = threading.Event()
        self.ha_loop_at: float | None = None  # the HA loop's last pass (/health)
        self.ha_lock = threading.Lock()       # the role machine: HA loop and the REST API
        self.etcd_down_since: float | None = None
        self.unprotected_since: float | None = None
        # epoch -> wall ns: that epoch's primary ran unprotected (told us in a fail-safe
        # request); its records written before then are stale
        self.stale_epochs: dict[int, int] = {}
        # switchover by passing (checkpointd/switchover.py): exact states the frozen
        # applications reported (origin), tuples to keep isolated until the VIP is gone
        # (origin), endpoints created for a pass (destination), nonces seen (destination)
        self.frozen: dict = {}
        self.frozen_cv = threading.Condition()
        self.passed_tuples: list = []
        self.incoming: switchover.Incoming | None = None
        self.pass_nonces: set[str] = set()
        self.last_switchover: dict | None = None
        self.renewed_at: float | None = None   # the last renewal sent (any thread)
        self._letting_go: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Agent":
        path = self.config.app_socket
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        os.chmod(path, 0o660)
        self._listener.listen(64)
        for target, name in ((self._serve_apps, "apps"), (self._commit_loop, "committer"),
                             (self.run, "ha")):
            t = threading.Thread(target=target, name=f"checkpointd-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.poked.set()
        with self.wake:
            self.wake.notify_all()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()

    def status(self) -> dict:
        """What an operator (or the drill) reads: role, epoch, counts, and the timeline."""
        st = self.machine.state
        guarded = sum(c.guard is not None for c in list(self.conns.values()))
        return {"host": self.config.host_name, "role": st.role.value, "epoch": st.epoch,
                "holder": st.holder, "connections": len(self.conns), "fenced": self.fenced,
                "unprotected": self.unprotected_since is not None,
                "etcd_reachable": self.etcd_down_since is None, "paused": st.paused,
                "counters": dict(self.counters),
                "last_resurrection": self.last_resurrection,
                "last_switchover": self.last_switchover,
                "incoming": len(self.incoming.items) if self.incoming is not None else 0,
                "events": [(round(t, 6), text) for t, text in self.events[-200:]],
                "clock": self.clock(), "wall_ns": self.wall(), "ha_loop_at": self.ha_loop_at,
                "connections_protected": guarded,
                "connections_unprotected": len(self.conns) - guarded}

    def connections(self) -> list[dict]:
        """Per connection, for ``resurrect list``: input bytes received since its last
        durable checkpoint, whether the ACK gate guards it, whether a record covers it."""
        with self.lock:
            conns = list(self.conns.values())
        out = []
        for c in conns:
            try:
                received = c.reg.received_offset(tcp_bytes(c.sock)[1])
            except OSError:
                received = c.durable_input
            out.append({"key": c.key, "bytes_since_checkpoint": max(0, received - c.durable_input),
                        "guarded": c.guard is not None,
                        "unprotected": c.exposed or c.durable_input < c.protected_from,
                        "durable_input": c.durable_input, "checkpoints_age_s":
                        round(self.clock() - c.last_written, 3) if c.last_written else None})
        return out

    def note(self, text: str) -> None:
        """One line of what happened, for logs, status and the drill's timeline."""
        self.events.append((self.clock(), text))
        log.info(text)

    # -- the HA loop -----------------------------------------------------------------------
    def run(self) -> None:
        obs: object = self._look()
        while not self.stopping.is_set():
            try:
                with self.ha_lock:
                    decision = self.machine.observe(obs)
            except decide.IllegalTransition as exc:
                log.warning("%s", exc)
                obs = self._look()
                continue
            self.ha_loop_at = self.clock()
            if self.metrics is not None:
                self.metrics.set_role(decision.new_state.role.value)
            if decision.actions or decision.new_state.role is not self._last_role:
                self.note(f"{decision.new_state.role.value}: {decision.reason}")
            self._last_role = decision.new_state.role
            follow = None
            with self._renewing(decision.actions):
                for action in decision.actions:
                    follow = self._do(action) or follow
            if follow is not None:
                obs = follow
                continue
            if isinstance(obs, decide.LeaderAcquired) and self.machine.state.role is decide.Role.PRIMARY:
                self._after_acquiring(self.machine.state.epoch, decision.reason)
            self._expire_incoming()
            wait = max(0.0, (decision.wake_at or self.clock() + self.config.renew_interval) - self.clock())
            self.poked.wait(min(wait, self.config.renew_interval))
            self.poked.clear()
            for flag in self.control_observations():
                self._observe_now(flag)
            obs = self._look()

    @contextmanager
    def _renewing(self, actions):
        """Keep the lease renewed while ``actions`` run, if they may outlast it.

        A takeover's resurrection and a switchover's pass of a thousand connections block
        the HA loop for longer than a one-second lease may go unrenewed; the new primary
        then lost its lease to a standby in the middle of resurrecting. Meanwhile this
        thread renews every renew_interval and reports each renewal to the role machine
        (a primary's fencing deadline moves with it); a failure ends it, and the loop,
        once the actions are done, observes etcd and decides as always."""
        long = (decide.Resurrect, decide.PassConnections, decide.Isolate)
        if self.lease is None or not any(isinstance(a, long) for a in actions):
            yield
            return
        stop = threading.Event()

        def renew():
            while not stop.wait(self.config.renew_interval):
                lease = self.lease
                if lease is None:
                    return
                sent = self.clock()
                try:
                    if self.store.renew(lease) <= 0:
                        return
                except StoreError:
                    return
                self.renewed_at = sent
                if self.machine.state.role is not decide.Role.PRIMARY:
                    continue   # a demoted origin only keeps the lease until it releases it
                try:
                    with self.ha_lock:
                        decision = self.machine.observe(decide.LeaseRenewed(at=sent))
                except decide.IllegalTransition:
                    return
                if decision.actions:
                    self.note(f"{decision.new_state.role.value}: {decision.reason}")
                    for action in decision.actions:
                        self._do(action)

        t = threading.Thread(target=renew, name="checkpointd-renew", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    def _observe_now(self, obs) -> None:
        """One observation outside the loop's own (an operator's request): decide, log,
        act."""
        try:
            with self.ha_lock:
                decision = self.machine.observe(obs)
        except decide.IllegalTransition as exc:
            log.warning("%s", exc)
            return
        self.note(f"{decision.new_state.role.value}: {decision.reason}")
        with self._renewing(decision.actions):
            for action in decision.actions:
                self._do(action)

    def _look(self) -> object:
        """One observation of etcd for the current role."""
        role = self.machine.state.role
        if role in (decide.Role.PRIMARY, decide.Role.FENCED) and self.lease is not None:
            sent = self.clock()
            try:
                ttl = self.store.renew(self.lease)
            except NotLeader:   # etcd answered: the lease is gone (lapsed or revoked)
                self.etcd_down_since = None
                return decide.LeaderVanished(epoch=self.machine.state.epoch)
            except StoreError:  # no answer, or an error that says nothing of the lease
                down = self._etcd_down(sent)
                if role is decide.Role.PRIMARY:
                    confirmed = self._ask_failsafe()
                    if confirmed is not None:
                        return decide.EtcdUnreachable(since=down, failsafe_at=confirmed)
                return decide.RenewFailed(last_ok=self.machine.state.last_renew or sent)
            self.etcd_down_since = None
            if ttl > 0:
                self.renewed_at = sent
                return decide.LeaseRenewed(at=sent)
            return decide.RenewFailed(last_ok=self.machine.state.last_renew or sent)
        try:
            leader = self.store.leader()
        except StoreError:
            return decide.EtcdUnreachable(since=self._etcd_down(self.clock()))
        self.etcd_down_since = None
        if leader.name is None:
            forced_until, forced_to = self._forced()
            return decide.LeaderVanished(epoch=leader.epoch or None, revision=leader.revision,
                                         forced_until=forced_until, forced_to=forced_to)
        left = None
        if role in (decide.Role.STANDBY, decide.Role.STARTING) and leader.lease_id:
            try:
                left = self.store.lease_time_left(leader.lease_id)
            except StoreError:
                left = None   # a late sweep by etcd is the fallback
        return decide.LeaderSeen(holder=leader.name, epoch=leader.epoch, revision=leader.revision,
                                 lease_id=leader.lease_id, ttl_left=left[0] if left else None,
                                 ttl_granted=left[1] if left else None)

    # -- the operator's control keys (resurrect pause/resume/switchover/failover) -------------
    def _controls(self) -> dict[str, dict]:
        """The control keys present, parsed (name -> value), in one read. Never while etcd
        is known unreachable: a read timing out would delay the renewal past the fencing
        deadline."""
        if self.etcd_down_since is not None:
            return {}
        try:
            raw = self.store.get_controls()
        except StoreError as exc:
            self._etcd_down(self.clock())
            log.debug("control keys unreadable: %s", exc)
            return {}
        out = {}
        for name, value in raw.items():
            try:
                out[name] = parse_control_value(name, value)
            except ValueError as exc:
                log.warning("control key %s ignored: %s", name, exc)
        return out

    def _forced(self) -> tuple[float | None, str | None]:
        """A ``resurrect failover`` in progress: until when its revoked holder may still
        speak (its request time + lease_ttl + clock_skew, on our monotonic clock). Read
        after the leader key was seen gone: the command writes this key before revoking."""
        req = self._controls().get("failover")
        if req is None:
            return None, None
        age = (self.wall() - req["requested_at"]) / 1e9
        until = self.clock() - age + self.config.lease_ttl + self.config.clock_skew
        return until, req.get("to")

    def control_observations(self) -> list:
        """Pause, resume and switchover requests, as observations for the role machine."""
        st = self.machine.state
        controls = self._controls()
        if self.etcd_down_since is not None:
            return []
        out: list = []
        paused = "pause" in controls
        if paused != st.paused:
            out.append(decide.Paused() if paused else decide.Resumed())
        req = controls.get("switchover")
        if req is not None and req["to"] != st.switchover_to and req["epoch"] == st.epoch:
            if st.role is not decide.Role.PRIMARY or req["from"] == self.config.host_name:
                out.append(decide.SwitchoverRequested(req["to"]))
        return out

    def _after_acquiring(self, epoch: int, reason: str) -> None:
        """The new primary consumes the requests that led here and writes the history."""
        for name in ("switchover", "failover"):
            try:
                self.store.delete_control(name)
            except StoreError:
                pass
        try:
            self.store.append_history(epoch, history_value(
                epoch=epoch, holder=self.config.host_name, acquired_at=self.wall(), reason=reason))
        except (StoreError, ValueError) as exc:
            log.warning("history of epoch %s not written: %s", epoch, exc)

    def _etcd_down(self, now: float) -> float:
        if self.metrics is not None:
            self.metrics.etcd_errors.inc()
        if self.etcd_down_since is None:
            self.etcd_down_since = now
        return self.etcd_down_since

    # -- fail-safe (Patroni's failsafe_mode) --------------------------------------------------
    def _ask_failsafe(self) -> float | None:
        """Ask every partner agent to confirm that it cannot reach etcd either; the send
        time if all confirm (each then promised not to take the leader key for lease_ttl
        after answering), else None. No partners: None, and the primary fences as usual."""
        partners = self.config.api_partners
        if not partners or not self.config.api_failsafe:
            return None
        sent = self.clock()
        body = {"holder": self.config.host_name, "epoch": self.machine.state.epoch,
                "unprotected": self.unprotected_since is not None}
        timeout = self.config.retry_timeout + 0.1   # the partner may first try etcd itself
        for partner in partners:
            try:
                answer = self._post_partner(partner, "/failsafe", body, timeout)
            except (OSError, ValueError) as exc:
                log.debug("fail-safe: %s did not confirm: %s", partner, exc)
                return None
            if not answer.get("ok"):
                log.info("fail-safe refused by %s: %s", partner, answer.get("reason"))
                return None
        return sent

    @staticmethod
    def _post_partner(partner: str, path: str, body: dict, timeout: float) -> dict:
        """POST ``body`` as JSON to a partner agent's REST API; its JSON answer."""
        url = (partner if "//" in partner else f"http://{partner}").rstrip("/") + path
        req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)

    def _poke_partners(self) -> None:
        """We released the leader key (switchover): tell the partners to look at etcd
        now rather than at their next tick. Best effort: they look within
        renew_interval anyway."""
        for partner in self.config.api_partners:
            try:
                self._post_partner(partner, "/poke", {}, 0.2)
            except (OSError, ValueError) as exc:
                log.debug("poke %s: %s", partner, exc)

    def on_poke(self, body: dict) -> dict:
        """POST /poke from a partner that released the leader key."""
        self.poked.set()
        return {"ok": True, "host": self.config.host_name}

    def on_failsafe(self, body: dict) -> dict:
        """POST /failsafe from the primary (checkpointd/api.py calls this)."""
        try:
            obs = decide.FailsafeRequested(holder=str(body["holder"]), epoch=int(body["epoch"]),
                                           unprotected=bool(body.get("unprotected", False)))
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "host": self.config.host_name, "reason": f"bad request: {exc}"}
        if self.machine.state.role in (decide.Role.STANDBY, decide.Role.STARTING) \
                and self.etcd_down_since is None:
            # our last look may predate the outage: look again, so that the answer says
            # what this host sees now (a refusal makes the primary fence)
            try:
                self.store.leader()
            except StoreError:
                with self.ha_lock:
                    self.machine.observe(decide.EtcdUnreachable(since=self._etcd_down(self.clock())))
        with self.ha_lock:
            decision = self.machine.observe(obs)
        self.note(f"{decision.new_state.role.value}: {decision.reason}")
        answer = next((a for a in decision.actions if isinstance(a, decide.AnswerFailsafe)), None)
        if answer is not None and answer.unprotected_epoch is not None:
            self.stale_epochs.setdefault(answer.unprotected_epoch, self.wall())
        return {"ok": bool(answer and answer.ok), "host": self.config.host_name,
                "reason": decision.reason}

    def on_pass(self, blob: bytes) -> dict:
        """POST /pass from the primary switching over to this host."""
        try:
            answer = switchover.accept(self, blob)
        except switchover.passwire.PassRefused as exc:
            self.note(str(exc))
            if self.metrics is not None:
                self.metrics.record_refused("pass", 1)
            return {"ok": False, "error": str(exc), "reason": exc.reason}
        self._observe_now(decide.SwitchoverRequested(target=self.config.host_name))
        return answer

    def _expire_incoming(self) -> None:
        with self.lock:
            incoming = self.incoming
            if incoming is None or self.clock() < incoming.until:
                return
            self.incoming = None
        switchover.drop_incoming(self, incoming, "the takeover did not come in time")

    def _pass(self, target: str, epoch: int) -> None:
        """Switchover: pass what can go live (checkpointd/switchover.py), the rest by a
        final checkpoint. Every connection ends up isolated either way."""
        t0 = self.clock()
        outcome = None
        try:
            if self.config.switchover_pass:
                outcome = switchover.pass_out(self, target, epoch)
        except Exception as exc:   # the by-checkpoint path below still works
            log.exception("live pass failed")
            self.note(f"switchover to {target}: live pass failed ({exc}); passing by checkpoint")
        finally:
            if not self.fenced:
                self._fence()
        passed = outcome.passed if outcome is not None else []
        if outcome is not None and outcome.error:
            self.note(f"switchover to {target}: {outcome.error}; passing by checkpoint")
        if passed:
            self._letting_go = switchover.finish_out(self, passed, target)
            self.counters["passed_out"] = self.counters.get("passed_out", 0) + len(passed)
        t_live = self.clock()
        self._pass_by_checkpoint(target)
        self.last_switchover = dict(
            target=target, epoch=epoch, passed_live=len(passed),
            asked=outcome.asked if outcome else 0, frozen=outcome.frozen if outcome else 0,
            by_checkpoint=len(self.conns), phases_ms=outcome.phases_ms if outcome else {},
            live_ms=round((t_live - t0) * 1000, 1),
            total_ms=round((self.clock() - t0) * 1000, 1), error=outcome.error if outcome else None)
        self.note(f"switchover to {target}: {len(passed)} connections passed live, "
                  f"{len(self.conns)} by checkpoint, in {(self.clock() - t0) * 1000:.1f} ms "
                  f"(phases {self.last_switchover['phases_ms']})")

    def _lift_after_let_go(self, tuples: list) -> None:
        if self._letting_go is not None:
            self._letting_go.join()
        self.isolation.release(tuples)

    def _pass_by_checkpoint(self, target: str) -> None:
        """Switchover: the connections are isolated (nothing moves); write every one's
        newest commit durably under our lease, so that the target, which takes the leader
        key as soon as we release it, resurrects them exactly where they stand."""
        t0 = self.clock()
        with self.lock:
            for c in self.conns.values():
                c.last_written = 0.0
        try:
            written = self.commit_round()
        except Exception as exc:   # the target then resurrects from the previous records
            log.exception("switchover checkpoint failed")
            self.note(f"switchover to {target}: final checkpoint failed ({exc}); the previous "
                      "checkpoints stand")
            return
        self.note(f"switchover to {target}: checkpointed {written} isolated connections in "
                  f"{(self.clock() - t0) * 1000:.1f} ms")

    def _release_gate(self, since: float) -> None:
        """Fail-safe past the grace: stop clamping ACKs. Each connection's record in etcd
        is stale from now on (the peer is acknowledged beyond it)."""
        self.unprotected_since = since
        with self.lock:
            conns = list(self.conns.values())
        for c in conns:
            if c.guard is not None:
                try:
                    c.guard.remove()
                except OSError:
                    pass
                c.guard = None
            c.exposed = True
            c.stale_record = True
        self._stale_pending = bool(conns)
        self.note(f"released the ACK gate of {len(conns)} connections: unprotected")

    def _engage_gate(self) -> None:
        """etcd answers again: clamp ACKs where the kernel has got to (it cannot take back
        what it acknowledged); a connection is protected again from its first durable
        commit at or beyond that point. Until then its stale record is deleted."""
        self.unprotected_since = None
        with self.lock:
            conns = [c for c in self.conns.values() if c.exposed]
        for c in conns:
            c.protected_from = c.reg.received_offset(tcp_bytes(c.sock)[1])
            c.guard = self._guard(c.tuple, c.reg.seq_of_read(c.protected_from), c.reg.rcv_wscale)
            c.exposed = False
        self._delete_stale()
        self.note(f"re-engaged the ACK gate of {len(conns)} connections")

    def _delete_stale(self) -> None:
        """Records from before the ACK gate was released, BATCH per fenced transaction."""
        with self.lock:
            stale = [c for c in self.conns.values() if c.stale_record and not c.exposed]
        for i in range(0, len(stale), BATCH):
            if self.lease is None:
                break
            part = stale[i:i + BATCH]
            try:
                self.store.delete_many([c.key for c in part], leader_lease=self.lease)
            except StoreError as exc:
                log.warning("%d stale records not deleted yet: %s", len(stale) - i, exc)
                break
            for c in part:
                c.stale_record = False
        with self.lock:
            self._stale_pending = any(c.stale_record for c in self.conns.values())

    def _do(self, action) -> object | None:
        """Perform one action; return an observation to feed back at once, if any."""
        if isinstance(action, decide.AcquireLeader):
            sent = self.clock()
            try:
                lease = self.store.acquire_leader(self.config.host_name, decide.granted_ttl(self.config))
            except StoreError:
                return decide.EtcdUnreachable(since=sent)
            if lease is None:
                return self._look()
            self.lease = lease
            return decide.LeaderAcquired(epoch=lease.epoch, revision=0, at=sent)
        if isinstance(action, decide.RevokeLapsedLease):
            try:
                self.store.revoke_lapsed(action.lease_id)
            except StoreError:
                pass   # etcd's own sweep ends it soon
            return self._look()
        if isinstance(action, decide.RenewLease):
            return None  # _look renews on every cycle of a primary
        if isinstance(action, decide.AnswerFailsafe):
            return None  # answered by on_failsafe
        if isinstance(action, decide.MarkUnprotected):
            self.unprotected_since = action.since
        elif isinstance(action, decide.ReleaseGate):
            self._release_gate(self.unprotected_since or self.clock())
        elif isinstance(action, decide.EngageGate):
            self._engage_gate()
        if isinstance(action, decide.FenceConnections):
            self._fence()
        elif isinstance(action, decide.UnfenceConnections):
            self._unfence()
        elif isinstance(action, decide.DropConnections):
            self._drop()
        elif isinstance(action, decide.ReleaseLeader):
            if self.lease is not None:
                try:
                    self.store.resign(self.lease)
                except StoreError:
                    pass
                self.lease = None
            self._poke_partners()
        elif isinstance(action, decide.Isolate):
            incoming = self.incoming
            if incoming is not None and incoming.pass_.epoch == action.epoch:
                self._pending_resurrection = None   # after the passed ones are active
            else:
                self._pending_resurrection = self._load(action.epoch)
        elif isinstance(action, decide.TakeVip):
            for addr in action.vips:
                vip.add_vip(None, str(addr), action.interface)
                vip.announce(None, str(addr), action.interface)
            self.note(f"took virtual IPs {', '.join(map(str, action.vips))}")
        elif isinstance(action, decide.ReleaseVip):
            for addr in action.vips:
                vip.remove_vip(None, str(addr), action.interface)
            with self.lock:
                passed, self.passed_tuples = self.passed_tuples, []
            if passed:   # the VIP is gone: nothing of these can reach this kernel now
                threading.Thread(target=self._lift_after_let_go, args=(passed,), daemon=True,
                                 name="checkpointd-lift").start()
        elif isinstance(action, decide.Resurrect):
            self._resurrect(action.epoch)
        elif isinstance(action, decide.PassConnections):
            self._pass(action.target, action.epoch)
        elif isinstance(action, decide.CheckpointAll):
            with self.lock:
                for conn in self.conns.values():
                    conn.last_written = 0.0  # rewrite under the new epoch
            with self.wake:
                self.wake.notify_all()
        return None

    # -- fencing ----------------------------------------------------------------------------
    def _fence(self) -> None:
        """Silence every guarded connection at once: no byte, no ACK, no RST leaves."""
        with self.lock:
            tuples = [c.tuple for c in self.conns.values()]
            self.fenced = True
        if tuples:
            self.isolation.isolate(tuples)
        self.counters["fenced"] += 1
        self.note(f"fenced {len(tuples)} connections")

    def _unfence(self) -> None:
        with self.lock:
            tuples = [c.tuple for c in self.conns.values()]
            self.fenced = False
        self.isolation.release(tuples)
        self.note(f"unfenced {len(tuples)} connections")

    def _drop(self) -> None:
        with self.lock:
            conns, self.conns = list(self.conns.values()), {}
        for c in conns:   # silent from here on, whenever the thread below gets to them
            try:
                repair.repair_on(c.sock)
            except (OSError, TcpcpError):
                pass

        def let_go_then_lift():   # an application slow to read must not hold the HA loop
            switchover.let_go(conns, "dropped: another host took the connection over")
            self.isolation.release([c.tuple for c in conns])
        threading.Thread(target=let_go_then_lift, name="checkpointd-drop", daemon=True).start()
        self.note(f"dropped {len(conns)} connections silently (another host owns them)")

    # -- applications ---------------------------------------------------------------------
    def _serve_apps(self) -> None:
        while not self.stopping.is_set():
            try:
                chan, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_app, args=(chan,), daemon=True,
                             name="checkpointd-app").start()

    def _serve_app(self, chan: socket.socket) -> None:
        try:
            while True:
                msg = protocol.recv(chan)
                if msg is None:
                    return
                try:
                    self._handle(chan, msg)
                except Exception as exc:  # one bad request must not take the agent down
                    if isinstance(exc, UnknownConnection):   # passed or dropped a moment ago
                        log.debug("%s", exc)
                    else:
                        log.exception("request %s failed", msg.op)
                    conn = msg.fields.get("conn", "-")
                    if msg.fd is not None:
                        os.close(msg.fd)
                    protocol.send(chan, "error", conn=conn, reason=f"{type(exc).__name__}: {exc}"[:500])
        except (OSError, protocol.ProtocolError) as exc:
            log.warning("application channel closed: %s", exc)
        finally:
            with self.lock:
                for port, c in list(self.apps.items()):
                    if c is chan:
                        del self.apps[port]
            chan.close()

    def _handle(self, chan: socket.socket, msg: protocol.Message) -> None:
        if msg.op == "serve":
            with self.lock:
                self.apps[msg["port"]] = chan
                waiting = self.unclaimed.pop(msg["port"], [])
            for item in waiting:
                self._hand_over(chan, *item)
        elif msg.op == "register":
            self._register(chan, msg)
        elif msg.op == "commit":
            self._commit(msg)
        elif msg.op == "release":
            self._release(chan, msg["conn"])
        elif msg.op in ("frozen", "frozen_many"):
            reports = ([(msg.fields, msg.payload)] if msg.op == "frozen" else
                       protocol.decode_frozen_many(msg.payload, msg["count"]))
            now = self.clock()
            with self.frozen_cv:
                for fields, state in reports:
                    self.frozen[fields["conn"]] = switchover.Frozen(state=state, at=now, **fields)
                self.frozen_cv.notify_all()
        else:
            raise protocol.ProtocolError(f"{msg.op} is not a request")

    def _register(self, chan: socket.socket, msg: protocol.Message) -> None:
        sock = socket.socket(fileno=msg.fd)
        if self.machine.state.role is decide.Role.DEMOTED:
            sock.close()
            raise RuntimeError("this host is handing its connections over (switchover): "
                               "no new connection can be protected here")
        try:
            repair.repair_on(sock)
            try:
                ici = repair.dump(sock)
            finally:
                repair.repair_off(sock, window_probe=False)
            acked, received = tcp_bytes(sock)
            reg = Registration(ici, read=msg["read"], write=msg["write"], bytes_acked=acked,
                               rcv_wscale=ici.rcv_wscale, bytes_received=received)
            guard = None if self.unprotected_since is not None else \
                self._guard(tuple_of(ici), ici.rcv_nxt, ici.rcv_wscale)
        except BaseException:
            sock.close()
            raise
        conn = Conn(msg["conn"], sock, chan, reg, guard, state=msg.payload,
                    exposed=guard is None and self.unprotected_since is not None)
        conn.pending = Commit(0, msg["input"], msg["output"], msg["read"], msg["write"], msg.payload, b"")
        with self.lock:
            self.conns[conn.key] = conn
        protocol.send(chan, "registered", conn=conn.key)
        with self.wake:
            self.wake.notify_all()

    def _guard(self, tup, commit_seq: int, wscale: int, *,
               keep_sack: bool = False) -> ackgate.Guard | None:
        """Guard from what the kernel has already acknowledged (it cannot be taken back)."""
        if self.gate is None:
            return None
        try:
            return self.gate.guard(tup, commit_seq, wscale, keep_sack=keep_sack)
        except ackgate.GateFull as exc:
            if self.metrics is not None:
                self.metrics.gate_full.inc()
            self.note(f"unprotected: {exc}")
            return None

    def _commit(self, msg: protocol.Message) -> None:
        unacked_len = msg["unacked_len"]
        payload = msg.payload
        state, unacked = (payload[:len(payload) - unacked_len], payload[len(payload) - unacked_len:]) \
            if unacked_len else (payload, b"")
        with self.lock:
            conn = self.conns.get(msg["conn"])
        if conn is None:
            raise UnknownConnection(f"{msg['conn']} is not registered (released, passed or dropped)")
        with conn.lock:
            if conn.pending is None or msg["seq"] > conn.pending.seq:
                conn.pending = Commit(msg["seq"], msg["input"], msg["output"], msg["read"],
                                      msg["write"], state, unacked, self.clock())
        with self.wake:
            self._queued = True
            self.wake.notify_all()

    def _release(self, chan: socket.socket, key: str) -> None:
        """The application closed the connection on purpose. Its record is deleted by the
        committer, after any round that sealed it before the release: deleting it here
        could let that round's write bring back a record of a closed connection, which a
        later takeover would resurrect."""
        with self.lock:
            conn = self.conns.pop(key, None)
            if conn is not None:
                self._released.add(key)
        if conn is not None:
            if conn.guard is not None:
                conn.guard.release()
                conn.guard.remove()
            conn.sock.close()
        protocol.send(chan, "released", conn=key)
        with self.wake:
            self._queued = True
            self.wake.notify_all()

    def _delete_released(self) -> None:
        """Records of released connections, BATCH per fenced transaction."""
        with self.lock:
            keys, self._released = sorted(self._released), set()
        for i in range(0, len(keys), BATCH):
            try:
                self.store.delete_many(keys[i:i + BATCH], leader_lease=self.lease)
            except StoreError as exc:
                log.warning("%d records of closed connections not deleted yet: %s", len(keys) - i, exc)
                with self.lock:
                    self._released.update(keys[i:])
                return

    # -- group commit ---------------------------------------------------------------------
    def _commit_loop(self) -> None:
        """Group commit: a round starts as soon as a commit is queued and the previous
        round is done, so whatever queued during one etcd write goes in the next one.
        ``commit_interval`` bounds the wait when nothing is queued (periodic checkpoints)."""
        while not self.stopping.is_set():
            with self.wake:
                if not self._queued:
                    self.wake.wait(self.config.commit_interval)
                self._queued = False
            if self.machine.state.role is not decide.Role.PRIMARY or self.fenced or self.lease is None:
                continue
            try:
                self.commit_round()
            except Exception:
                log.exception("commit round failed")

    def commit_round(self) -> int:
        """Seal and write every connection's newest commit; raise gates; reply ``durable``."""
        now_wall, now = self.wall(), self.clock()
        epoch = self.lease.epoch
        batch: list[tuple[Conn, Commit, str, bytes]] = []
        with self.lock:
            conns = list(self.conns.values())
        if self._stale_pending:
            self._delete_stale()
        for conn in conns:
            with conn.lock:
                c = conn.pending
                conn.pending = None
            if conn.exposed or (c.input if c else conn.durable_input) < conn.protected_from:
                # unprotected: the kernel acknowledged beyond this commit, so no record can
                # describe the connection; the application goes on as if it were durable
                if c is not None:
                    self._accept_unprotected(conn, c)
                continue
            if c is None:
                self._tell_durable(conn)
                if now - conn.last_written < self.config.checkpoint_interval:
                    continue
                c = Commit(conn.durable_seq, conn.durable_input, *self._last(conn))
            try:
                blob = self._seal(conn, c, epoch, now_wall)
            except (ValueError, OSError) as exc:
                if self.conns.get(conn.key) is conn:   # else released meanwhile: nothing to say
                    self.note(f"{conn.key}: checkpoint refused: {exc}")
                continue
            batch.append((conn, c, self.layout.conn(conn.key), blob))
        written = 0
        for i in range(0, len(batch), BATCH):
            part = batch[i:i + BATCH]
            try:
                self.store.put_many({conn.key: b for conn, _, _, b in part}, leader_lease=self.lease)
            except StoreError as exc:
                if self.metrics is not None:
                    self.metrics.etcd_errors.inc()
                for conn, c, _, _ in part:  # not durable: keep it for the next round
                    with conn.lock:
                        if conn.pending is None or conn.pending.seq < c.seq:
                            conn.pending = c
                log.warning("checkpoint batch not written: %s", exc)
                break
            self.counters["commit_batches"] += 1
            self._maybe_stop_after_write(part)
            for conn, c, _, _ in part:
                self._durable(conn, c, now)
                written += 1
        self.counters["checkpoints"] += written
        if self._released:
            self._delete_released()
        return written

    def _maybe_stop_after_write(self, part) -> None:
        """Drills only: the host dies between a checkpoint becoming durable in etcd and
        the ACK gate being raised for it (the peer never hears that its bytes are safe).
        The committer stops here for good once armed, on the first batch that carries
        new input; the drill then silences the host and kills it."""
        if self.fault_point != "after-write" or not self.fault_armed.is_set():
            return
        new = [conn.key for conn, c, _, _ in part if c.input > conn.durable_input]
        if not new:
            return
        self.note(f"fault point after-write: {len(new)} checkpoints with new input are "
                  f"durable, their ACK gates not raised (e.g. {new[0]}); committer stopped")
        threading.Event().wait()

    def _accept_unprotected(self, conn: Conn, c: Commit) -> None:
        self._settle(conn, c)
        self._tell_durable(conn)

    def _settle(self, conn: Conn, c: Commit) -> None:
        """The commit is what the connection resumes from now (durable, or accepted
        without a record while unprotected); the application is owed its answer."""
        conn.last_commit, conn.state = c, c.state
        conn.durable_seq = max(conn.durable_seq, c.seq)
        conn.durable_input = max(conn.durable_input, c.input)
        if conn.app is not None and c.seq > 0:
            conn.owed_durable = max(conn.owed_durable, c.seq)

    def _last(self, conn: Conn) -> tuple:
        """A periodic re-checkpoint with the newest durable offsets (fresh clocks)."""
        last = conn.last_commit
        if last is None:
            return (0, conn.reg.read, conn.reg.write, conn.state, b"")
        return (last.output, last.read, last.write, last.state, last.unacked)

    def _seal(self, conn: Conn, c: Commit, epoch: int, now_wall: int) -> bytes:
        acked = None
        if not c.unacked:
            acked = conn.reg.acked_offset(tcp_bytes(conn.sock)[0])
        ici, anchor = checkpoint_ici(conn.reg, input_offset=c.input, write_offset=c.write,
                                     unacked=c.unacked, acked_offset=acked,
                                     ts_val=tcp_timestamp(conn.sock), wall_ns=now_wall)
        rec = records.CheckpointRecord(
            conn_key=conn.key, ici=ici.encode(), app_state=c.state, input_offset=c.input,
            output_offset=min(c.output, anchor) if not c.unacked else c.output,
            write_offset=anchor, ts_val=ici.ts_val, wall_ns=now_wall, epoch=epoch,
            seq=max(0, c.seq), acked_input=min(conn.durable_input, c.input))
        return records.seal(rec, self.keyring, self.layout.conn(conn.key))

    def _durable(self, conn: Conn, c: Commit, now: float) -> None:
        if self.metrics is not None and c.queued:
            self.metrics.observe_commit(self.clock() - c.queued)
        conn.last_written = now
        self._settle(conn, c)   # commit inputs only grow, so durable_input becomes c.input
        if conn.guard is not None:
            try:
                if conn.guard.commit(conn.reg.seq_of_read(c.input)) and self.metrics is not None:
                    self.metrics.gate_commits.inc()
            except OSError as exc:
                if self.conns.get(conn.key) is conn:   # else released during the round
                    log.warning("%s: gate not raised: %s", conn.key, exc)
        self._tell_durable(conn)

    def _tell_durable(self, conn: Conn) -> None:
        """Tell the application, without ever waiting for it: an application that does not
        read its channel must not stall the commits of every other connection. "durable up
        to seq" is cumulative, so an answer that does not fit now is sent later, merged."""
        if conn.app is None or not conn.owed_durable:
            return
        try:
            protocol.send(conn.app, "durable", conn=conn.key, seq=conn.owed_durable,
                          flags=socket.MSG_DONTWAIT)
            conn.owed_durable = 0
        except BlockingIOError:
            pass
        except OSError:
            conn.app = None

    # -- resurrection ------------------------------------------------------------------------
    def _load(self, epoch: int):
        from resurrect import core
        return core.prepare(self, epoch)

    def _resurrect(self, epoch: int) -> None:
        from resurrect import core
        t0 = self.clock()
        everything = self.incoming is not None and not self.incoming.pass_.by_checkpoint
        passed, announced = switchover.activate(self, epoch)
        t_passed = self.clock()
        if everything and passed and self._pending_resurrection is None:
            # the origin passed every connection it had live: no record to read (the
            # passed ones get theirs under this epoch in the first commit round)
            self._pending_resurrection = core.Prepared(epoch)
        prepared = self._pending_resurrection or core.prepare(self, epoch, skip=passed)
        self._pending_resurrection = None
        self.last_resurrection = None
        core.resurrect(self, prepared)
        if announced:   # announced by the pass to come by checkpoint: resurrected or not, done
            self.isolation.release(announced)
        if passed:
            last = self.last_resurrection or dict(connections=0, failed=0, probe_ms=0.0,
                                                  restore_ms=0.0, activate_ms=0.0, at=t_passed)
            self.last_resurrection = dict(last, passed_live=len(passed),
                                          passed_activate_ms=round((t_passed - t0) * 1000, 1),
                                          passed_at=t_passed)

    def _hand_over(self, chan: socket.socket, conn: Conn, resume_fields: dict) -> None:
        """``resume_fields``: input, output, discard, and optionally ``unacked`` (bytes:
        the output the library keeps as unacknowledged, a passed send queue)."""
        fields = dict(resume_fields)
        unacked = fields.pop("unacked", b"")
        protocol.send(chan, "resume", conn.state + unacked, fd=conn.sock.fileno(), conn=conn.key,
                      unacked_len=len(unacked), **fields)
        conn.app = chan
