"""Root-free tests of the HA decisions and the bounds, with an injected clock.

One table of cases drives the transition tests; a meta-test checks that it reaches every
(role, observation, next role) the machine's table allows, and every pair the table does
not list is checked to raise and leave the state unchanged. A two-host simulation against
a model of etcd's leases checks the point of fencing: a host is PRIMARY only while its
lease is alive in etcd, so two hosts never speak for one connection.
"""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointd import decide as d
from checkpointd.config import BYTES_BOUND, Config
from checkpointd.decide import (
    FailsafeRequested, AcquireLeader, CheckpointAll, ConnStats, Decision, DropConnections, EngageGate,
    EtcdUnreachable, FenceConnections, HAState, IllegalTransition, Isolate, LeaderAcquired,
    LeaderSeen, LeaderVanished, LeaseRenewed, MarkUnprotected, PassConnections, Paused,
    RecordMeta, ReleaseGate, ReleaseLeader, ReleaseVip, RenewFailed, RenewLease, Resumed,
    Resurrect, Role, RoleMachine, SwitchoverRequested, TakeVip, Tick, UnfenceConnections,
    decide, may_resurrect, needs_checkpoint, output_budget)
from kernel.errors import TcpcpError

DOCS = Path(__file__).parent.parent.parent / "docs" / "failover.md"
ME, OTHER, THIRD = "host-a", "host-b", "host-c"

# lease 1 s as in the drills; binary-exact timings so that edges are exact.
CONFIG = Config(cluster_name="pair", host_name=ME, etcd_endpoints=("http://127.0.0.1:2379",),
                key_file="/etc/tcpcp/k", vips=("192.0.2.10", "2001:db8::10"), interface="eth0",
                lease_ttl=1.0, renew_interval=0.125, retry_timeout=0.125, fence_margin=0.5,
                checkpoint_interval=5.0, commit_interval=0.01, msl=120.0, clock_skew=0.0,
                unprotected_grace=2.0)
TAKE = TakeVip(CONFIG.vips, "eth0")
RELEASE = ReleaseVip(CONFIG.vips, "eth0")
FENCE = (FenceConnections(), RELEASE)

STARTING = HAState(Role.STARTING, since=0.0)
STANDBY = HAState(Role.STANDBY, since=0.0, epoch=7, holder=OTHER)
PROMOTING = HAState(Role.PROMOTING, since=99.0, epoch=7)
PRIMARY = HAState(Role.PRIMARY, since=50.0, epoch=8, holder=ME, last_renew=100.0)  # deadline 100.5
FENCED = HAState(Role.FENCED, since=100.5, epoch=8, holder=ME, last_renew=100.0)   # expiry 101
DEMOTED = HAState(Role.DEMOTED, since=100.0, epoch=8, holder=ME, last_renew=100.0,
                  switchover_to=OTHER, switchover_at=100.0)                         # timeout 101


def st_(state, **changes):
    return state.replace(**changes)


