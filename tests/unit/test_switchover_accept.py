"""The destination side of a switchover by passing (checkpointd/switchover.py), root-free.

``accept(agent, blob)`` (``POST /pass``) against a minimal fake agent: every refusal
raises ``passwire.PassRefused`` with its metric ``reason`` and touches nothing (no
kernel call: ``kernel.repair``'s functions are replaced by tripwires; no nonce kept, no
incoming pass, no isolation): a host that is not a standby, a pass from another epoch or
origin than the leader this host follows, a connection whose local address is not one
of network.vips, a replayed nonce, a stale message, a message for another host. An
accepted pass with nothing live isolates exactly the tuples of its by-checkpoint keys,
and a newer pass supersedes an older one. ``_tuple_of_key`` and ``drop_incoming``
directly.

Defects these tests found were fixed; each test now guards against its return.
"""

from __future__ import annotations

import threading
from ipaddress import IPv4Address, IPv6Address
from types import SimpleNamespace

import pytest

from checkpointd import switchover
from checkpointd.agent import Agent
from checkpointd.config import Config
from checkpointd.decide import HAState, Role, RoleMachine
from checkpointd.passwire import Pass, PassRefused, seal
from kernel import repair
from kernel.errors import TcpcpError

from test_passwire import NOW, RING, forge, good_header, key_of, make_ici, passed, plaintext

CLUSTER, ORIGIN, ME, OTHER = "prod", "host-a", "host-b", "host-c"
VIP4, VIP6 = "10.0.0.100", "fd00::100"
EPOCH = 7
SECOND = 10**9

# lease 1 s, no clock skew: a pass is fresh for 1 s either way
CONFIG = Config(cluster_name=CLUSTER, host_name=ME, etcd_endpoints=("http://127.0.0.1:2379",),
                key_file="/etc/tcpcp/k", vips=(VIP4, VIP6), interface="eth0",
                lease_ttl=1.0, renew_interval=0.125, retry_timeout=0.125, fence_margin=0.5,
                checkpoint_interval=5.0, commit_interval=0.01, msl=120.0, clock_skew=0.0,
                unprotected_grace=2.0)

KEY4 = "10.0.0.100:80-10.0.0.1:5555"
KEY6 = "[fd00::100]:80-[fd00::1]:5555"
TUPLE4 = ("10.0.0.100", 80, "10.0.0.1", 5555)
TUPLE6 = ("fd00::100", 80, "fd00::1", 5555)


class FakeIsolation:
    def __init__(self):
        self.calls: list[tuple[str, list]] = []

    def isolate(self, tuples):
        self.calls.append(("isolate", list(tuples)))

    def release(self, tuples):
        self.calls.append(("release", list(tuples)))


class FakeGuard:
    def __init__(self):
        self.removed = 0

    def remove(self):
        self.removed += 1


class FakeAgent:
    """What ``switchover.accept`` and ``drop_incoming`` use, and nothing else."""

    def __init__(self, state: HAState | None = None, config: Config = CONFIG):
        self.config = config
        self.keyring = RING
        self.machine = RoleMachine(config, clock=lambda: 100.0, state=state or standby())
        self.ha_lock = threading.Lock()
        self.lock = threading.RLock()
        self.now_ns = NOW
        self.pass_nonces: set[str] = set()
        self.incoming = None
        self.isolation = FakeIsolation()
        self.notes: list[str] = []
        self.metrics = None          # for Agent.on_pass
        self.guarded: list = []      # _guard calls (only reached when connections are live)

    def _guard(self, tup, commit_seq: int, wscale: int, *, keep_sack: bool = False):
        self.guarded.append((tup, commit_seq, wscale))
        assert keep_sack, "a passed endpoint keeps SACK until shortly after activation"
        return FakeGuard()

    def wall(self) -> int:
        return self.now_ns

    def clock(self) -> float:
        return 100.0

    def note(self, text: str) -> None:
        self.notes.append(text)


def standby(holder: str | None = ORIGIN, epoch: int | None = EPOCH) -> HAState:
    return HAState(Role.STANDBY, since=0.0, epoch=epoch, holder=holder)


def make_pass(*conns, **changes) -> Pass:
    f = dict(cluster=CLUSTER, origin=ORIGIN, target=ME, epoch=EPOCH, wall_ns=NOW,
             conns=conns, by_checkpoint=())
    f.update(changes)
    return Pass(**f)


