"""What only the etcd backend has: the key layout on the wire, paging at one revision while a
writer keeps writing, and failing over past a dead member."""

from __future__ import annotations

import time
import uuid

import pyetcd
import pytest

from checkpointd.store.errors import StoreUnavailable
from checkpointd.store.etcd import EtcdStore, parse_endpoint

from etcdproc import free_port, start_etcd, wait_until

pytestmark = pytest.mark.etcd


@pytest.fixture
def cluster():
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw(etcd_server):
    """A plain pyetcd client, to look at what the store wrote."""
    host, port = parse_endpoint(etcd_server.endpoint)
    client = pyetcd.MultiEndpointEtcd3Client(
        endpoints=[pyetcd.Endpoint(host, port, secure=False, time_retry=0.5)], timeout=2.0)
    yield client
    client.close()


@pytest.fixture
def store(etcd_server, cluster):
    with EtcdStore([etcd_server.endpoint], cluster, timeout=1.0, page_size=2) as s:
        yield s


def test_key_layout_is_the_documented_one(store, raw, cluster):
    lease = store.acquire_leader("host-a", 5)
    store.put_many({"10.0.0.1:80-10.0.0.2:5555": b"sealed"}, leader_lease=lease)
    keys = {meta.key.decode(): (value, meta.lease_id)
            for value, meta in raw.get_prefix(f"/tcpcp/{cluster}/")}
    assert keys == {
        f"/tcpcp/{cluster}/leader": (b'{"epoch":1,"name":"host-a"}', lease.id),
        f"/tcpcp/{cluster}/epoch": (b"1", 0),
        f"/tcpcp/{cluster}/conn/10.0.0.1:80-10.0.0.2:5555": (b"sealed", 0),
    }


def test_pages_are_read_at_the_first_pages_revision(store, raw, cluster, monkeypatch):
    """A writer that changes every record between two pages does not tear the snapshot."""
    lease = store.acquire_leader("host-a", 5)
    before = {f"c{i}": b"old" for i in range(7)}
    store.put_many(before, leader_lease=lease)
    real = store._call
    pages = []

    def page_then_write(what, service, method, request, **kwargs):
        answer = real(what, service, method, request, **kwargs)
        if what == "get_all":
            pages.append(request.revision)
            if len(pages) == 1:
                store.put_many({k: b"new" for k in before}, leader_lease=lease)
        return answer

    monkeypatch.setattr(store, "_call", page_then_write)
    snap = store.get_all()
    assert len(pages) == 4 and pages[0] == 0 and set(pages[1:]) == {snap.revision}
    assert snap.items == before
    monkeypatch.undo()
    assert set(store.get_all().items.values()) == {b"new"}


@pytest.mark.parametrize("dead_first", [True, False])
def test_a_dead_member_is_skipped(etcd_server, cluster, dead_first):
    dead = f"127.0.0.1:{free_port()}"
    members = [dead, etcd_server.endpoint] if dead_first else [etcd_server.endpoint, dead]
    for _ in range(3):                               # pyetcd starts on a random member
        with EtcdStore(members, cluster, timeout=1.0) as s:
            lease = s.acquire_leader("host-a", 5)
            s.put_many({"c": b"1"}, leader_lease=lease)
            assert s.get_all().items == {"c": b"1"}
            s.resign(lease)


def test_all_members_dead_is_unavailable(cluster):
    members = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with EtcdStore(members, cluster, timeout=1.0) as s:
        with pytest.raises(StoreUnavailable, match="Connection refused|every member failed"):
            s.leader()


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd of this test's own, which it may stop and start again."""
    server = start_etcd(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_the_same_store_recovers_when_etcd_restarts(own_etcd, cluster):
    with EtcdStore([own_etcd.endpoint], cluster, timeout=1.0) as s:
        lease = s.acquire_leader("host-a", 30)
        s.put_many({"c": b"1"}, leader_lease=lease)
        own_etcd.stop()
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                s.put_many({"c": b"2"}, leader_lease=lease)
            assert time.monotonic() - start < 2.5
        own_etcd.start()
        back = time.monotonic()
        wait_until(lambda: _answers(s), 10.0, "answering after the restart")
        assert time.monotonic() - back < 5.0      # not gRPC's or pyetcd's long backoff
        assert s.get_all().items == {"c": b"1"}   # persisted, and the lease survived
        s.put_many({"c": b"2"}, leader_lease=lease)


def _answers(store) -> bool:
    try:
        store.leader()
        return True
    except StoreUnavailable:
        return False


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:2379", ("127.0.0.1", 2379)), ("http://10.0.0.1:2379", ("10.0.0.1", 2379)),
    ("[::1]:2379", ("[::1]", 2379))])
def test_endpoint_forms(text, want):
    assert parse_endpoint(text) == want


@pytest.mark.parametrize("text", ["https://h:2379", "h", "http://:1"])
def test_unsupported_endpoints_are_refused(text):
    with pytest.raises(ValueError):
        parse_endpoint(text)
