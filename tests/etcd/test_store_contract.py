"""The CheckpointStore contract, one module run against every backend.

``memory`` runs everywhere (fake clock); ``etcd`` starts a real etcd 3.4 (marker ``etcd``).
Each test works in a cluster name of its own, so one etcd serves the whole module. Waits
poll with deadlines; the only sleeps are where a test must let real time pass (renewal).
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest

from checkpointd.store import base
from checkpointd.store.errors import (BatchTooLarge, InvalidKey, NotLeader, StoreError,
                                      StoreUnavailable)
from checkpointd.store.keyring import Keyring
from checkpointd.store.memory import FakeClock, MemoryCluster, MemoryStore
from checkpointd.store.record import CheckpointRecord, open_many, seal

from etcdproc import free_port, wait_until

TIMEOUT = 1.0            # the etcd store's per-call timeout in these tests
SLACK = 1.5              # a shared 2-core machine: margin on every time bound
TTL = 2                  # short leases, yet long enough for a loaded machine's next call


class MemoryHarness:
    def __init__(self, request):
        self.clock = FakeClock()
        self.cluster = MemoryCluster(self.clock)

    def store(self, cluster: str) -> MemoryStore:
        return MemoryStore(self.cluster, cluster)

    def unreachable_store(self, cluster: str) -> MemoryStore:
        down = MemoryCluster(self.clock)
        down.down = True
        return MemoryStore(down, cluster)

    def let_lease_expire(self, store, lease) -> None:
        self.clock.advance(lease.ttl)

    def pass_time(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @contextlib.contextmanager
    def outage(self):
        self.cluster.down = True
        try:
            yield
        finally:
            self.cluster.down = False


class EtcdHarness:
    def __init__(self, request):
        self.server = request.getfixturevalue("etcd_server")
        self.outage = request.getfixturevalue("suspended")
        self.stores = []
        request.addfinalizer(lambda: [s.close() for s in self.stores])

    def _keep(self, store):
        self.stores.append(store)
        return store

    def store(self, cluster: str):
        from checkpointd.store.etcd import EtcdStore
        # page_size 3: every multi-record read in the contract crosses pages
        return self._keep(EtcdStore([self.server.endpoint], cluster, timeout=TIMEOUT,
                                    time_retry=0.5, page_size=3))

    def unreachable_store(self, cluster: str):
        from checkpointd.store.etcd import EtcdStore
        return self._keep(EtcdStore([f"127.0.0.1:{free_port()}"], cluster, timeout=TIMEOUT))

    def let_lease_expire(self, store, lease) -> None:
        wait_until(lambda: store.leader().lease_id != lease.id, lease.ttl + 10, "expired")

    def pass_time(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def harness(request):
    return {"memory": MemoryHarness, "etcd": EtcdHarness}[request.param](request)


@pytest.fixture
def cluster():
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def a(harness, cluster):
    return harness.store(cluster)


@pytest.fixture
def b(harness, cluster):
    return harness.store(cluster)


def items(n: int, tag: str = "v", prefix: str = "c") -> dict[str, bytes]:
    return {f"{prefix}{i:03d}": f"{tag}{i}".encode() for i in range(n)}


# -- leadership and epochs -------------------------------------------------------------------------
def test_fresh_cluster_has_no_leader_and_epoch_0(a):
    state = a.leader()
    assert state.vacant and state.epoch == 0 and state.lease_id == 0


def test_only_one_contender_acquires(a, b):
    lease = a.acquire_leader("host-a", TTL)
    assert lease is not None and lease.epoch == 1 and lease.name == "host-a"
    assert b.acquire_leader("host-b", TTL) is None
    assert a.acquire_leader("host-a", TTL) is None          # held, even by this name
    state = b.leader()
    assert (state.name, state.epoch, state.lease_id) == ("host-a", 1, lease.id)


def test_epoch_increments_on_every_takeover(harness, a, b):
    first = a.acquire_leader("host-a", TTL)
    harness.let_lease_expire(a, first)
    assert b.leader().vacant and b.leader().epoch == 1    # the last leader's epoch stays
    second = b.acquire_leader("host-b", TTL)
    assert second.epoch == 2
    b.resign(second)
    third = a.acquire_leader("host-a", TTL)
    assert third.epoch == 3 and a.leader().epoch == 3


def test_renew_keeps_the_lease_and_fails_once_it_expired(harness, a, b):
    lease = a.acquire_leader("host-a", TTL)
    for _ in range(6):                   # 3 s of renewing every 0.5 s outlives a 2 s TTL
        harness.pass_time(0.5)
        assert a.renew(lease) >= 1
    a.put_many(items(1), leader_lease=lease)
    harness.let_lease_expire(a, lease)
    with pytest.raises(NotLeader):
        a.renew(lease)


def test_resign_frees_the_key_and_fences_the_lease(a, b):
    lease = a.acquire_leader("host-a", 5)
    a.resign(lease)
    a.resign(lease)                      # idempotent
    assert a.leader().vacant
    with pytest.raises(NotLeader):
        a.put_many(items(1), leader_lease=lease)
    assert b.acquire_leader("host-b", 5).epoch == 2


def test_lease_time_left_counts_down_and_a_lapsed_lease_can_be_revoked(harness, a, b):
    """The standby's early end of a lapsed lease: whole seconds left by the store's clock,
    then a revoke that takes the leader key with it."""
    lease = a.acquire_leader("host-a", 3)
    left, granted = b.lease_time_left(lease.id)
    assert granted == 3 and 1 <= left <= 3
    harness.pass_time(2.2)
    left, _ = b.lease_time_left(lease.id)
    assert left <= 1
    assert b.revoke_lapsed(lease.id) is True
    assert b.leader().vacant
    assert b.lease_time_left(lease.id) is None
    assert b.revoke_lapsed(lease.id) is False          # idempotent
    with pytest.raises(NotLeader):
        a.renew(lease)
    assert b.acquire_leader("host-b", 3).epoch == 2


def test_leader_changed_sees_expiry_and_takeover(harness, a, b):
    assert not a.leader_changed(a.leader().revision)
    lease = a.acquire_leader("host-a", TTL)
    seen = b.leader()
    assert not b.leader_changed(seen.revision)
    a.put_many(items(2), leader_lease=lease)     # records do not count as a change
    assert not b.leader_changed(seen.revision)
    harness.let_lease_expire(a, lease)
    assert b.leader_changed(seen.revision)
    vacant = b.leader()
    assert not b.leader_changed(vacant.revision)
    b.acquire_leader("host-b", TTL)
    assert a.leader_changed(vacant.revision)


# -- records ------------------------------------------------------------------------------------
def test_put_many_then_get_all(a, b):
    lease = a.acquire_leader("host-a", 5)
    revision = a.put_many(items(7), leader_lease=lease)
    snap = b.get_all()
    assert snap.items == items(7) and snap.revision >= revision


def test_put_many_is_all_or_nothing(a):
    lease = a.acquire_leader("host-a", 5)
    a.put_many(items(5, "old"), leader_lease=lease)
    with pytest.raises(BatchTooLarge) as info:
        a.put_many(items(base.MAX_TXN_OPS + 1, "new"), leader_lease=lease)
    assert info.value.bound == "ops" and info.value.limit == 128
    with pytest.raises(BatchTooLarge) as info:
        a.put_many({"big1": b"x" * 800_000, "big2": b"x" * 800_000}, leader_lease=lease)
    assert info.value.bound == "bytes"
    with pytest.raises(InvalidKey):
        a.put_many({"ok": b"1", "not/ok": b"2"}, leader_lease=lease)
    assert a.get_all().items == items(5, "old")
    a.put_many(items(base.MAX_TXN_OPS, "new"), leader_lease=lease)     # the bound itself fits
    assert a.get_all().items == items(base.MAX_TXN_OPS, "new")


def test_largest_batch_fits_in_one_transaction(a):
    lease = a.acquire_leader("host-a", 5)
    per = base.MAX_TXN_BYTES // 2 - 100
    a.put_many({"big1": b"x" * per, "big2": b"y" * per}, leader_lease=lease)
    assert {k: len(v) for k, v in a.get_all().items.items()} == {"big1": per, "big2": per}


def test_put_many_refused_after_the_lease_expired(harness, a):
    lease = a.acquire_leader("host-a", TTL)
    a.put_many(items(3, "old"), leader_lease=lease)
    harness.let_lease_expire(a, lease)
    with pytest.raises(NotLeader):
        a.put_many(items(3, "new"), leader_lease=lease)
    with pytest.raises(NotLeader):
        a.put_many({}, leader_lease=lease)
    assert a.get_all().items == items(3, "old")


def test_fenced_primary_cannot_write_after_a_takeover(harness, a, b):
    old = a.acquire_leader("host-a", TTL)
    a.put_many(items(3, "a"), leader_lease=old)
    harness.let_lease_expire(a, old)
    new = b.acquire_leader("host-b", 5)
    b.put_many(items(2, "b"), leader_lease=new)
    for attempt in (lambda: a.put_many(items(3, "stale"), leader_lease=old),
                    lambda: a.delete("c000", leader_lease=old)):
        with pytest.raises(NotLeader):
            attempt()
    # even a forged lease with the new epoch but the old lease id is refused
    with pytest.raises(NotLeader):
        a.put_many(items(1, "forged"), leader_lease=base.Lease(old.id, "host-b", new.epoch, 5))
    assert b.get_all().items == {**items(3, "a"), **items(2, "b")}


def test_delete_many_is_one_fenced_transaction(harness, a, b):
    lease = a.acquire_leader("host-a", 5)
    a.put_many(items(5), leader_lease=lease)
    assert a.delete_many(["c000", "c001", "c999"], leader_lease=lease) == 2
    assert sorted(b.get_all().items) == ["c002", "c003", "c004"]
    with pytest.raises(BatchTooLarge):
        a.delete_many([f"c{i}" for i in range(base.MAX_TXN_OPS + 1)], leader_lease=lease)
    a.resign(lease)
    with pytest.raises(NotLeader):
        a.delete_many(["c002"], leader_lease=lease)
    assert sorted(b.get_all().items) == ["c002", "c003", "c004"]


def test_delete_is_fenced_and_says_whether_the_record_was_there(a):
    lease = a.acquire_leader("host-a", 5)
    a.put_many(items(2), leader_lease=lease)
    assert a.delete("c000", leader_lease=lease) is True
    assert a.delete("c000", leader_lease=lease) is False
    assert a.get_all().items == {"c001": b"v1"}


def test_get_all_is_one_consistent_revision(a, b):
    lease = a.acquire_leader("host-a", 5)
    first = a.put_many(items(10, "one"), leader_lease=lease)
    a.put_many(items(10, "two"), leader_lease=lease)
    a.delete("c004", leader_lease=lease)
    then = b.get_all(revision=first)
    assert then.revision == first and then.items == items(10, "one")
    now = b.get_all()
    expected = items(10, "two")
    del expected["c004"]
    assert now.items == expected


def test_get_all_at_a_future_revision_is_an_error(a):
    with pytest.raises(StoreError) as info:
        a.get_all(revision=a.leader().revision + 10)
    assert info.value.code == "OUT_OF_RANGE"


def test_get_all_filters_by_prefix(a):
    lease = a.acquire_leader("host-a", 5)
    a.put_many({**items(4, prefix="x"), **items(5, prefix="y")}, leader_lease=lease)
    assert a.get_all("y").items == items(5, prefix="y")
    assert a.get_all("y00").items == items(5, prefix="y")
    assert a.get_all("z").items == {}


def test_sealed_records_survive_a_takeover(harness, a, b):
    """The whole path: seal under the leader's epoch, take over, open what may be restored."""
    ring = Keyring((("k1", b"K" * 32),))
    lease = a.acquire_leader("host-a", TTL)
    now = time.time_ns()
    recs = [CheckpointRecord(conn_key=f"10.0.0.1:80-10.0.0.2:{p}", ici=b"ici", app_state=b"s",
                             input_offset=p, output_offset=p, write_offset=p, ts_val=1,
                             wall_ns=now, epoch=lease.epoch, seq=1) for p in (1000, 1001)]
    a.put_many({r.conn_key: seal(r, ring, a.layout.conn(r.conn_key)) for r in recs}, leader_lease=lease)
    harness.let_lease_expire(a, lease)
    new = b.acquire_leader("host-b", 5)
    opened = open_many(b.get_all().items, ring, b.layout.conn, expected_epoch=new.epoch - 1, now_ns=now)
    assert sorted(opened.records) == sorted(r.conn_key for r in recs) and not opened.refused