def at_vip(port: int, *, v6: bool = False):
    """A passed connection whose local address is one of CONFIG's VIPs."""
    ici = make_ici(port, v6=v6, recv=b"req", sent=b"resp")
    ici = ici.replace(local_addr=IPv6Address(VIP6) if v6 else IPv4Address(VIP4))
    return passed(ici, input=100, output=50, write=50, durable_input=90), ici


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """Every kernel entry point switchover uses is a tripwire; ``calls`` records any touch."""
    calls = []

    def tripwire(name):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            raise AssertionError(f"kernel.repair.{name} called")
        return call
    for name in ("restore", "close_silently", "activate", "repair_on", "repair_off", "dump"):
        monkeypatch.setattr(repair, name, tripwire(name))
    return calls


def refused(agent: FakeAgent, blob: bytes, reason: str, no_kernel: list) -> str:
    before = (set(agent.pass_nonces), agent.incoming, list(agent.isolation.calls))
    with pytest.raises(PassRefused) as info:
        switchover.accept(agent, blob)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value).startswith(f"pass refused: {reason}: ")
    assert no_kernel == []
    assert (agent.pass_nonces, agent.incoming, agent.isolation.calls) == before
    return str(info.value)


# -- not a standby -------------------------------------------------------------------------------

@pytest.mark.parametrize("state", [
    HAState(Role.PRIMARY, since=50.0, epoch=8, holder=ME, last_renew=100.0),
    HAState(Role.PROMOTING, since=99.0, epoch=EPOCH),
    HAState(Role.PROMOTING, since=99.0, epoch=EPOCH, holder=ORIGIN),
    HAState(Role.FENCED, since=100.5, epoch=8, holder=ME, last_renew=100.0),
    HAState(Role.DEMOTED, since=100.0, epoch=8, holder=ME, last_renew=100.0,
            switchover_to=OTHER, switchover_at=100.0),
    HAState(Role.STARTING, since=0.0),
], ids=lambda s: s.role.value)
def test_refused_when_not_a_standby(state, no_kernel):
    agent = FakeAgent(state)
    c, _ = at_vip(1001)
    blob = seal(make_pass(c, by_checkpoint=(KEY4,)), RING)   # otherwise a good pass
    msg = refused(agent, blob, "target", no_kernel)
    assert f"this host is {state.role.value}, not a standby" in msg


def test_refused_when_not_a_standby_even_with_zero_connections(no_kernel):
    agent = FakeAgent(HAState(Role.PRIMARY, since=50.0, epoch=EPOCH, holder=ORIGIN))
    refused(agent, seal(make_pass(), RING), "target", no_kernel)


# -- the leader this host follows -----------------------------------------------------------------

@pytest.mark.parametrize("state, p", [
    pytest.param(standby(), make_pass(epoch=EPOCH + 1), id="newer-epoch"),
    pytest.param(standby(), make_pass(epoch=EPOCH - 1), id="older-epoch"),
    pytest.param(standby(), make_pass(origin=OTHER), id="other-origin"),
    pytest.param(standby(), make_pass(origin=OTHER, epoch=EPOCH + 1), id="both"),
    pytest.param(standby(holder=None), make_pass(), id="follows-nobody"),
    pytest.param(standby(epoch=None), make_pass(), id="no-epoch-known"),
    pytest.param(standby(holder=ME), make_pass(), id="follows-itself"),
])
def test_refused_for_another_epoch_or_origin(state, p, no_kernel):
    agent = FakeAgent(state)
    msg = refused(agent, seal(p, RING), "epoch", no_kernel)
    assert f"from {p.origin} in epoch {p.epoch}" in msg


def test_refused_for_another_epoch_with_live_connections(no_kernel):
    c, _ = at_vip(1101)
    refused(FakeAgent(), seal(make_pass(c, epoch=EPOCH + 1), RING), "epoch", no_kernel)


# -- network.vips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("v6", [False, True])
def test_refused_when_the_local_address_is_not_a_vip(v6, no_kernel):
    ici = make_ici(1201, v6=v6)                      # local 10.0.0.10 / fd00::10: not VIPs
    msg = refused(FakeAgent(), seal(make_pass(passed(ici)), RING), "target", no_kernel)
    assert "is not one of network.vips" in msg and key_of(ici) in msg


def test_one_connection_off_the_vips_refuses_all_before_any_restore(no_kernel):
    good = [at_vip(1300 + n, v6=n % 2 == 1)[0] for n in range(4)]
    bad = passed(make_ici(1399))
    msg = refused(FakeAgent(), seal(make_pass(*good, bad), RING), "target", no_kernel)
    assert key_of(make_ici(1399)) in msg


