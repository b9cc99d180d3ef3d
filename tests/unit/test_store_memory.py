"""Root-free tests of what the contract module (tests/etcd/test_store_contract.py) cannot
show on every backend: exact lease timing on a fake clock, partitions of one client, the
pure bounds and timing checks, and the key layout. The contract itself runs on the memory
backend there too, without etcd."""

import pytest

from checkpointd.store import base
from checkpointd.store.errors import (BatchTooLarge, InvalidKey, NotLeader, StoreError,
                                      StoreUnavailable)
from checkpointd.store.layout import Layout
from checkpointd.store.memory import FakeClock, MemoryCluster, MemoryStore


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cluster(clock):
    return MemoryCluster(clock)


def test_fake_clock_only_moves_forward(clock):
    clock.advance(1.5)
    assert clock() == 1001.5
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_lease_expires_exactly_at_its_ttl(cluster, clock):
    store = MemoryStore(cluster)
    lease = store.acquire_leader("host-a", 10)
    clock.advance(9.999)
    assert store.leader().name == "host-a"
    clock.advance(0.001)
    assert store.leader().vacant
    with pytest.raises(NotLeader):
        store.renew(lease)


def test_renewal_restarts_the_ttl(cluster, clock):
    store = MemoryStore(cluster)
    lease = store.acquire_leader("host-a", 10)
    clock.advance(9)
    assert store.renew(lease) == 10
    clock.advance(9)
    store.put_many({"c": b"1"}, leader_lease=lease)


def test_expiry_is_one_revision_and_keeps_the_records(cluster, clock):
    store = MemoryStore(cluster)
    lease = store.acquire_leader("host-a", 10)
    store.put_many({"c1": b"1", "c2": b"2"}, leader_lease=lease)
    before = store.leader().revision
    clock.advance(10)
    after = store.leader()
    assert after.vacant and after.revision == before + 1
    assert store.get_all().items == {"c1": b"1", "c2": b"2"}   # records outlive the leader


def test_one_partitioned_client_does_not_stop_the_others(cluster, clock):
    a, b = MemoryStore(cluster), MemoryStore(cluster)
    lease = a.acquire_leader("host-a", 10)
    a.reachable = False
    with pytest.raises(StoreUnavailable, match="partitioned"):
        a.renew(lease)
    clock.advance(10)
    assert b.acquire_leader("host-b", 10).epoch == 2
    a.reachable = True
    with pytest.raises(NotLeader):
        a.put_many({"c": b"1"}, leader_lease=lease)


def test_cluster_outage_stops_every_client(cluster):
    a, b = MemoryStore(cluster), MemoryStore(cluster)
    cluster.down = True
    for store in (a, b):
        with pytest.raises(StoreUnavailable, match="down"):
            store.leader()


def test_clusters_with_different_names_are_independent(cluster):
    one, two = MemoryStore(cluster, "one"), MemoryStore(cluster, "two")
    assert one.acquire_leader("h", 10) and two.acquire_leader("h", 10)
    assert one.leader().epoch == two.leader().epoch == 1


def test_a_future_revision_is_an_error(cluster):
    store = MemoryStore(cluster)
    with pytest.raises(StoreError, match="future"):
        store.get_all(revision=store.leader().revision + 5)


def test_default_clock_is_real_time():
    store = MemoryStore(MemoryCluster())
    lease = store.acquire_leader("host-a", 60)
    assert store.renew(lease) == 60


# -- the pure parts of base -----------------------------------------------------------------------
def test_check_batch_enforces_etcd_bounds():
    layout = Layout("c")
    assert base.check_batch(layout, {"k": b"v"}) == {"/tcpcp/c/conn/k": b"v"}
    with pytest.raises(BatchTooLarge) as info:
        base.check_batch(layout, {f"k{i}": b"" for i in range(129)})
    assert (info.value.bound, info.value.value, info.value.limit) == ("ops", 129, 128)
    with pytest.raises(BatchTooLarge) as info:
        base.check_batch(layout, {"k": b"x" * base.MAX_TXN_BYTES})
    assert info.value.bound == "bytes"


@pytest.mark.parametrize("ttl, loop_wait, timeout, ok", [
    (30, 10, 10, True), (30, 10, 10.5, False), (10, 2, 2, True), (3, 1, 1.5, False)])
def test_check_timing_is_patronis_rule(ttl, loop_wait, timeout, ok):
    if ok:
        base.check_timing(ttl=ttl, loop_wait=loop_wait, timeout=timeout)
    else:
        with pytest.raises(ValueError, match="exceeds the leader TTL"):
            base.check_timing(ttl=ttl, loop_wait=loop_wait, timeout=timeout)


def test_leader_value_round_trips():
    assert base.parse_leader_value(base.leader_value("host-a", 42)) == ("host-a", 42)


@pytest.mark.parametrize("name", ["", "x" * 257, "tab\there"])
def test_bad_leader_names_are_refused(cluster, name):
    with pytest.raises(InvalidKey):
        MemoryStore(cluster).acquire_leader(name, 10)


def test_layout_names_every_key():
    layout = Layout("prod-1")
    assert layout.leader == "/tcpcp/prod-1/leader"
    assert layout.epoch == "/tcpcp/prod-1/epoch"
    assert layout.conn("10.0.0.1:80-10.0.0.2:1") == "/tcpcp/prod-1/conn/10.0.0.1:80-10.0.0.2:1"
    assert layout.conn_key_of(layout.conn("k")) == "k"


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 65])
def test_layout_refuses_bad_cluster_names(bad):
    with pytest.raises(InvalidKey):
        Layout(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "é", "x" * 201])
def test_layout_refuses_bad_conn_keys(bad):
    with pytest.raises(InvalidKey):
        Layout("c").conn(bad)
    with pytest.raises(InvalidKey):
        Layout("c").conn_key_of("/tcpcp/other/conn/k")
