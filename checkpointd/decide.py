"""The HA decisions, pure: (state, observation, now, config) -> actions and a reason.

Nothing here touches etcd, the kernel or a clock. The agent's loop observes the world
(etcd answers, operator requests, the passing of time), calls ``decide``, performs the
returned actions in order, logs the reason sentence, and sleeps until ``wake_at`` or the
next event. Tests inject ``now``. (Patroni's ha.py says what every cycle did; h11's
_state.py keeps its state machine in a table. Both are followed here.)

Rules this module keeps:

1. The role machine is the table ``TRANSITIONS[role][observation type]``: a handler and
   the roles it may lead to. docs/failover.md's diagram and table are drawn from it
   (``transition_table()``), and a test checks they agree.
2. An observation the table does not list for the current role raises
   ``IllegalTransition`` and the state is left unchanged (states are frozen; ``RoleMachine``
   keeps the old one). A handler that finds an observation inconsistent with the state
   raises the same way.
3. Every decision carries one sentence saying what was decided and why.
4. Fencing: a PRIMARY whose newest successful lease renewal was *sent* at ``last_renew``
   fences at ``config.fence_deadline(last_renew) = last_renew + lease_ttl - fence_margin``,
   whatever it observes: its connections go silent before etcd can expire the lease, so
   no standby can resurrect a connection that this host still speaks for. ``wake_at`` is
   never later than that deadline, so the loop runs in time.
5. etcd unreachable: by itself indistinguishable from a partition, so the fencing rule
   stands and the ACK gate keeps holding inbound data. The exception is fail-safe
   (Patroni's failsafe_mode): the primary asks its partner agents directly, and every
   one answers that it cannot reach etcd either and promises not to take the leader key
   for ``lease_ttl`` after answering (``FailsafeRequested`` on the standby, ``EtcdUnreachable.failsafe_at``
   on the primary). Nobody can then take over before ``failsafe_at + lease_ttl``, so that
   moment counts like a renewal and the primary keeps serving; after ``unprotected_grace``
   it releases the ACK gate and reports its connections unprotected, and re-engages the
   gate when etcd answers again.

The bounds (Section 6.1 of the paper) are pure decisions too: ``may_resurrect`` and
``needs_checkpoint``/``output_budget`` at the end of this file.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass
from typing import Callable, Union

from kernel.errors import TcpcpError

from .config import BYTES_BOUND, Config


class Role(enum.Enum):
    STARTING = "starting"      # no answer from etcd yet
    STANDBY = "standby"        # another host (or nobody) is primary; ready to take over
    PROMOTING = "promoting"    # asked etcd for the leader key; waiting for the answer
    PRIMARY = "primary"        # holds the leader key; serves and checkpoints connections
    FENCED = "fenced"          # was primary, could not renew in time: connections silent
    DEMOTED = "demoted"        # handed its connections to a switchover target


# -- observations: what the loop saw -------------------------------------------------------

@dataclass(frozen=True)
class Tick:
    """Nothing new; time has passed (the loop woke at ``wake_at``)."""


@dataclass(frozen=True)
class LeaseRenewed:
    """A lease keepalive *sent* at ``at`` was answered with a positive TTL."""

    at: float


@dataclass(frozen=True)
class RenewFailed:
    """A renewal failed; the newest successful one was sent at ``last_ok``."""

    last_ok: float


@dataclass(frozen=True)
class LeaderSeen:
    """The leader key exists: held by ``holder`` for ``epoch`` (etcd ``revision``).

    ``lease_id``, ``ttl_left`` and ``ttl_granted``: the key's lease and what etcd says of
    it (``store.lease_time_left``; None when not asked). A standby uses them to see a
    lapsed lease before etcd sweeps it (``lease_lapsed``)."""

    holder: str
    epoch: int
    revision: int = 0
    lease_id: int = 0
    ttl_left: int | None = None
    ttl_granted: int | None = None


@dataclass(frozen=True)
class LeaderVanished:
    """No leader key (deleted, or its lease expired). ``epoch``: the epoch of the leader
    that held it last (from the persistent epoch counter), None if there never was one.

    ``forced_until``: an operator revoked the leader's lease (``resurrect failover``) and
    its holder, if alive and slow to notice, may still speak until then (monotonic);
    ``forced_to``: the host the operator named to take over, if any."""

    epoch: int | None = None
    revision: int = 0
    forced_until: float | None = None
    forced_to: str | None = None


@dataclass(frozen=True)
class LeaderAcquired:
    """Our ``AcquireLeader`` went through: the key is ours for ``epoch``, under a lease
    granted by a request sent at ``at``."""

    epoch: int
    revision: int
    at: float


@dataclass(frozen=True)
class EtcdUnreachable:
    """etcd requests have failed since ``since``.

    ``failsafe_at``: None unless the agent established fail-safe: the send time of a
    request that every partner agent answered saying it cannot reach etcd either and
    will not take the leader key for ``lease_ttl`` after its answer (the agent
    establishes it; this module trusts it). Nobody can take over before
    ``failsafe_at + lease_ttl``.
    """

    since: float
    failsafe_at: float | None = None


@dataclass(frozen=True)
class FailsafeRequested:
    """The primary ``holder`` (``epoch``) cannot reach etcd and asks this host to confirm
    that it cannot either (Patroni's POST /failsafe). ``unprotected``: its connections
    already run with the ACK gate released (their records are stale)."""

    holder: str
    epoch: int
    unprotected: bool = False


@dataclass(frozen=True)
class Paused:
    """The operator paused fail-over (cluster-wide, like Patroni's pause)."""


@dataclass(frozen=True)
class Resumed:
    """The operator resumed fail-over."""


@dataclass(frozen=True)
class SwitchoverRequested:
    """The operator asked for a planned switchover to ``target`` (``resurrect switchover``)."""

    target: str


Observation = Union[Tick, LeaseRenewed, RenewFailed, LeaderSeen, LeaderVanished,
                    LeaderAcquired, EtcdUnreachable, Paused, Resumed, SwitchoverRequested,
                    FailsafeRequested]
OBSERVATIONS = (Tick, LeaseRenewed, RenewFailed, LeaderSeen, LeaderVanished, LeaderAcquired,
                EtcdUnreachable, Paused, Resumed, SwitchoverRequested, FailsafeRequested)


# -- actions: what the loop must do, in order ------------------------------------------------

@dataclass(frozen=True)
class AcquireLeader:
    """Grant a lease of ``lease_ttl`` and create the leader key for ``epoch`` under it, in
    one transaction that succeeds only if the key is absent and the epoch counter is
    ``epoch - 1``. Report ``LeaderAcquired`` or what was seen instead."""

    epoch: int


@dataclass(frozen=True)
class RevokeLapsedLease:
    """The leader's lease ``lease_id`` is past its logical TTL by etcd's own clock:
    revoke it (its leader key goes with it) and report what the leader key is then."""

    lease_id: int
    holder: str
    epoch: int


@dataclass(frozen=True)
class AnswerFailsafe:
    """Answer the primary's fail-safe request: ``ok`` promises not to take the leader key
    before ``until`` (this host's monotonic clock). ``unprotected_epoch``: the epoch whose
    records are stale (its primary released the ACK gate), if the request said so."""

    ok: bool
    until: float | None = None
    unprotected_epoch: int | None = None


@dataclass(frozen=True)
class RenewLease:
    """Send a keepalive for our lease now; report ``LeaseRenewed`` or ``RenewFailed``."""


@dataclass(frozen=True)
class ReleaseLeader:
    """Delete our leader key and revoke its lease (a switchover hands it over)."""


@dataclass(frozen=True)
class FenceConnections:
    """Isolate every guarded connection at once (nft drop, both directions): silent and
    deaf. Repair mode is not needed and the sockets stay; nothing is sent, not even RST."""


@dataclass(frozen=True)
class UnfenceConnections:
    """Lift the isolation of the fenced connections (the lease turned out to be alive)."""


@dataclass(frozen=True)
class DropConnections:
    """Close the fenced connections without FIN or RST (repair mode, then close), then
    lift their isolation: another host owns them now, or will resurrect them."""


@dataclass(frozen=True)
class Isolate:
    """Drop, on this host, the tuples protected by the checkpoints of ``epoch``, so that
    its kernel answers no peer with RST before their sockets exist."""

    epoch: int


@dataclass(frozen=True)
class TakeVip:
    """Add the virtual IPs to the interface and announce them (gratuitous ARP / NA)."""

    vips: tuple
    interface: str


@dataclass(frozen=True)
class ReleaseVip:
    """Remove the virtual IPs from the interface."""

    vips: tuple
    interface: str


@dataclass(frozen=True)
class Resurrect:
    """Resurrect every connection checkpointed (or passed) in ``epoch``: probe, restore,
    activate, nudge, hand to the application; refuse and report records that break a
    bound (``may_resurrect``). Lifts each connection's isolation as it activates."""

    epoch: int


@dataclass(frozen=True)
class PassConnections:
    """Switchover: freeze the applications, isolate every connection (as
    ``FenceConnections``), pass the frozen ones whole to ``target`` (the paper's Section
    2; no determinism needed) and write a final record of the rest, in ``epoch``
    (checkpointd/switchover.py). Ends with every connection isolated, whatever fails."""

    target: str
    epoch: int


@dataclass(frozen=True)
class CheckpointAll:
    """Checkpoint every connection now, in this host's epoch."""


@dataclass(frozen=True)
class MarkUnprotected:
    """Report every connection unprotected since ``since`` (status, metrics, and a marker
    in etcd as soon as it accepts one)."""

    since: float


@dataclass(frozen=True)
class ReleaseGate:
    """Stop holding ACKs at the commit offset: connections keep flowing, unprotected."""


@dataclass(frozen=True)
class EngageGate:
    """Clamp ACKs at the commit offset again. A connection is protected again once a
    checkpoint whose commit offset covers everything acknowledged meanwhile is durable."""


Action = Union[AcquireLeader, RevokeLapsedLease, AnswerFailsafe, RenewLease, ReleaseLeader, FenceConnections, UnfenceConnections,
               DropConnections, Isolate, TakeVip, ReleaseVip, Resurrect, PassConnections,
               CheckpointAll, MarkUnprotected, ReleaseGate, EngageGate]


# -- state and decision ----------------------------------------------------------------------

@dataclass(frozen=True)
class HAState:
    """One host's view. Frozen: a decision returns a new one."""

    role: Role = Role.STARTING
    since: float = 0.0                  # when this role was entered
    epoch: int | None = None            # the newest leader epoch known (ours when primary)
    holder: str | None = None           # who held the leader key when last seen
    last_renew: float | None = None     # primary/fenced: newest moment the lease is known alive
    paused: bool = False
    switchover_to: str | None = None    # a requested switchover's target ...
    switchover_at: float | None = None  # ... and when it was requested
    unprotected_since: float | None = None  # primary: the ACK gate was released then
    etcd_down_since: float | None = None    # standby: etcd has not answered since then
    promised_until: float | None = None     # standby: no takeover before this (fail-safe)

    def replace(self, **changes) -> "HAState":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Decision:
    new_state: HAState
    actions: tuple[Action, ...]
    reason: str
    wake_at: float | None = None        # call decide again by then at the latest


class IllegalTransition(TcpcpError):
    """An observation the current role cannot receive (or one inconsistent with the state).
    The state is unchanged; ``role`` and ``observation`` say which pair was refused."""

    def __init__(self, role: Role, observation: object, message: str = ""):
        name = type(observation).__name__
        text = message or f"{name} is not expected in role {role.name}"
        super().__init__(f"illegal transition: {role.name} + {name}: {text}")
        self.role = role
        self.observation = observation
        self.reason = text


Handler = Callable[[HAState, object, float, Config], Decision]


@dataclass(frozen=True)
class Rule:
    handler: Handler
    targets: frozenset[Role]            # every role the handler may lead to


# -- helpers -----------------------------------------------------------------------------------

def _wake(state: HAState, now: float, config: Config) -> float:
    if state.role is Role.PRIMARY:
        return min(now + config.renew_interval, config.fence_deadline(state.last_renew))
    if state.role is Role.FENCED and state.last_renew is not None \
            and now < state.last_renew + config.lease_ttl:
        return min(now + config.renew_interval, state.last_renew + config.lease_ttl)
    if state.role is Role.DEMOTED:
        return min(now + config.renew_interval, max(now, state.since + config.lease_ttl))
    return now + config.renew_interval


def _decide(state: HAState, now: float, config: Config, reason: str,
            *actions: Action, **changes) -> Decision:
    new = state.replace(**changes)
    if new.role is not state.role and "since" not in changes:
        new = new.replace(since=now)
    return Decision(new, tuple(actions), reason, _wake(new, now, config))


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _vips(config: Config) -> tuple[TakeVip, ReleaseVip]:
    return TakeVip(config.vips, config.interface), ReleaseVip(config.vips, config.interface)


def _fence(state: HAState, now: float, config: Config, why: str) -> Decision:
    return _decide(state, now, config, f"fenced: {why}", FenceConnections(), _vips(config)[1],
                   role=Role.FENCED)


def _overdue(state: HAState, now: float, config: Config, last: float) -> Decision | None:
    """The fencing rule: past the deadline, whatever was observed, fence."""
    if now >= config.fence_deadline(last):
        left = last + config.lease_ttl - now
        expiry = (f"lease expires in {_s(left)}" if left > 0
                  else f"lease may have expired {_s(-left)} ago")
        return _fence(state.replace(last_renew=last), now, config,
                      f"could not renew the lease for {_s(now - last)}, {expiry}")
    return None


def _flags(state: HAState, obs, now: float, config: Config) -> Decision:
    """Paused / Resumed / SwitchoverRequested in roles where they only set a flag."""
    role = state.role.value
    if isinstance(obs, Paused):
        return _decide(state, now, config, f"fail-over paused by the operator ({role})", paused=True)
    if isinstance(obs, Resumed):
        return _decide(state, now, config, f"fail-over resumed by the operator ({role})", paused=False)
    if obs.target == config.host_name and state.role in (Role.STARTING, Role.STANDBY):
        return _decide(state, now, config, (
            f"switchover to this host requested: will take the leader key when "
            f"{state.holder or 'the primary'} releases it"),
            switchover_to=obs.target, switchover_at=now)
    if state.role in (Role.STARTING, Role.STANDBY):
        return _decide(state, now, config, (
            f"switchover to {obs.target} requested: leaving the leader key to it"),
            switchover_to=obs.target, switchover_at=now)
    return _decide(state, now, config, (
        f"switchover to {obs.target} ignored: this host is {role}, not primary"))


# -- STARTING and STANDBY --------------------------------------------------------------------

def _waiting_tick(state: HAState, obs: Tick, now: float, config: Config) -> Decision:
    if state.role is Role.STARTING:
        return _decide(state, now, config, "starting: waiting for an answer from etcd")
    who = f"following {state.holder} (epoch {state.epoch})" if state.holder else "no leader seen yet"
    return _decide(state, now, config, f"standing by: {who}")


def _follow(state: HAState, obs: LeaderSeen, now: float, config: Config) -> Decision:
    keep_switchover = state.switchover_to if obs.epoch == state.epoch else None
    changes = dict(role=Role.STANDBY, holder=obs.holder, epoch=obs.epoch,
                   switchover_to=keep_switchover,
                   switchover_at=state.switchover_at if keep_switchover else None,
                   etcd_down_since=None)
    if lease_lapsed(obs.ttl_left, obs.ttl_granted, config) and obs.lease_id:
        if _promised(state, now):
            return _decide(state, now, config, (
                f"the lease of {obs.holder} (epoch {obs.epoch}) has lapsed, but this host "
                f"promised (fail-safe) not to take over for {_s(state.promised_until - now)} more"),
                **changes)
        if state.paused:
            return _decide(state, now, config, (
                f"the lease of {obs.holder} (epoch {obs.epoch}) has lapsed, but fail-over is "
                "paused: standing by, not revoking it"), **changes)
        return _decide(state, now, config, (
            f"the lease of {obs.holder} (epoch {obs.epoch}) was last renewed more than "
            f"{config.lease_ttl:g} s ago by etcd's clock ({obs.ttl_left} s left of "
            f"{obs.ttl_granted}): revoking it rather than waiting for etcd's expiry sweep"),
            RevokeLapsedLease(obs.lease_id, obs.holder, obs.epoch), **changes)
    if obs.holder == config.host_name:
        return _decide(state, now, config, (
            f"the leader key still names this host (epoch {obs.epoch}), left from before a "
            "restart: standing by until its lease lapses"), **changes)
    if state.role is Role.STANDBY and obs.holder == state.holder and obs.epoch == state.epoch:
        return _decide(state, now, config,
                       f"standing by: following {obs.holder} (epoch {obs.epoch})", **changes)
    return _decide(state, now, config,
                   f"following {obs.holder} as standby (epoch {obs.epoch})", **changes)


def _leader_free(state: HAState, obs: LeaderVanished, now: float, config: Config) -> Decision:
    known = max((e for e in (state.epoch, obs.epoch) if e is not None), default=None)
    me = config.host_name
    to_me = state.switchover_to == me
    reserved = (state.switchover_to not in (None, me)
                and now < state.switchover_at + config.lease_ttl)
    if reserved:
        return _decide(state, now, config, (
            f"the leader key is free but reserved for the switchover to {state.switchover_to} "
            f"for {_s(state.switchover_at + config.lease_ttl - now)} more: standing by"),
            role=Role.STANDBY, epoch=known, holder=None)
    if obs.forced_until is not None and now < obs.forced_until:
        return _decide(state, now, config, (
            f"the leader's lease was revoked by an operator: its holder may still speak for "
            f"{_s(obs.forced_until - now)}; standing by until then"),
            role=Role.STANDBY, epoch=known, holder=None, etcd_down_since=None)
    if obs.forced_to not in (None, me) and obs.forced_until is not None:
        return _decide(state, now, config, (
            f"no leader: the operator's fail-over names {obs.forced_to}; standing by"),
            role=Role.STANDBY, epoch=known, holder=None, etcd_down_since=None)
    to_me = to_me or obs.forced_to == me
    if _promised(state, now):
        return _decide(state, now, config, (
            f"no leader, but this host promised (fail-safe) not to take the leader key for "
            f"{_s(state.promised_until - now)} more: standing by"),
            role=Role.STANDBY, epoch=known, holder=None, etcd_down_since=None)
    if state.paused and not to_me:
        return _decide(state, now, config,
                       "no leader, but fail-over is paused: standing by, not promoting",
                       role=Role.STANDBY, epoch=known, holder=None, etcd_down_since=None)
    epoch = (known or 0) + 1
    why = "switchover to this host" if to_me else "no leader"
    return _decide(state, now, config,
                   f"{why}: trying to acquire the leader key (epoch {epoch})",
                   AcquireLeader(epoch), role=Role.PROMOTING, epoch=known, holder=None,
                   etcd_down_since=None)


def _waiting_unreachable(state: HAState, obs: EtcdUnreachable, now: float, config: Config) -> Decision:
    return _decide(state, now, config,
                   f"etcd unreachable for {_s(now - obs.since)}: {state.role.value}, not promoting",
                   etcd_down_since=obs.since)


def _promised(state: HAState, now: float) -> bool:
    return state.promised_until is not None and now < state.promised_until


def _failsafe_answer(state: HAState, obs: FailsafeRequested, now: float, config: Config) -> Decision:
    """A standby confirms only while it cannot reach etcd itself: if it can, the primary
    is the one cut off and must fence. Its promise runs ``lease_ttl`` from now; the
    primary counts from when it *sent* the request, which is earlier."""
    stale = obs.epoch if obs.unprotected else None
    if state.role in (Role.STANDBY, Role.STARTING) and state.etcd_down_since is not None:
        until = now + config.lease_ttl
        return _decide(state, now, config, (
            f"fail-safe: {obs.holder} (epoch {obs.epoch}) cannot reach etcd and neither can "
            f"this host: promised not to take the leader key for {config.lease_ttl:g} s"
            + ("; its connections run unprotected, their records are stale" if stale else "")),
            AnswerFailsafe(True, until, stale), promised_until=max(until, state.promised_until or 0.0))
    why = ("this host reaches etcd" if state.role in (Role.STANDBY, Role.STARTING)
           else f"this host is {state.role.value}")
    return _decide(state, now, config, (
        f"fail-safe refused to {obs.holder} (epoch {obs.epoch}): {why}"), AnswerFailsafe(False))


# -- PROMOTING -------------------------------------------------------------------------------

def _promoting_tick(state: HAState, obs: Tick, now: float, config: Config) -> Decision:
    return _decide(state, now, config, "waiting for the answer to the leader key acquisition")


def _acquired(state: HAState, obs: LeaderAcquired, now: float, config: Config) -> Decision:
    prev = state.epoch
    if prev is not None and obs.epoch <= prev:
        raise IllegalTransition(state.role, obs, (
            f"acquired epoch {obs.epoch} is not above the last known epoch {prev}"))
    take, _ = _vips(config)
    changes = dict(role=Role.PRIMARY, epoch=obs.epoch, holder=config.host_name,
                   last_renew=obs.at, switchover_to=None, switchover_at=None,
                   unprotected_since=None)
    if now >= config.fence_deadline(obs.at):
        # The answer came back so late that the lease may lapse before we could serve:
        # touch nothing, let that lease lapse unrenewed, and compete again afterwards.
        return _decide(state, now, config, (
            f"acquired the leader key (epoch {obs.epoch}) too late to serve: the lease granted "
            f"{_s(now - obs.at)} ago is past its fencing deadline; letting it lapse, standing by"),
            role=Role.STANDBY, epoch=obs.epoch, holder=config.host_name)
    if prev is None:
        return _decide(state, now, config, (
            f"acquired the leader key as primary (epoch {obs.epoch}); no earlier epoch to resurrect"),
            take, CheckpointAll(), **changes)
    return _decide(state, now, config, (
        f"acquired the leader key as primary (epoch {obs.epoch}); resurrecting the "
        f"connections of epoch {prev}"),
        Isolate(prev), take, Resurrect(prev), CheckpointAll(), **changes)


def _promoting_seen(state: HAState, obs: LeaderSeen, now: float, config: Config) -> Decision:
    if obs.holder == config.host_name:
        return _decide(state, now, config, (
            f"the leader key names this host (epoch {obs.epoch}): waiting for the "
            "acquisition's own answer"))
    return _decide(state, now, config, (
        f"{obs.holder} acquired the leader key first (epoch {obs.epoch}): standing by"),
        role=Role.STANDBY, holder=obs.holder, epoch=obs.epoch,
        switchover_to=None, switchover_at=None)


def _promoting_free(state: HAState, obs: LeaderVanished, now: float, config: Config) -> Decision:
    known = max((e for e in (state.epoch, obs.epoch) if e is not None), default=None)
    epoch = (known or 0) + 1
    return _decide(state, now, config,
                   f"the leader key is still free: trying again to acquire it (epoch {epoch})",
                   AcquireLeader(epoch), epoch=known)


def _promoting_unreachable(state: HAState, obs: EtcdUnreachable, now: float, config: Config) -> Decision:
    return _decide(state, now, config, (
        f"etcd unreachable while acquiring the leader key ({_s(now - obs.since)}): standing by; "
        "an acquisition that went through lapses with its unrenewed lease"),
        role=Role.STANDBY)


# -- PRIMARY ---------------------------------------------------------------------------------

def _primary_status(state: HAState, now: float, config: Config) -> str:
    return (f"lease renewed {_s(now - state.last_renew)} ago, fencing deadline in "
            f"{_s(config.fence_deadline(state.last_renew) - now)}")


def _primary_tick(state: HAState, obs: Tick, now: float, config: Config) -> Decision:
    return _overdue(state, now, config, state.last_renew) or _decide(
        state, now, config, f"primary (epoch {state.epoch}): {_primary_status(state, now, config)}")


def _renewed(state: HAState, obs: LeaseRenewed, now: float, config: Config) -> Decision:
    last = max(state.last_renew, obs.at)
    overdue = _overdue(state, now, config, last)
    if overdue:
        return overdue
    if state.unprotected_since is not None:
        return _decide(state, now, config, (
            f"etcd answers again after {_s(now - state.unprotected_since)} unprotected: "
            "re-engaged the ACK gate and checkpointing every connection"),
            EngageGate(), CheckpointAll(), last_renew=last, unprotected_since=None)
    return _decide(state, now, config, f"renewed the lease as primary (epoch {state.epoch})",
                   last_renew=last)


def _renew_failed(state: HAState, obs: RenewFailed, now: float, config: Config) -> Decision:
    last = min(state.last_renew, obs.last_ok)
    return _overdue(state, now, config, last) or _decide(state, now, config, (
        f"could not renew the lease for {_s(now - last)}: retrying; fencing in "
        f"{_s(config.fence_deadline(last) - now)} unless renewed"),
        RenewLease(), last_renew=last)


def _primary_seen(state: HAState, obs: LeaderSeen, now: float, config: Config) -> Decision:
    if obs.holder != config.host_name:
        return _fence(state, now, config,
                      f"the leader key is held by {obs.holder} (epoch {obs.epoch})")
    if obs.epoch != state.epoch:
        return _fence(state, now, config, (
            f"the leader key names this host for epoch {obs.epoch}, not our epoch {state.epoch}"))
    return _overdue(state, now, config, state.last_renew) or _decide(
        state, now, config, f"primary (epoch {state.epoch}): the leader key is ours; "
                            f"{_primary_status(state, now, config)}")


def _primary_vanished(state: HAState, obs: LeaderVanished, now: float, config: Config) -> Decision:
    return _fence(state, now, config, "the leader key vanished (our lease lapsed in etcd)")


def _primary_unreachable(state: HAState, obs: EtcdUnreachable, now: float, config: Config) -> Decision:
    down = _s(now - obs.since)
    if obs.failsafe_at is None:
        return _overdue(state, now, config, state.last_renew) or _decide(state, now, config, (
            f"etcd unreachable for {down}: the ACK gate holds inbound data; fencing in "
            f"{_s(config.fence_deadline(state.last_renew) - now)} unless the lease is renewed"),
            RenewLease())
    last = max(state.last_renew, obs.failsafe_at)
    overdue = _overdue(state, now, config, last)
    if overdue:
        return overdue
    if state.unprotected_since is not None:
        return _decide(state, now, config, (
            f"fail-safe: etcd unreachable from every host for {down}: connections run "
            "unprotected, the ACK gate released"),
            RenewLease(), last_renew=last)
    if now - obs.since >= config.unprotected_grace:
        return _decide(state, now, config, (
            f"fail-safe: etcd unreachable from every host for {down} (grace "
            f"{config.unprotected_grace:g} s): released the ACK gate; connections keep working "
            "unprotected until etcd answers again"),
            MarkUnprotected(now), ReleaseGate(), RenewLease(),
            last_renew=last, unprotected_since=now)
    return _decide(state, now, config, (
        f"fail-safe: etcd unreachable from every host for {down}, the standby promised not to "
        f"take over; the ACK gate holds inbound data, released after {config.unprotected_grace:g} s"),
        RenewLease(), last_renew=last)


def _primary_flags(state: HAState, obs, now: float, config: Config) -> Decision:
    return _overdue(state, now, config, state.last_renew) or _flags(state, obs, now, config)


def _primary_failsafe(state: HAState, obs: FailsafeRequested, now: float, config: Config) -> Decision:
    return _overdue(state, now, config, state.last_renew) or _failsafe_answer(state, obs, now, config)


def _switchover(state: HAState, obs: SwitchoverRequested, now: float, config: Config) -> Decision:
    overdue = _overdue(state, now, config, state.last_renew)
    if overdue:
        return overdue
    if obs.target == config.host_name:
        return _decide(state, now, config,
                       f"switchover to {obs.target} ignored: it is already primary")
    return _decide(state, now, config, (
        f"switching over to {obs.target}: freezing the applications, isolating and passing "
        f"the connections in epoch {state.epoch}, releasing the virtual IPs and the leader key"),
        PassConnections(obs.target, state.epoch), _vips(config)[1],
        ReleaseLeader(), role=Role.DEMOTED, switchover_to=obs.target, switchover_at=now)


# -- FENCED ----------------------------------------------------------------------------------

def _fenced_tick(state: HAState, obs: Tick, now: float, config: Config) -> Decision:
    expiry = state.last_renew + config.lease_ttl
    if now >= expiry:
        return _decide(state, now, config,
                       "fenced: the lease has lapsed; waiting to see the leader key")
    return _decide(state, now, config,
                   f"fenced: retrying to renew; the lease lapses in {_s(expiry - now)}", RenewLease())


def _fenced_renewed(state: HAState, obs: LeaseRenewed, now: float, config: Config) -> Decision:
    if now >= config.fence_deadline(obs.at):
        return _decide(state, now, config, (
            f"fenced: a renewal sent {_s(now - obs.at)} ago came back too late to unfence"),
            last_renew=max(state.last_renew, obs.at))
    extra: tuple[Action, ...] = ()
    if state.unprotected_since is not None:
        extra = (EngageGate(), CheckpointAll())
    return _decide(state, now, config, (
        f"renewed the lease while fenced: unfenced the connections (epoch {state.epoch})"),
        UnfenceConnections(), _vips(config)[0], *extra,
        role=Role.PRIMARY, last_renew=max(state.last_renew, obs.at), unprotected_since=None)


def _fenced_renew_failed(state: HAState, obs: RenewFailed, now: float, config: Config) -> Decision:
    expiry = state.last_renew + config.lease_ttl
    if now >= expiry:
        return _decide(state, now, config, "fenced: the lease has lapsed; no more renewals")
    return _decide(state, now, config, (
        f"fenced: could not renew the lease for {_s(now - state.last_renew)}; it lapses in "
        f"{_s(expiry - now)}"), RenewLease())


def _fenced_seen(state: HAState, obs: LeaderSeen, now: float, config: Config) -> Decision:
    if obs.holder == config.host_name and obs.epoch == state.epoch:
        return _decide(state, now, config,
                       "fenced: the leader key is still ours; waiting for a renewal", RenewLease())
    return _decide(state, now, config, (
        f"{obs.holder} holds the leader key (epoch {obs.epoch}): dropped the fenced "
        "connections silently; standing by"),
        DropConnections(), role=Role.STANDBY, holder=obs.holder, epoch=obs.epoch,
        last_renew=None, unprotected_since=None)


def _fenced_vanished(state: HAState, obs: LeaderVanished, now: float, config: Config) -> Decision:
    return _decide(state, now, config, (
        "the lease lapsed: dropped the fenced connections silently (their checkpoints "
        "remain); standing by"),
        DropConnections(), role=Role.STANDBY, holder=None, last_renew=None,
        unprotected_since=None)


def _fenced_unreachable(state: HAState, obs: EtcdUnreachable, now: float, config: Config) -> Decision:
    return _decide(state, now, config,
                   f"fenced: etcd unreachable for {_s(now - obs.since)}; connections stay silent")


# -- DEMOTED ---------------------------------------------------------------------------------

def _demoted_wait(state: HAState, obs, now: float, config: Config) -> Decision:
    target = state.switchover_to
    if now >= state.since + config.lease_ttl:
        return _decide(state, now, config, (
            f"switchover to {target} did not complete within {config.lease_ttl:g} s: dropped "
            "the passed connections (their records remain); standing by"),
            DropConnections(), role=Role.STANDBY, holder=None, last_renew=None,
            switchover_to=None, switchover_at=None)
    return _decide(state, now, config, f"demoted: waiting for {target} to take the leader key")


def _demoted_seen(state: HAState, obs: LeaderSeen, now: float, config: Config) -> Decision:
    if obs.holder == config.host_name:
        return _demoted_wait(state, obs, now, config)
    return _decide(state, now, config, (
        f"{obs.holder} took over (epoch {obs.epoch}): dropped our passed connections; standing by"),
        DropConnections(), role=Role.STANDBY, holder=obs.holder, epoch=obs.epoch,
        last_renew=None, switchover_to=None, switchover_at=None)


# -- the table -------------------------------------------------------------------------------

def _rule(handler: Handler, *targets: Role) -> Rule:
    return Rule(handler, frozenset(targets))


S, SB, PM, P, F, D = Role.STARTING, Role.STANDBY, Role.PROMOTING, Role.PRIMARY, Role.FENCED, Role.DEMOTED

TRANSITIONS: dict[Role, dict[type, Rule]] = {
    Role.STARTING: {
        Tick: _rule(_waiting_tick, S),
        LeaderSeen: _rule(_follow, SB),
        LeaderVanished: _rule(_leader_free, SB, PM),
        EtcdUnreachable: _rule(_waiting_unreachable, S),
        Paused: _rule(_flags, S),
        Resumed: _rule(_flags, S),
        SwitchoverRequested: _rule(_flags, S),
        FailsafeRequested: _rule(_failsafe_answer, S),
    },
    Role.STANDBY: {
        Tick: _rule(_waiting_tick, SB),
        LeaderSeen: _rule(_follow, SB),
        LeaderVanished: _rule(_leader_free, SB, PM),
        EtcdUnreachable: _rule(_waiting_unreachable, SB),
        Paused: _rule(_flags, SB),
        Resumed: _rule(_flags, SB),
        SwitchoverRequested: _rule(_flags, SB),
        FailsafeRequested: _rule(_failsafe_answer, SB),
    },
    Role.PROMOTING: {
        Tick: _rule(_promoting_tick, PM),
        LeaderAcquired: _rule(_acquired, P, SB),
        LeaderSeen: _rule(_promoting_seen, PM, SB),
        LeaderVanished: _rule(_promoting_free, PM),
        EtcdUnreachable: _rule(_promoting_unreachable, SB),
        Paused: _rule(_flags, PM),
        Resumed: _rule(_flags, PM),
        SwitchoverRequested: _rule(_flags, PM),
        FailsafeRequested: _rule(_failsafe_answer, PM),
    },
    Role.PRIMARY: {
        Tick: _rule(_primary_tick, P, F),
        LeaseRenewed: _rule(_renewed, P, F),
        RenewFailed: _rule(_renew_failed, P, F),
        LeaderSeen: _rule(_primary_seen, P, F),
        LeaderVanished: _rule(_primary_vanished, F),
        EtcdUnreachable: _rule(_primary_unreachable, P, F),
        Paused: _rule(_primary_flags, P, F),
        Resumed: _rule(_primary_flags, P, F),
        SwitchoverRequested: _rule(_switchover, P, F, D),
        FailsafeRequested: _rule(_primary_failsafe, P, F),
    },
    Role.FENCED: {
        Tick: _rule(_fenced_tick, F),
        LeaseRenewed: _rule(_fenced_renewed, F, P),
        RenewFailed: _rule(_fenced_renew_failed, F),
        LeaderSeen: _rule(_fenced_seen, F, SB),
        LeaderVanished: _rule(_fenced_vanished, SB),
        EtcdUnreachable: _rule(_fenced_unreachable, F),
        Paused: _rule(_flags, F),
        Resumed: _rule(_flags, F),
        SwitchoverRequested: _rule(_flags, F),
        FailsafeRequested: _rule(_failsafe_answer, F),
    },
    Role.DEMOTED: {
        Tick: _rule(_demoted_wait, D, SB),
        LeaderSeen: _rule(_demoted_seen, D, SB),
        LeaderVanished: _rule(_demoted_wait, D, SB),
        EtcdUnreachable: _rule(_demoted_wait, D, SB),
        Paused: _rule(_flags, D),
        Resumed: _rule(_flags, D),
        SwitchoverRequested: _rule(_flags, D),
        FailsafeRequested: _rule(_failsafe_answer, D),
    },
}


def decide(state: HAState, observation: Observation, now: float, config: Config) -> Decision:
    """The one entry point: what to do about ``observation`` at ``now`` (monotonic seconds).

    Raises ``IllegalTransition`` (state unchanged) for a pair the table does not list.
    """
    rule = TRANSITIONS[state.role].get(type(observation))
    if rule is None:
        raise IllegalTransition(state.role, observation)
    decision = rule.handler(state, observation, now, config)
    assert decision.new_state.role in rule.targets, (state.role, observation, decision)
    return decision


class RoleMachine:
    """The state holder for the loop: applies a decision only when it was made.

    ``clock`` is injected (tests pass a fake one); ``observe`` returns the decision whose
    actions the caller performs.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 state: HAState | None = None):
        self.config = config
        self.clock = clock
        self.state = state if state is not None else HAState(since=clock())

    def observe(self, observation: Observation) -> Decision:
        decision = decide(self.state, observation, self.clock(), self.config)
        self.state = decision.new_state
        return decision


def transition_table() -> str:
    """The table as Markdown, one row per observation, one column per role: the roles a
    cell may lead to ("stays": the same role), ``illegal`` where ``decide`` raises. docs/failover.md embeds exactly
    this text (a test checks it)."""
    roles = list(TRANSITIONS)
    lines = ["| observation | " + " | ".join(r.name for r in roles) + " |",
             "|---" * (len(roles) + 1) + "|"]
    for obs in OBSERVATIONS:
        cells = []
        for role in roles:
            rule = TRANSITIONS[role].get(obs)
            if rule is None:
                cells.append("illegal")
                continue
            parts = ["stays"] if role in rule.targets else []
            parts += [r.name for r in Role if r in rule.targets and r is not role]
            cells.append(" or ".join(parts))
        lines.append(f"| {obs.__name__} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the leader lease's logical TTL ----------------------------------------------------------

def granted_ttl(config: Config) -> int:
    """The TTL to ask etcd for: one whole second more than ``lease_ttl``.

    etcd 3.4 sweeps expired leases every 500 ms, so a lease of ``lease_ttl`` would vanish
    up to half a second late. Granting one second more keeps etcd's own expiry as a late
    backstop, while the standby ends the lease at ``lease_ttl`` from the moment etcd's
    clock shows it (``lease_lapsed``). The primary fences by ``lease_ttl`` regardless.
    """
    return math.ceil(config.lease_ttl) + 1


def lease_lapsed(ttl_left: int | None, ttl_granted: int | None, config: Config) -> bool:
    """Whether a lease is surely more than ``lease_ttl`` past its last renewal, by etcd.

    etcd reports whole seconds truncated toward zero: ``ttl_left`` = n means the true
    remainder r is in (n - 1, n + 1) (negative r near expiry still reads 0). Time since
    the renewal that etcd processed is ``granted - r > granted - n - 1``; that renewal
    was sent earlier still, so the primary, which fences at ``lease_ttl - fence_margin``
    after *sending* it, is silent once ``granted - n - 1 >= lease_ttl``. A lease etcd no
    longer knows (``ttl_left`` None) is not ours to revoke: the key vanishes by itself.
    """
    if ttl_left is None or not ttl_granted:
        return False
    return ttl_granted - ttl_left - 1 >= config.lease_ttl


# -- the bounds (the paper's Section 6.1) ---------------------------------------------------

@dataclass(frozen=True)
class RecordMeta:
    """What ``may_resurrect`` needs to know about one checkpoint record.

    ``wall_ns``: the origin's wall clock (CLOCK_REALTIME) at the dump (``ICI.dump_time_ns``).
    ``bytes_in``/``bytes_out``: bytes received/sent between the previous checkpoint and this
    one. ``authenticated``: the store's AEAD verdict (key name and epoch bound in);
    ``auth_detail``: its reason when it failed.
    """

    epoch: int
    wall_ns: int
    bytes_in: int = 0
    bytes_out: int = 0
    authenticated: bool = True
    auth_detail: str = ""


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def may_resurrect(meta: RecordMeta, now_ns: int, config: Config, *,
                  epoch: int) -> tuple[bool, str]:
    """May this checkpoint be resurrected now? ``epoch``: the epoch the caller resurrects
    (the leader epoch that lapsed). Checks, in order: authentication (nothing else in a
    forged record is worth reading), epoch, a clock that runs backwards beyond the skew
    bound, age against the MSL (measured age + clock_skew must not exceed it: the origin's
    clock may be ahead of ours by that much), and bytes since the previous checkpoint (a
    record past 2^31 in either direction cannot be mapped to one stream offset)."""
    if not meta.authenticated:
        detail = f": {meta.auth_detail}" if meta.auth_detail else ""
        return False, f"refused: the record failed authentication{detail}"
    if meta.epoch != epoch:
        return False, f"refused: the record belongs to epoch {meta.epoch}, not epoch {epoch}"
    skew = _ns(config.clock_skew)
    age = now_ns - meta.wall_ns
    if age < -skew:
        return False, (f"refused: the record was written {(-age) / 1e9:.3f} s in the future by "
                       f"this host's clock, beyond the clock-skew bound of {config.clock_skew:g} s")
    if age + skew > _ns(config.msl):
        return False, (f"refused: the checkpoint is {age / 1e9:.3f} s old (+{config.clock_skew:g} s "
                       f"clock skew), beyond the MSL of {config.msl:g} s")
    for name, moved in (("received", meta.bytes_in), ("sent", meta.bytes_out)):
        if moved >= BYTES_BOUND:
            return False, (f"refused: {moved} bytes {name} since the previous checkpoint reach "
                           "2^31: sequence numbers no longer name one stream offset")
    return True, (f"checkpoint of epoch {meta.epoch} is {age / 1e9:.3f} s old with "
                  f"{meta.bytes_in}/{meta.bytes_out} bytes in/out since the previous one: "
                  "may be resurrected")


@dataclass(frozen=True)
class ConnStats:
    """One connection's progress since its last durable checkpoint (None: never)."""

    bytes_in: int
    bytes_out: int
    last_checkpoint_ns: int | None


def needs_checkpoint(stats: ConnStats, now_ns: int, config: Config) -> tuple[bool, str]:
    """Force a checkpoint when bytes since the last one reach ``checkpoint_bytes`` (well
    before ``max_bytes`` and 2^31) or ``checkpoint_interval`` has passed."""
    if stats.last_checkpoint_ns is None:
        return True, "never checkpointed: checkpoint now"
    for name, moved in (("received", stats.bytes_in), ("sent", stats.bytes_out)):
        if moved >= config.checkpoint_bytes:
            return True, (f"{moved} bytes {name} since the last checkpoint reach "
                          f"{config.checkpoint_bytes}: checkpoint now, well before 2^31")
    elapsed = now_ns - stats.last_checkpoint_ns
    if elapsed >= _ns(config.checkpoint_interval):
        return True, (f"{elapsed / 1e9:.3f} s since the last checkpoint "
                      f"(interval {config.checkpoint_interval:g} s): checkpoint now")
    return False, (f"{elapsed / 1e9:.3f} s and {stats.bytes_in}/{stats.bytes_out} bytes in/out "
                   "since the last checkpoint: not yet")


def output_budget(stats: ConnStats, config: Config) -> int:
    """Bytes the application may still write before a checkpoint must be durable: output
    beyond ``max_bytes`` since the last one is held (inbound needs no such rule: the ACK
    gate keeps the peer within one receive window of the commit offset)."""
    return max(0, config.max_bytes - stats.bytes_out)