# (id, state, observation, now, next role, actions, a fragment of the reason)
CASES = [
    # STARTING
    ("starting-tick", STARTING, Tick(), 1.0, Role.STARTING, (), "waiting for an answer from etcd"),
    ("starting-sees-leader", STARTING, LeaderSeen(OTHER, 7, 40), 1.0, Role.STANDBY, (),
     "following host-b as standby (epoch 7)"),
    ("starting-sees-own-stale-key", STARTING, LeaderSeen(ME, 7, 40), 1.0, Role.STANDBY, (),
     "still names this host (epoch 7)"),
    ("starting-no-leader", STARTING, LeaderVanished(7, 41), 1.0, Role.PROMOTING, (AcquireLeader(8),),
     "no leader: trying to acquire the leader key (epoch 8)"),
    ("starting-cold-cluster", STARTING, LeaderVanished(None, 1), 1.0, Role.PROMOTING, (AcquireLeader(1),),
     "(epoch 1)"),
    ("starting-no-leader-paused", st_(STARTING, paused=True), LeaderVanished(7), 1.0, Role.STANDBY, (),
     "fail-over is paused"),
    ("starting-etcd-unreachable", STARTING, EtcdUnreachable(since=0.5), 1.5, Role.STARTING, (),
     "etcd unreachable for 1.00 s"),
    ("starting-paused", STARTING, Paused(), 1.0, Role.STARTING, (), "fail-over paused"),
    ("starting-resumed", st_(STARTING, paused=True), Resumed(), 1.0, Role.STARTING, (), "resumed"),
    ("starting-switchover", STARTING, SwitchoverRequested(ME), 1.0, Role.STARTING, (),
     "switchover to this host requested"),
    # STANDBY
    ("standby-tick", STANDBY, Tick(), 1.0, Role.STANDBY, (), "standing by: following host-b (epoch 7)"),
    ("standby-same-leader", STANDBY, LeaderSeen(OTHER, 7, 50), 1.0, Role.STANDBY, (),
     "standing by: following host-b (epoch 7)"),
    ("standby-new-leader", STANDBY, LeaderSeen(THIRD, 8, 60), 1.0, Role.STANDBY, (),
     "following host-c as standby (epoch 8)"),
    ("standby-leader-gone", STANDBY, LeaderVanished(7, 61), 1.0, Role.PROMOTING, (AcquireLeader(8),),
     "no leader: trying to acquire the leader key (epoch 8)"),
    ("standby-leader-gone-paused", st_(STANDBY, paused=True), LeaderVanished(7), 1.0, Role.STANDBY, (),
     "paused: standing by, not promoting"),
    ("standby-switchover-to-me-beats-pause",
     st_(STANDBY, paused=True, switchover_to=ME, switchover_at=0.5), LeaderVanished(7), 1.0,
     Role.PROMOTING, (AcquireLeader(8),), "switchover to this host: trying to acquire"),
    ("standby-key-reserved-for-switchover",
     st_(STANDBY, switchover_to=THIRD, switchover_at=99.5), LeaderVanished(7), 100.0,
     Role.STANDBY, (), "reserved for the switchover to host-c for 0.50 s more"),
    ("standby-reservation-over",
     st_(STANDBY, switchover_to=THIRD, switchover_at=99.5), LeaderVanished(7), 100.5,
     Role.PROMOTING, (AcquireLeader(8),), "no leader"),
    ("standby-etcd-unreachable", STANDBY, EtcdUnreachable(since=0.0), 1.0,
     Role.STANDBY, (), "etcd unreachable for 1.00 s"),
    ("standby-paused", STANDBY, Paused(), 1.0, Role.STANDBY, (), "fail-over paused"),
    ("standby-resumed", st_(STANDBY, paused=True), Resumed(), 1.0, Role.STANDBY, (), "resumed"),
    ("standby-switchover-elsewhere", STANDBY, SwitchoverRequested(THIRD), 1.0, Role.STANDBY, (),
     "switchover to host-c requested: leaving the leader key to it"),
    # PROMOTING
    ("promoting-tick", PROMOTING, Tick(), 100.0, Role.PROMOTING, (), "waiting for the answer"),
    ("promoting-acquired", PROMOTING, LeaderAcquired(8, 70, at=100.0), 100.01, Role.PRIMARY,
     (Isolate(7), TAKE, Resurrect(7), CheckpointAll()),
     "acquired the leader key as primary (epoch 8); resurrecting the connections of epoch 7"),
    ("promoting-acquired-first-ever", st_(PROMOTING, epoch=None), LeaderAcquired(1, 2, at=100.0), 100.01,
     Role.PRIMARY, (TAKE, CheckpointAll()), "acquired the leader key as primary (epoch 1); no earlier"),
    ("promoting-acquired-too-late", PROMOTING, LeaderAcquired(8, 70, at=99.0), 99.5, Role.STANDBY, (),
     "too late to serve"),
    ("promoting-lost-race", PROMOTING, LeaderSeen(THIRD, 8, 70), 100.0, Role.STANDBY, (),
     "host-c acquired the leader key first (epoch 8): standing by"),
    ("promoting-sees-own-key", PROMOTING, LeaderSeen(ME, 8, 70), 100.0, Role.PROMOTING, (),
     "waiting for the acquisition's own answer"),
    ("promoting-still-free", PROMOTING, LeaderVanished(7), 100.0, Role.PROMOTING, (AcquireLeader(8),),
     "still free: trying again"),
    ("promoting-etcd-unreachable", PROMOTING, EtcdUnreachable(since=99.5), 100.0, Role.STANDBY, (),
     "lapses with its unrenewed lease"),
    ("promoting-paused", PROMOTING, Paused(), 100.0, Role.PROMOTING, (), "paused"),
    ("promoting-resumed", PROMOTING, Resumed(), 100.0, Role.PROMOTING, (), "resumed"),
    ("promoting-switchover", PROMOTING, SwitchoverRequested(OTHER), 100.0, Role.PROMOTING, (),
     "ignored: this host is promoting"),
    # PRIMARY (last_renew 100.0, fencing deadline 100.5, lease expiry 101.0)
    ("primary-tick", PRIMARY, Tick(), 100.2, Role.PRIMARY, (),
     "primary (epoch 8): lease renewed 0.20 s ago, fencing deadline in 0.30 s"),
    ("primary-tick-at-deadline", PRIMARY, Tick(), 100.5, Role.FENCED, FENCE,
     "fenced: could not renew the lease for 0.50 s, lease expires in 0.50 s"),
    ("primary-renewed", PRIMARY, LeaseRenewed(at=100.25), 100.3, Role.PRIMARY, (),
     "renewed the lease as primary (epoch 8)"),
    ("primary-renewal-too-old", PRIMARY, LeaseRenewed(at=99.75), 100.5, Role.FENCED, FENCE,
     "fenced: could not renew the lease for 0.50 s"),
    ("primary-renewed-gate-back", st_(PRIMARY, unprotected_since=90.0), LeaseRenewed(at=100.25), 100.3,
     Role.PRIMARY, (EngageGate(), CheckpointAll()), "re-engaged the ACK gate"),
    ("primary-renew-failed", PRIMARY, RenewFailed(last_ok=100.0), 100.25, Role.PRIMARY, (RenewLease(),),
     "could not renew the lease for 0.25 s: retrying; fencing in 0.25 s unless renewed"),
    ("primary-renew-failed-fences", PRIMARY, RenewFailed(last_ok=100.0), 100.62, Role.FENCED, FENCE,
     "fenced: could not renew the lease for 0.62 s, lease expires in 0.38 s"),
    ("primary-renew-failed-very-late", PRIMARY, RenewFailed(last_ok=100.0), 101.25, Role.FENCED, FENCE,
     "lease may have expired 0.25 s ago"),
    ("primary-own-key", PRIMARY, LeaderSeen(ME, 8, 80), 100.25, Role.PRIMARY, (), "the leader key is ours"),
    ("primary-key-taken", PRIMARY, LeaderSeen(OTHER, 9, 81), 100.25, Role.FENCED, FENCE,
     "fenced: the leader key is held by host-b (epoch 9)"),
    ("primary-key-other-epoch", PRIMARY, LeaderSeen(ME, 9, 81), 100.25, Role.FENCED, FENCE,
     "names this host for epoch 9, not our epoch 8"),
    ("primary-key-vanished", PRIMARY, LeaderVanished(8), 100.25, Role.FENCED, FENCE,
     "fenced: the leader key vanished"),
    ("primary-etcd-unreachable", PRIMARY, EtcdUnreachable(since=100.125), 100.25, Role.PRIMARY,
     (RenewLease(),), "etcd unreachable for 0.12 s: the ACK gate holds inbound data; fencing in 0.25 s"),
    ("primary-etcd-unreachable-fences", PRIMARY, EtcdUnreachable(since=100.125), 100.5, Role.FENCED, FENCE,
     "fenced: could not renew"),
    ("primary-unreachable-long-no-gate-release", PRIMARY, EtcdUnreachable(since=90.0), 100.25,
     Role.PRIMARY, (RenewLease(),), "the ACK gate holds"),
    ("primary-failsafe-holds", PRIMARY, EtcdUnreachable(since=100.125, failsafe_at=100.375), 100.625,
     Role.PRIMARY, (RenewLease(),), "the standby promised not to take over; the ACK gate holds "
     "inbound data, released after 2 s"),
    ("primary-failsafe-grace-over", PRIMARY, EtcdUnreachable(since=98.0, failsafe_at=100.25), 100.3,
     Role.PRIMARY, (MarkUnprotected(100.3), ReleaseGate(), RenewLease()),
     "released the ACK gate; connections keep working unprotected"),
    ("primary-failsafe-unprotected", st_(PRIMARY, unprotected_since=99.0),
     EtcdUnreachable(since=97.0, failsafe_at=100.25), 100.3, Role.PRIMARY, (RenewLease(),),
     "connections run unprotected"),
    ("primary-failsafe-too-old", PRIMARY, EtcdUnreachable(since=99.0, failsafe_at=99.5), 100.5,
     Role.FENCED, FENCE, "fenced: could not renew"),
    # fail-safe: the standby confirms only while it cannot reach etcd itself
    ("standby-failsafe-confirms", st_(STANDBY, etcd_down_since=99.0), FailsafeRequested(OTHER, 7),
     100.0, Role.STANDBY, (d.AnswerFailsafe(True, 101.0, None),), "promised not to take the leader key"),
    ("starting-failsafe-confirms-stale", st_(STARTING, etcd_down_since=99.0),
     FailsafeRequested(OTHER, 7, unprotected=True), 100.0, Role.STARTING,
     (d.AnswerFailsafe(True, 101.0, 7),), "their records are stale"),
    ("standby-failsafe-refused", STANDBY, FailsafeRequested(OTHER, 7), 100.0, Role.STANDBY,
     (d.AnswerFailsafe(False),), "this host reaches etcd"),
    ("promoting-failsafe-refused", PROMOTING, FailsafeRequested(OTHER, 7), 100.0, Role.PROMOTING,
     (d.AnswerFailsafe(False),), "this host is promoting"),
    ("primary-failsafe-refused", PRIMARY, FailsafeRequested(OTHER, 7), 100.25, Role.PRIMARY,
     (d.AnswerFailsafe(False),), "this host is primary"),
    ("primary-failsafe-at-deadline-fences", PRIMARY, FailsafeRequested(OTHER, 7), 100.5, Role.FENCED,
     FENCE, "fenced: could not renew"),
    ("fenced-failsafe-refused", FENCED, FailsafeRequested(OTHER, 7), 100.75, Role.FENCED,
     (d.AnswerFailsafe(False),), "this host is fenced"),
    ("demoted-failsafe-refused", DEMOTED, FailsafeRequested(OTHER, 9), 100.25, Role.DEMOTED,
     (d.AnswerFailsafe(False),), "this host is demoted"),
    ("standby-promised-no-takeover", st_(STANDBY, promised_until=100.5), LeaderVanished(7), 100.0,
     Role.STANDBY, (), "promised (fail-safe) not to take the leader key for 0.50 s more"),
    ("standby-promise-over", st_(STANDBY, promised_until=100.0), LeaderVanished(7), 100.0,
     Role.PROMOTING, (AcquireLeader(8),), "trying to acquire"),
    ("primary-paused", PRIMARY, Paused(), 100.25, Role.PRIMARY, (), "fail-over paused by the operator (primary)"),
    ("primary-resumed", st_(PRIMARY, paused=True), Resumed(), 100.25, Role.PRIMARY, (), "resumed"),
    ("primary-paused-still-fences", PRIMARY, Paused(), 100.5, Role.FENCED, FENCE, "fenced"),
    ("primary-resumed-at-deadline", st_(PRIMARY, paused=True), Resumed(), 100.5, Role.FENCED, FENCE,
     "fenced"),
    ("primary-switchover", PRIMARY, SwitchoverRequested(OTHER), 100.25, Role.DEMOTED,
     (PassConnections(OTHER, 8), RELEASE, ReleaseLeader()),
     "switching over to host-b"),
    ("primary-switchover-to-self", PRIMARY, SwitchoverRequested(ME), 100.25, Role.PRIMARY, (),
     "already primary"),
    ("primary-switchover-too-late", PRIMARY, SwitchoverRequested(OTHER), 100.75, Role.FENCED, FENCE,
     "fenced"),
    # FENCED (last_renew 100.0, lease expiry 101.0)
    ("fenced-tick", FENCED, Tick(), 100.625, Role.FENCED, (RenewLease(),),
     "fenced: retrying to renew; the lease lapses in 0.38 s"),
    ("fenced-tick-lapsed", FENCED, Tick(), 101.0, Role.FENCED, (), "the lease has lapsed"),
    ("fenced-renewed-unfences", FENCED, LeaseRenewed(at=100.5), 100.625, Role.PRIMARY,
     (UnfenceConnections(), TAKE), "renewed the lease while fenced: unfenced the connections (epoch 8)"),
    ("fenced-renewed-unprotected", st_(FENCED, unprotected_since=99.0), LeaseRenewed(at=100.5), 100.625,
     Role.PRIMARY, (UnfenceConnections(), TAKE, EngageGate(), CheckpointAll()), "unfenced"),
    ("fenced-renewal-too-late", FENCED, LeaseRenewed(at=100.0), 100.625, Role.FENCED, (),
     "came back too late to unfence"),
    ("fenced-renew-failed", FENCED, RenewFailed(100.0), 100.625, Role.FENCED, (RenewLease(),),
     "it lapses in 0.38 s"),
    ("fenced-renew-failed-lapsed", FENCED, RenewFailed(100.0), 101.5, Role.FENCED, (), "no more renewals"),
    ("fenced-own-key", FENCED, LeaderSeen(ME, 8), 100.625, Role.FENCED, (RenewLease(),),
     "the leader key is still ours"),
    ("fenced-taken-over", FENCED, LeaderSeen(OTHER, 9), 101.5, Role.STANDBY, (DropConnections(),),
     "host-b holds the leader key (epoch 9): dropped the fenced connections silently"),
    ("fenced-key-vanished", FENCED, LeaderVanished(8), 101.0, Role.STANDBY, (DropConnections(),),
     "the lease lapsed: dropped the fenced connections"),
    ("fenced-etcd-unreachable", FENCED, EtcdUnreachable(since=100.0), 100.625, Role.FENCED, (),
     "connections stay silent"),
    ("fenced-paused", FENCED, Paused(), 100.625, Role.FENCED, (), "paused"),
    ("fenced-resumed", FENCED, Resumed(), 100.625, Role.FENCED, (), "resumed"),
    ("fenced-switchover", FENCED, SwitchoverRequested(OTHER), 100.625, Role.FENCED, (),
     "ignored: this host is fenced"),
    # DEMOTED (since 100.0: the target has until 101.0)
    ("demoted-tick", DEMOTED, Tick(), 100.5, Role.DEMOTED, (), "waiting for host-b to take the leader key"),
    ("demoted-timeout", DEMOTED, Tick(), 101.0, Role.STANDBY, (DropConnections(),),
     "switchover to host-b did not complete within 1 s"),
    ("demoted-target-took-over", DEMOTED, LeaderSeen(OTHER, 9), 100.5, Role.STANDBY, (DropConnections(),),
     "host-b took over (epoch 9)"),
    ("demoted-own-key-still", DEMOTED, LeaderSeen(ME, 8), 100.5, Role.DEMOTED, (), "waiting for host-b"),
    ("demoted-key-free", DEMOTED, LeaderVanished(8), 100.5, Role.DEMOTED, (), "waiting for host-b"),
    ("demoted-key-free-timeout", DEMOTED, LeaderVanished(8), 101.5, Role.STANDBY, (DropConnections(),),
     "did not complete"),
    ("demoted-etcd-unreachable", DEMOTED, EtcdUnreachable(since=100.0), 100.5, Role.DEMOTED, (),
     "waiting for host-b"),
    ("demoted-etcd-unreachable-timeout", DEMOTED, EtcdUnreachable(since=100.0), 101.0, Role.STANDBY,
     (DropConnections(),), "did not complete"),
    ("demoted-paused", DEMOTED, Paused(), 100.5, Role.DEMOTED, (), "paused"),
    ("demoted-resumed", DEMOTED, Resumed(), 100.5, Role.DEMOTED, (), "resumed"),
    ("demoted-switchover", DEMOTED, SwitchoverRequested(OTHER), 100.5, Role.DEMOTED, (), "ignored"),
]