# -- outages ------------------------------------------------------------------------------------------
OPERATIONS = {
    "leader": lambda s, lease: s.leader(),
    "leader_changed": lambda s, lease: s.leader_changed(1),
    "acquire_leader": lambda s, lease: s.acquire_leader("host-x", TTL),
    "renew": lambda s, lease: s.renew(lease),
    "put_many": lambda s, lease: s.put_many(items(2), leader_lease=lease),
    "delete": lambda s, lease: s.delete("c000", leader_lease=lease),
    "get_all": lambda s, lease: s.get_all(),
    "resign": lambda s, lease: s.resign(lease),
}


def assert_unavailable_fast(operation, store, lease):
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        operation(store, lease)
    assert time.monotonic() - start < TIMEOUT + SLACK


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_unreachable_store_fails_fast(harness, cluster, op):
    """Nothing listens where the store points: every operation fails within the timeout."""
    store = harness.unreachable_store(cluster)
    for _ in range(2):                   # the first call and the ones after it
        assert_unavailable_fast(OPERATIONS[op], store, base.Lease(1, "host-x", 1, 1))


def test_outage_fails_fast_and_the_store_recovers(harness, a):
    lease = a.acquire_leader("host-a", 30)
    with harness.outage():
        for name in ("leader", "put_many", "renew", "get_all"):
            assert_unavailable_fast(OPERATIONS[name], a, lease)
    # the same store object works again soon after the outage (no 5-minute penalty)
    wait_until(lambda: _answers(a), 5.0, "answering after the outage")
    a.put_many(items(1), leader_lease=lease)