def test_the_other_family_vip_is_not_enough(no_kernel):
    """A VIP of the other family or a neighbouring address does not count."""
    cfg = CONFIG.replace(vips=(VIP4,))
    _, ici6 = at_vip(1401, v6=True)
    refused(FakeAgent(config=cfg), seal(make_pass(passed(ici6)), RING), "target", no_kernel)
    near = make_ici(1402).replace(local_addr=IPv4Address("10.0.0.101"))
    refused(FakeAgent(), seal(make_pass(passed(near)), RING), "target", no_kernel)


# -- replay -------------------------------------------------------------------------------------------

def test_second_use_of_a_nonce_is_a_replay(no_kernel):
    agent = FakeAgent()
    p = make_pass()                                   # nothing live, nothing by checkpoint
    blob = seal(p, RING)
    answer = switchover.accept(agent, blob)
    assert answer == {"ok": True, "host": ME, "accepted": 0, "by_checkpoint": 0}
    assert agent.pass_nonces == {p.nonce}
    first = agent.incoming
    assert isinstance(first, switchover.Incoming)
    assert first.pass_ == p and first.items == []
    assert first.until == 100.0 + 2 * CONFIG.lease_ttl
    assert agent.isolation.calls == []                # no tuple to isolate
    assert no_kernel == []
    assert any(f"pass from {ORIGIN}" in n for n in agent.notes)
    # the very same message again
    assert p.nonce in refused(agent, blob, "replay", no_kernel)
    # the same pass sealed anew (fresh salt and AES nonce, same pass nonce)
    refused(agent, seal(p, RING), "replay", no_kernel)
    assert agent.incoming is first and agent.pass_nonces == {p.nonce}


def test_a_refused_pass_does_not_burn_its_nonce(no_kernel):
    """Refused for the epoch (this host was behind), then accepted once it follows."""
    p = make_pass()
    blob = seal(p, RING)
    agent = FakeAgent(standby(epoch=EPOCH - 1))
    refused(agent, blob, "epoch", no_kernel)
    agent.machine.state = standby()
    assert switchover.accept(agent, blob)["ok"] is True
    assert agent.pass_nonces == {p.nonce}


def test_replay_check_comes_after_the_leader_check(no_kernel):
    """A replayed nonce from a pass this host would refuse anyway says why it is refused."""
    agent = FakeAgent()
    p = make_pass()
    switchover.accept(agent, seal(p, RING))
    agent.machine.state = standby(epoch=EPOCH + 1)
    refused(agent, seal(p, RING), "epoch", no_kernel)


# -- freshness -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("wall_ns", [NOW - SECOND - 1000, NOW + SECOND + 1000, NOW - 3600 * SECOND, 0],
                         ids=["just-too-old", "just-too-new", "an-hour-old", "epoch-zero"])
def test_stale_message(wall_ns, no_kernel):
    msg = refused(FakeAgent(), seal(make_pass(wall_ns=wall_ns), RING), "stale", no_kernel)
    assert "at most 1 s accepted" in msg


def test_stale_by_the_receivers_clock(no_kernel):
    blob = seal(make_pass(), RING)
    agent = FakeAgent()
    agent.now_ns = NOW + 2 * SECOND
    refused(agent, blob, "stale", no_kernel)
    agent.now_ns = NOW + SECOND                       # exactly lease_ttl + clock_skew: fresh
    assert switchover.accept(agent, blob)["ok"] is True


def test_max_age_is_lease_ttl_plus_clock_skew(no_kernel):
    cfg = CONFIG.replace(clock_skew=0.5)
    blob = seal(make_pass(wall_ns=NOW - int(1.4 * SECOND)), RING)
    refused(FakeAgent(), blob, "stale", no_kernel)
    assert switchover.accept(FakeAgent(config=cfg), blob)["ok"] is True


# -- another target, another cluster, tampering -----------------------------------------------------

def test_message_for_another_target_host(no_kernel):
    """The target is bound by the associated data: a pass for host-c does not open here."""
    msg = refused(FakeAgent(), seal(make_pass(target=OTHER), RING), "authentication", no_kernel)
    assert "another cluster or host" in msg
    refused(FakeAgent(), seal(make_pass(cluster="staging"), RING), "authentication", no_kernel)


def test_authenticated_header_naming_another_target(no_kernel):
    """Only a broken origin can seal for this host a header that names another one."""
    blob = forge(plaintext(good_header(target=OTHER)), target=ME)
    assert f"addressed to {OTHER}" in refused(FakeAgent(), blob, "target", no_kernel)
    blob = forge(plaintext(good_header(target=ME)), target=ME)
    assert switchover.accept(FakeAgent(), blob)["ok"] is True       # the forge is faithful