@pytest.mark.parametrize("name,state,obs,now,role,actions,reason", CASES, ids=[c[0] for c in CASES])
def test_transition(name, state, obs, now, role, actions, reason):
    decision = decide(state, obs, now, CONFIG)
    assert isinstance(decision, Decision)
    assert decision.new_state.role is role
    assert decision.actions == actions
    assert reason in decision.reason, decision.reason
    assert decision.wake_at is not None and decision.wake_at > now or decision.new_state.role is Role.PRIMARY
    if role is not state.role:
        assert decision.new_state.since == now


def test_cases_reach_every_transition_in_the_table():
    """Every (role, observation, next role) that TRANSITIONS allows has a case above."""
    reached = {(c[1].role, type(c[2]), c[4]) for c in CASES}
    allowed = {(role, obs, target) for role, rules in d.TRANSITIONS.items()
               for obs, rule in rules.items() for target in rule.targets}
    assert allowed - reached == set()
    assert reached - allowed == set()


EXAMPLES = {Tick: Tick(), LeaseRenewed: LeaseRenewed(100.0), RenewFailed: RenewFailed(100.0),
            LeaderSeen: LeaderSeen(OTHER, 9), LeaderVanished: LeaderVanished(8),
            LeaderAcquired: LeaderAcquired(9, 90, 100.0), EtcdUnreachable: EtcdUnreachable(99.0),
            Paused: Paused(), Resumed: Resumed(), SwitchoverRequested: SwitchoverRequested(OTHER),
            d.FailsafeRequested: d.FailsafeRequested(OTHER, 7)}