def _answers(store) -> bool:
    try:
        store.leader()
        return True
    except StoreUnavailable:
        return False


# -- operator control keys and the leadership history ------------------------------------------
def test_control_keys_are_written_read_and_deleted_without_a_lease(a, b):
    """The operator holds no lease: control writes are not fenced, and leave the leader be."""
    lease = b.acquire_leader("host-b", TTL)
    assert a.get_control("pause") is None
    first = base.control_value("pause", paused_at=1, by="root@ops")
    assert a.put_control("pause", first) > 0
    assert b.get_control("pause") == first
    second = base.control_value("pause", paused_at=2, by="root@ops")
    a.put_control("pause", second)                       # the newest request wins
    assert b.get_control("pause") == second
    assert a.get_control("switchover") is None           # names are separate keys
    assert a.delete_control("pause") is True
    assert a.delete_control("pause") is False
    assert a.get_control("pause") is None
    assert b.leader().name == "host-b"
    b.put_many(items(1), leader_lease=lease)             # still the leader


def test_get_controls_reads_every_present_control_key_at_once(a, b):
    assert b.get_controls() == {}
    pause = base.control_value("pause", paused_at=1, by="root@ops")
    switch = base.control_value("switchover", to="host-b", from_="host-a", epoch=3, requested_at=2)
    a.put_control("pause", pause)
    a.put_control("switchover", switch)
    a.put_many(items(1), leader_lease=a.acquire_leader("host-a", TTL))   # records are not controls
    assert b.get_controls() == {"pause": pause, "switchover": switch}