def test_tampered_or_garbage(no_kernel):
    blob = bytearray(seal(make_pass(), RING))
    blob[-1] ^= 1
    refused(FakeAgent(), bytes(blob), "authentication", no_kernel)
    refused(FakeAgent(), b"", "format", no_kernel)
    refused(FakeAgent(), b"not a pass at all", "format", no_kernel)


def test_on_pass_answers_a_refusal_with_its_reason(no_kernel):
    agent = FakeAgent(HAState(Role.PRIMARY, since=50.0, epoch=8, holder=ME, last_renew=100.0))
    answer = Agent.on_pass(agent, seal(make_pass(), RING))
    assert answer["ok"] is False and answer["reason"] == "target"
    assert answer["error"].startswith("pass refused: target: ")
    # (the note reads "pass refused: pass refused: target: ...": agent.py's on_pass adds
    # the prefix PassRefused already has; cosmetic)
    assert any(n.endswith(answer["error"]) for n in agent.notes)
    assert no_kernel == [] and agent.incoming is None and agent.pass_nonces == set()


# -- by checkpoint: isolation -------------------------------------------------------------------------

def test_accepted_pass_isolates_its_by_checkpoint_tuples_ipv4(no_kernel):
    agent = FakeAgent()
    keys = (KEY4, "10.0.0.100:80-10.0.0.2:6000")
    p = make_pass(by_checkpoint=keys)
    answer = switchover.accept(agent, seal(p, RING))
    assert answer == {"ok": True, "host": ME, "accepted": 0, "by_checkpoint": 2}
    assert agent.isolation.calls == [("isolate", [TUPLE4, ("10.0.0.100", 80, "10.0.0.2", 6000)])]
    assert agent.incoming.pass_ == p and agent.incoming.items == []
    assert no_kernel == []


def test_accepted_pass_isolates_its_by_checkpoint_tuples_ipv4_and_ipv6(no_kernel):
    agent = FakeAgent()
    answer = switchover.accept(agent, seal(make_pass(by_checkpoint=(KEY4, KEY6)), RING))
    assert answer["by_checkpoint"] == 2
    assert agent.isolation.calls == [("isolate", [TUPLE4, TUPLE6])]
    assert no_kernel == []


def test_a_newer_pass_supersedes_the_older_one(no_kernel):
    agent = FakeAgent()
    first, second = make_pass(by_checkpoint=(KEY4,)), make_pass(by_checkpoint=("10.0.0.100:81-10.0.0.1:1",))
    switchover.accept(agent, seal(first, RING))
    switchover.accept(agent, seal(second, RING))
    assert agent.isolation.calls == [("isolate", [TUPLE4]), ("release", [TUPLE4]),
                                     ("isolate", [("10.0.0.100", 81, "10.0.0.1", 1)])]
    assert agent.incoming.pass_ == second
    assert agent.pass_nonces == {first.nonce, second.nonce}
    assert any("superseded by a newer pass" in n for n in agent.notes)
    assert no_kernel == []


# -- live connections, with stand-ins for the kernel (positive controls for the tripwires) -----------

def test_accepted_pass_restores_every_connection_in_repair_mode(monkeypatch, no_kernel):
    made = []

    def restore(ici, **kwargs):
        made.append((ici, kwargs))
        return SimpleNamespace(sock=f"sock-{len(made)}")
    monkeypatch.setattr(repair, "restore", restore)
    (c4, i4), (c6, i6) = at_vip(1501), at_vip(1502, v6=True)
    agent = FakeAgent()
    answer = switchover.accept(agent, seal(make_pass(c4, c6), RING))
    assert answer == {"ok": True, "host": ME, "accepted": 2, "by_checkpoint": 0}
    assert [ici for ici, _ in made] == [i4, i6]
    assert all(kw["freebind"] is True and kw["validated"] is True for _, kw in made)
    assert [kw["peer_acked"] for _, kw in made] == [i4.snd_una, i6.snd_una]   # no probe answer
    assert [(pc.key, ici) for pc, ici, _ in agent.incoming.items] == [(c4.key, i4), (c6.key, i6)]
    # each behind the ACK gate, from the newest durable input (R - durable = 10 bytes back)
    assert [(t, seq) for t, seq, _ in agent.guarded] == [
        (("10.0.0.100", 8080, "10.0.0.99", 1501), (i4.copied_seq - 10) & 0xFFFFFFFF),
        (("fd00::100", 8080, "fd00::99", 1502), (i6.copied_seq - 10) & 0xFFFFFFFF)]
    assert len(agent.incoming.guards) == 2