STATES = {Role.STARTING: STARTING, Role.STANDBY: STANDBY, Role.PROMOTING: PROMOTING,
          Role.PRIMARY: PRIMARY, Role.FENCED: FENCED, Role.DEMOTED: DEMOTED}
ILLEGAL = [(role, obs) for role in Role for obs in d.OBSERVATIONS if obs not in d.TRANSITIONS[role]]


def test_examples_cover_every_observation_and_role():
    assert set(EXAMPLES) == set(d.OBSERVATIONS)
    assert set(STATES) == set(Role) == set(d.TRANSITIONS)


@pytest.mark.parametrize("role,obs", ILLEGAL, ids=[f"{r.name}-{o.__name__}" for r, o in ILLEGAL])
def test_illegal_transition_raises_and_leaves_state_unchanged(role, obs):
    state = STATES[role]
    machine = RoleMachine(CONFIG, clock=lambda: 100.25, state=state)
    with pytest.raises(IllegalTransition) as info:
        machine.observe(EXAMPLES[obs])
    assert machine.state is state
    assert info.value.role is role and isinstance(info.value.observation, obs)
    assert isinstance(info.value, TcpcpError)
    assert f"{role.name} + {obs.__name__}" in str(info.value)


def test_illegal_pairs_are_the_documented_ones():
    # a renewal is only meaningful with a lease; an acquisition only after asking for it
    assert set(ILLEGAL) == {
        (Role.STARTING, LeaseRenewed), (Role.STARTING, RenewFailed), (Role.STARTING, LeaderAcquired),
        (Role.STANDBY, LeaseRenewed), (Role.STANDBY, RenewFailed), (Role.STANDBY, LeaderAcquired),
        (Role.PROMOTING, LeaseRenewed), (Role.PROMOTING, RenewFailed),
        (Role.PRIMARY, LeaderAcquired), (Role.FENCED, LeaderAcquired),
        (Role.DEMOTED, LeaseRenewed), (Role.DEMOTED, RenewFailed), (Role.DEMOTED, LeaderAcquired)}