def test_control_names_and_sizes_are_checked_before_sending(a):
    for name in ("Pause", "conn", "pause/x", ""):
        with pytest.raises(InvalidKey):
            a.put_control(name, b"{}")
    with pytest.raises(ValueError):
        a.put_control("pause", b"x" * (base.MAX_CONTROL_BYTES + 1))
    assert a.get_control("pause") is None


def test_control_and_history_keys_are_not_records(a):
    a.put_control("switchover", base.control_value("switchover", to="b", from_="a", epoch=1,
                                                   requested_at=1))
    a.append_history(1, base.history_value(epoch=1, holder="a", acquired_at=1, reason="r"))
    assert a.get_all().items == {}


def test_history_is_create_only_and_in_epoch_order(a, b):
    epochs = [10, 2, 1, 100, 9]             # more than one etcd page (page_size 3)
    for epoch in epochs:
        value = base.history_value(epoch=epoch, holder=f"host-{epoch}", acquired_at=epoch,
                                   reason="no leader")
        assert a.append_history(epoch, value) is True
    assert b.append_history(2, b"rewritten") is False      # written once, never rewritten
    got = b.history()
    assert [epoch for epoch, _ in got] == sorted(epochs)
    assert base.parse_history_value(dict(got)[2])["holder"] == "host-2"
    with pytest.raises(InvalidKey):
        a.append_history(0, b"{}")


def test_revoke_leader_makes_the_key_vanish_and_fences_the_old_lease(a, b):
    lease = a.acquire_leader("host-a", 30)
    assert b.revoke_leader() is True
    state = b.leader()
    assert state.vacant and state.epoch == lease.epoch       # the epoch is not changed
    with pytest.raises(NotLeader):
        a.put_many(items(1), leader_lease=lease)
    with pytest.raises(NotLeader):
        a.renew(lease)
    assert b.revoke_leader() is False                         # nobody to revoke
    assert b.acquire_leader("host-b", TTL).epoch == lease.epoch + 1


def test_revoke_leader_with_a_lease_id_spares_a_newer_leader(a, b):
    old = a.acquire_leader("host-a", TTL)
    a.resign(old)
    new = b.acquire_leader("host-b", TTL)
    assert a.revoke_leader(lease_id=old.id) is False
    assert a.leader().name == "host-b"
    b.put_many(items(1), leader_lease=new)
    assert a.revoke_leader(lease_id=new.id) is True
    assert a.leader().vacant


CONTROL_OPERATIONS = {
    "put_control": lambda s, lease: s.put_control("pause", b"{}"),
    "get_control": lambda s, lease: s.get_control("pause"),
    "delete_control": lambda s, lease: s.delete_control("pause"),
    "append_history": lambda s, lease: s.append_history(1, b"{}"),
    "history": lambda s, lease: s.history(),
    "revoke_leader": lambda s, lease: s.revoke_leader(),
}


@pytest.mark.parametrize("op", sorted(CONTROL_OPERATIONS))
def test_control_operations_fail_fast_when_unreachable(harness, cluster, op):
    store = harness.unreachable_store(cluster)
    assert_unavailable_fast(CONTROL_OPERATIONS[op], store, None)