def test_a_failed_restore_closes_what_was_made(monkeypatch, no_kernel):
    closed = []

    def restore(ici, **kwargs):
        if ici.remote_port == 1602:
            raise TcpcpError("restore failed")
        return SimpleNamespace(sock=f"sock-{ici.remote_port}")
    monkeypatch.setattr(repair, "restore", restore)
    monkeypatch.setattr(repair, "close_silently", closed.append)
    agent = FakeAgent()
    with pytest.raises(TcpcpError):
        switchover.accept(agent, seal(make_pass(at_vip(1601)[0], at_vip(1602)[0]), RING))
    assert closed == ["sock-1601"]
    assert agent.incoming is None and agent.isolation.calls == [] and agent.guarded == []


# -- _tuple_of_key -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, want", [
    (KEY4, TUPLE4),
    ("192.0.2.1:65535-198.51.100.2:1", ("192.0.2.1", 65535, "198.51.100.2", 1)),
])
def test_tuple_of_key_ipv4(key, want):
    assert switchover._tuple_of_key(key) == want


@pytest.mark.parametrize("key, want", [
    (KEY6, TUPLE6),
    ("[2001:db8::1]:443-[2001:db8::2]:60000", ("2001:db8::1", 443, "2001:db8::2", 60000)),
])
def test_tuple_of_key_ipv6(key, want):
    assert switchover._tuple_of_key(key) == want


@pytest.mark.parametrize("key", [
    "", "garbage", "10.0.0.100:80", "10.0.0.100:80-", "-10.0.0.1:5555", "10.0.0.100-10.0.0.1",
    "10.0.0.100:http-10.0.0.1:5555", "10.0.0.100:80-10.0.0.1:", "10.0.0.100:80-10.0.0.1:x",
    "[fd00::100]:80", "[fd00::100]-[fd00::1]", "[fd00::100]:x-[fd00::1]:5555",
    "10.0.0.100:80-10.0.0.1:0", "10.0.0.100:99999-10.0.0.1:5555", "foo:80-bar:90",
    "[not-an-address]:80-[fd00::1]:5555", "10.0.0.100:80-[fd00::1]:5555x",
])
def test_tuple_of_key_malformed(key):
    assert switchover._tuple_of_key(key) is None


def test_tuple_of_key_agrees_with_conn_key_ipv4():
    ici = make_ici(5555)
    assert switchover._tuple_of_key(key_of(ici)) == ("10.0.0.10", 8080, "10.0.0.99", 5555)


# -- drop_incoming -------------------------------------------------------------------------------------

def incoming_with(socks, by_checkpoint, guards=None):
    items = [(passed(make_ici(6000 + n)), make_ici(6000 + n), SimpleNamespace(sock=s))
             for n, s in enumerate(socks)]
    return switchover.Incoming(make_pass(by_checkpoint=by_checkpoint), items, until=0.0,
                               guards=guards if guards is not None else [])


def test_drop_incoming_releases_and_closes_silently_ipv4(monkeypatch, no_kernel):
    closed = []
    monkeypatch.setattr(repair, "close_silently", closed.append)
    agent = FakeAgent()
    socks = [object(), object(), object()]
    guards = [FakeGuard(), None, FakeGuard()]
    switchover.drop_incoming(agent, incoming_with(socks, (KEY4,), guards), "the takeover did not come")
    assert closed == socks
    assert [g.removed for g in guards if g is not None] == [1, 1]
    assert agent.isolation.calls == [("release", [TUPLE4])]
    assert any("dropped 3 passed endpoints from host-a: the takeover did not come" in n
               for n in agent.notes)


def test_drop_incoming_nothing_to_close(monkeypatch, no_kernel):
    closed = []
    monkeypatch.setattr(repair, "close_silently", closed.append)
    agent = FakeAgent()
    switchover.drop_incoming(agent, incoming_with([], ()), "why")
    assert closed == [] and agent.isolation.calls == [("release", [])]


def test_drop_incoming_releases_ipv6_tuples(monkeypatch, no_kernel):
    closed = []
    monkeypatch.setattr(repair, "close_silently", closed.append)
    agent = FakeAgent()
    sock = object()
    switchover.drop_incoming(agent, incoming_with([sock], (KEY4, KEY6)), "superseded")
    assert closed == [sock]
    assert agent.isolation.calls == [("release", [TUPLE4, TUPLE6])]