def test_inconsistent_observation_raises_and_leaves_state_unchanged():
    machine = RoleMachine(CONFIG, clock=lambda: 100.0, state=PROMOTING)
    with pytest.raises(IllegalTransition) as info:
        machine.observe(LeaderAcquired(epoch=7, revision=1, at=100.0))  # not above epoch 7
    assert machine.state is PROMOTING
    assert "not above the last known epoch 7" in info.value.reason


def test_machine_applies_decisions_with_an_injected_clock():
    now = [10.0]
    machine = RoleMachine(CONFIG, clock=lambda: now[0])
    assert machine.state.role is Role.STARTING and machine.state.since == 10.0
    assert machine.observe(LeaderVanished(None)).actions == (AcquireLeader(1),)
    now[0] = 10.01
    decision = machine.observe(LeaderAcquired(1, 5, at=10.0))
    assert decision.reason == "acquired the leader key as primary (epoch 1); no earlier epoch to resurrect"
    assert machine.state.role is Role.PRIMARY and machine.state.last_renew == 10.0
    now[0] = 10.125
    machine.observe(LeaseRenewed(at=10.125))
    now[0] = 10.5
    assert machine.observe(Tick()).new_state.role is Role.PRIMARY   # deadline is 10.625
    now[0] = 10.625
    decision = machine.observe(Tick())
    assert machine.state.role is Role.FENCED and decision.actions == FENCE


# -- fencing edges ------------------------------------------------------------------------------

@pytest.mark.parametrize("now,role", [(100.4999999, Role.PRIMARY), (100.5, Role.FENCED),
                                      (100.5000001, Role.FENCED), (101.0, Role.FENCED)])
def test_fencing_deadline_edge(now, role):
    assert CONFIG.fence_deadline(100.0) == 100.5
    for obs in (Tick(), RenewFailed(100.0), LeaderSeen(ME, 8), EtcdUnreachable(99.0), Paused()):
        assert decide(PRIMARY, obs, now, CONFIG).new_state.role is role, obs


def test_fencing_happens_strictly_before_the_lease_can_expire():
    for last in (0.0, 100.0, 12345.678):
        deadline = CONFIG.fence_deadline(last)
        assert deadline < last + CONFIG.lease_ttl
        assert last + CONFIG.lease_ttl - deadline >= 0.1


def test_primary_wakes_by_the_deadline():
    decision = decide(PRIMARY, Tick(), 100.45, CONFIG)
    assert decision.new_state.role is Role.PRIMARY and decision.wake_at == 100.5
    decision = decide(PRIMARY, LeaseRenewed(at=100.25), 100.3, CONFIG)
    assert decision.wake_at == 100.3 + CONFIG.renew_interval


def test_renew_failed_trusts_the_earlier_of_two_clocks():
    # The loop says the last good renewal was older than the state knew: fence by that one.
    decision = decide(PRIMARY, RenewFailed(last_ok=99.75), 100.25, CONFIG)
    assert decision.new_state.role is Role.FENCED
    # A newer last_ok than the state knew does not extend the deadline (no LeaseRenewed seen).
    decision = decide(PRIMARY, RenewFailed(last_ok=100.25), 100.5, CONFIG)
    assert decision.new_state.role is Role.FENCED


def test_no_quorum_freezes_the_lease_clock():
    # etcd without quorum lets no lease run down: a majority's no-leader answer at 100.375
    # counts as the lease being alive then.
    decision = decide(PRIMARY, EtcdUnreachable(since=100.125, failsafe_at=100.375), 100.75, CONFIG)
    assert decision.new_state.role is Role.PRIMARY
    assert decision.new_state.last_renew == 100.375
    assert decision.wake_at <= CONFIG.fence_deadline(100.375)


def test_reason_sentences_from_the_brief():
    decision = decide(PRIMARY, RenewFailed(last_ok=100.0), 100.62, CONFIG)
    assert decision.reason == "fenced: could not renew the lease for 0.62 s, lease expires in 0.38 s"
    decision = decide(st_(PROMOTING, epoch=6), LeaderAcquired(7, 1, at=100.0), 100.0, CONFIG)
    assert decision.reason.startswith("acquired the leader key as primary (epoch 7)")


# -- properties ---------------------------------------------------------------------------------

observations = st.one_of(
    st.just(Tick()),
    st.builds(LeaseRenewed, st.floats(0, 0.7)),
    st.builds(RenewFailed, st.floats(0, 0.7)),
    st.builds(LeaderSeen, st.sampled_from([ME, OTHER, THIRD]), st.integers(1, 12)),
    st.builds(LeaderVanished, st.none() | st.integers(1, 12)),
    st.builds(LeaderAcquired, st.integers(1, 14), st.integers(0, 9), st.floats(0, 0.7)),
    st.builds(EtcdUnreachable, st.floats(0, 3), st.none() | st.floats(0, 0.7)),
    st.just(Paused()), st.just(Resumed()),
    st.builds(SwitchoverRequested, st.sampled_from([ME, OTHER, THIRD])),
    st.builds(d.FailsafeRequested, st.sampled_from([OTHER, THIRD]), st.integers(1, 12), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.7), observations), max_size=40))
def test_random_sequences_keep_the_invariants(steps):
    """Times in observations are offsets back from now. Whatever happens: the role is one
    the table allows, a refused observation changes nothing, every decision says why,
    and a PRIMARY is always before its fencing deadline and wakes by it."""
    now = [1000.0]
    machine = RoleMachine(CONFIG, clock=lambda: now[0])
    for dt, obs in steps:
        now[0] += dt
        for name in ("at", "last_ok", "since", "failsafe_at"):
            if getattr(obs, name, None) is not None:
                obs = type(obs)(**{**obs.__dict__, name: now[0] - getattr(obs, name)})
        before = machine.state
        try:
            decision = machine.observe(obs)
        except IllegalTransition:
            assert machine.state is before
            continue
        state = decision.new_state
        assert state.role in d.TRANSITIONS[before.role][type(obs)].targets
        assert decision.reason and decision.reason[0].islower()
        assert decision.wake_at is not None and decision.wake_at >= now[0]
        if state.role is Role.PRIMARY:
            assert now[0] < CONFIG.fence_deadline(state.last_renew)
            assert decision.wake_at <= CONFIG.fence_deadline(state.last_renew)
            assert state.holder == ME
        names = [type(a) for a in decision.actions]
        assert not (FenceConnections in names and UnfenceConnections in names)


class ModelEtcd:
    """Leases and one leader key, as etcd keeps them: a lease expires ttl after its last
    keepalive *arrived*; the key goes with its lease; the epoch counter only grows."""

    def __init__(self, ttl: float):
        self.ttl, self.key, self.leases, self.counter, self.revision, self.next = ttl, None, {}, 0, 0, 1

    def expire(self, t):
        for lease, expiry in list(self.leases.items()):
            if expiry <= t:
                del self.leases[lease]
        if self.key and self.key[2] not in self.leases:
            self.key, self.revision = None, self.revision + 1

    def renew(self, lease, t):
        self.expire(t)
        if lease in self.leases:
            self.leases[lease] = t + self.ttl
            return True
        return False

    def time_left(self, lease, t):
        """What etcd's LeaseTimeToLive says: whole seconds, truncated toward zero."""
        return (int(self.leases[lease] - t), int(self.ttl)) if lease in self.leases else None

    def revoke(self, lease, t):
        self.expire(t)
        self.leases.pop(lease, None)
        self.expire(t)

    def acquire(self, host, epoch, t):
        self.expire(t)
        if self.key is not None or self.counter != epoch - 1:
            return None
        lease, self.next = self.next, self.next + 1
        self.leases[lease] = t + self.ttl
        self.key, self.counter, self.revision = (host, epoch, lease), epoch, self.revision + 1
        return lease


class SimHost:
    """The agent's loop, reduced: observe, decide, act, sleep until wake_at."""

    def __init__(self, name, etcd, clock):
        self.name, self.etcd, self.clock = name, etcd, clock
        self.machine = RoleMachine(CONFIG.replace(host_name=name), clock=clock)
        self.lease, self.connected, self.down_since, self.crashed, self.wake = None, True, None, False, 0.0

    def observe_world(self):
        t, role = self.clock(), self.machine.state.role
        if not self.connected:
            self.feed(EtcdUnreachable(since=self.down_since))
            if self.machine.state.role in (Role.PRIMARY, Role.FENCED):
                self.feed(RenewFailed(last_ok=self.machine.state.last_renew))
            return
        if role in (Role.PRIMARY, Role.FENCED):
            if self.etcd.renew(self.lease, t):
                self.feed(LeaseRenewed(at=t))
            else:
                self.feed(RenewFailed(last_ok=self.machine.state.last_renew))
        self.feed(self.key_observation())

    def key_observation(self):
        self.etcd.expire(self.clock())
        if self.etcd.key is None:
            return LeaderVanished(self.etcd.counter or None, self.etcd.revision)
        holder, epoch, lease = self.etcd.key
        left = self.etcd.time_left(lease, self.clock())
        if self.machine.state.role not in (Role.STANDBY, Role.STARTING) or left is None:
            return LeaderSeen(holder, epoch, self.etcd.revision)
        return LeaderSeen(holder, epoch, self.etcd.revision, lease_id=lease,
                          ttl_left=left[0], ttl_granted=left[1])

    def feed(self, obs):
        decision = self.machine.observe(obs)
        self.wake = decision.wake_at
        for action in decision.actions:
            if isinstance(action, d.RevokeLapsedLease):
                if self.connected:
                    self.etcd.revoke(action.lease_id, self.clock())
                    self.feed(self.key_observation())
            if isinstance(action, AcquireLeader):
                t = self.clock()
                if not self.connected:
                    self.feed(EtcdUnreachable(since=self.down_since))
                    continue
                lease = self.etcd.acquire(self.name, action.epoch, t)
                if lease is None:
                    self.feed(self.key_observation())
                else:
                    self.lease = lease
                    self.feed(LeaderAcquired(action.epoch, self.etcd.revision, at=t))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 2.5), st.integers(0, 2),
                          st.sampled_from(["down", "up", "up", "crash"])), max_size=12))
def test_two_hosts_never_speak_for_one_connection(events):
    """Three hosts, a model etcd, random partitions from etcd and crashes. At every
    moment, a PRIMARY holds the leader key under a lease etcd still keeps alive, so at
    most one host is PRIMARY; and once the survivors reach etcd again, one of them is."""
    now = [0.0]
    etcd = ModelEtcd(d.granted_ttl(CONFIG))   # the standby ends leases at lease_ttl
    hosts = [SimHost(n, etcd, lambda: now[0]) for n in (ME, OTHER, THIRD)]
    timeline, t = [], 0.0
    for dt, index, what in events:
        t += dt
        timeline.append((t, index, what))
    end = t + 4.0
    timeline.append((t + 0.001, None, "all-up"))

    def check():
        etcd.expire(now[0])
        speaking = [h for h in hosts if not h.crashed and h.machine.state.role is Role.PRIMARY]
        assert len(speaking) <= 1, [h.name for h in speaking]
        for h in speaking:
            assert etcd.key is not None and etcd.key[0] == h.name and etcd.key[2] == h.lease
            assert h.wake <= CONFIG.fence_deadline(h.machine.state.last_renew) < etcd.leases[h.lease]

    while now[0] < end:
        live = [h for h in hosts if not h.crashed]
        next_host = min(live, key=lambda h: h.wake, default=None)
        next_event = timeline[0][0] if timeline else end
        if next_host is None or next_event <= next_host.wake:
            now[0] = next_event
            if not timeline:
                break
            _, index, what = timeline.pop(0)
            for h in (hosts if index is None else [hosts[index]]):
                if what == "crash":
                    h.crashed = True
                elif what == "down" and h.connected:
                    h.connected, h.down_since = False, now[0]
                elif what in ("up", "all-up"):
                    h.connected, h.down_since = True, None
        else:
            now[0] = max(now[0], next_host.wake)
            next_host.observe_world()
        check()
    if any(not h.crashed for h in hosts):
        assert sum(h.machine.state.role is Role.PRIMARY for h in hosts if not h.crashed) == 1


# -- docs are drawn from the table ---------------------------------------------------------------

def test_docs_embed_the_transition_table():
    assert d.transition_table() in DOCS.read_text()


def test_table_lists_every_role_and_observation():
    table = d.transition_table()
    for role in Role:
        assert role.name in table.splitlines()[0]
    for obs in d.OBSERVATIONS:
        assert f"| {obs.__name__} |" in table


# -- the bounds ----------------------------------------------------------------------------------

MSL_NS = 120 * 10**9
NOW = 1_800_000_000 * 10**9


def meta(**changes):
    base = dict(epoch=7, wall_ns=NOW - 10**9, bytes_in=1000, bytes_out=2000)
    return RecordMeta(**{**base, **changes})


def test_may_resurrect_a_fresh_checkpoint():
    ok, reason = may_resurrect(meta(), NOW, CONFIG, epoch=7)
    assert ok and reason == ("checkpoint of epoch 7 is 1.000 s old with 1000/2000 bytes in/out "
                             "since the previous one: may be resurrected")


@pytest.mark.parametrize("age_ns,ok", [(MSL_NS - 1, True), (MSL_NS, True), (MSL_NS + 1, False)])
def test_msl_edge(age_ns, ok):
    verdict, reason = may_resurrect(meta(wall_ns=NOW - age_ns), NOW, CONFIG, epoch=7)
    assert verdict is ok
    if not ok:
        assert "beyond the MSL of 120 s" in reason


@pytest.mark.parametrize("age_ns,ok", [(MSL_NS - 500_000_000, True), (MSL_NS - 499_999_999, False)])
def test_msl_counts_the_clock_skew(age_ns, ok):
    config = CONFIG.replace(clock_skew=0.5)
    assert may_resurrect(meta(wall_ns=NOW - age_ns), NOW, config, epoch=7)[0] is ok


@pytest.mark.parametrize("ahead_ns,ok", [(0, True), (500_000_000, True), (500_000_001, False)])
def test_checkpoint_from_the_future(ahead_ns, ok):
    config = CONFIG.replace(clock_skew=0.5)
    verdict, reason = may_resurrect(meta(wall_ns=NOW + ahead_ns), NOW, config, epoch=7)
    assert verdict is ok
    if not ok:
        assert "in the future" in reason


@pytest.mark.parametrize("field", ["bytes_in", "bytes_out"])
@pytest.mark.parametrize("moved,ok", [(BYTES_BOUND - 1, True), (BYTES_BOUND, False), (1 << 40, False)])
def test_bytes_bound_edge(field, moved, ok):
    verdict, reason = may_resurrect(meta(**{field: moved}), NOW, CONFIG, epoch=7)
    assert verdict is ok
    if not ok:
        assert "reach 2^31" in reason and str(moved) in reason


def test_epoch_mismatch_refused():
    ok, reason = may_resurrect(meta(epoch=6), NOW, CONFIG, epoch=7)
    assert not ok and reason == "refused: the record belongs to epoch 6, not epoch 7"


def test_authentication_is_checked_first():
    bad = meta(authenticated=False, auth_detail="tag mismatch", epoch=1, wall_ns=0, bytes_in=1 << 40)
    ok, reason = may_resurrect(bad, NOW, CONFIG, epoch=7)
    assert not ok and reason == "refused: the record failed authentication: tag mismatch"


def test_needs_checkpoint_when_never_checkpointed():
    assert needs_checkpoint(ConnStats(0, 0, None), NOW, CONFIG)[0]


@pytest.mark.parametrize("field", ["bytes_in", "bytes_out"])
def test_needs_checkpoint_on_bytes(field):
    limit = CONFIG.checkpoint_bytes
    below = ConnStats(**{"bytes_in": 0, "bytes_out": 0, field: limit - 1}, last_checkpoint_ns=NOW)
    at = ConnStats(**{"bytes_in": 0, "bytes_out": 0, field: limit}, last_checkpoint_ns=NOW)
    assert needs_checkpoint(below, NOW, CONFIG) == (
        False, f"0.000 s and {below.bytes_in}/{below.bytes_out} bytes in/out since the last "
               "checkpoint: not yet")
    forced, reason = needs_checkpoint(at, NOW, CONFIG)
    assert forced and "well before 2^31" in reason
    assert limit < CONFIG.max_bytes < BYTES_BOUND


@pytest.mark.parametrize("elapsed_ns,forced", [(5 * 10**9 - 1, False), (5 * 10**9, True)])
def test_needs_checkpoint_on_interval(elapsed_ns, forced):
    stats = ConnStats(10, 10, last_checkpoint_ns=NOW - elapsed_ns)
    verdict, reason = needs_checkpoint(stats, NOW, CONFIG)
    assert verdict is forced
    if forced:
        assert reason == "5.000 s since the last checkpoint (interval 5 s): checkpoint now"


def test_output_budget():
    assert output_budget(ConnStats(0, 0, NOW), CONFIG) == CONFIG.max_bytes
    assert output_budget(ConnStats(0, CONFIG.max_bytes - 10, NOW), CONFIG) == 10
    assert output_budget(ConnStats(0, CONFIG.max_bytes + 10, NOW), CONFIG) == 0


# -- a lapsed lease, seen by etcd's clock ---------------------------------------------------------

@pytest.mark.parametrize("left, granted, lapsed", [
    (None, 2, False), (1, 2, False), (0, 2, True), (-1, 2, True), (1, 3, True), (2, 3, False),
    (0, None, False)])
def test_lease_lapsed_edges(left, granted, lapsed):
    """lease_ttl 1, granted 2: a reading of 0 means under 1 s left, so over 1 s since the
    renewal etcd processed; a reading of 1 may be 1.99 s left."""
    assert d.lease_lapsed(left, granted, CONFIG) is lapsed


@pytest.mark.parametrize("ttl, granted", [(1.0, 2), (1.5, 3), (5.0, 6)])
def test_granted_ttl_is_a_whole_second_more(ttl, granted):
    assert d.granted_ttl(CONFIG.replace(lease_ttl=ttl, fence_margin=0.3, renew_interval=0.1,
                                        retry_timeout=0.1)) == granted


def test_standby_revokes_a_lapsed_lease_unless_paused():
    standby = st_(STARTING, role=Role.STANDBY, holder=OTHER, epoch=3)
    seen = LeaderSeen(OTHER, 3, 10, lease_id=77, ttl_left=0, ttl_granted=2)
    decision = decide(standby, seen, 5.0, CONFIG)
    assert decision.actions == (d.RevokeLapsedLease(77, OTHER, 3),)
    assert decision.new_state.role is Role.STANDBY and "revoking" in decision.reason
    paused = decide(st_(standby, paused=True), seen, 5.0, CONFIG)
    assert paused.actions == () and "paused" in paused.reason
    alive = decide(standby, LeaderSeen(OTHER, 3, 10, lease_id=77, ttl_left=1, ttl_granted=2), 5.0, CONFIG)
    assert alive.actions == ()
