"""An in-memory checkpoint store with etcd's semantics, for unit tests.

One :class:`MemoryCluster` plays the etcd cluster (revisions, key history, leases); each
agent under test gets its own :class:`MemoryStore` on it. The clock is injected, so a test
expires a lease by advancing a :class:`FakeClock` instead of sleeping. Outages: set
``down`` on the MemoryCluster (etcd unreachable for everyone) or ``store.reachable = False`` (one agent
partitioned); calls then raise StoreUnavailable at once.

Like etcd: revisions start at 1 and every write transaction adds one; an expired lease
deletes its keys in one revision (checked lazily, at the next call, which is
indistinguishable from outside); bounds are the same (``base.check_batch``).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from . import base
from .base import CheckpointStore, LeaderState, Lease, Snapshot
from .errors import BatchTooLarge, NotLeader, StoreError, StoreUnavailable
from .layout import Layout


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


@dataclass(frozen=True)
class _KV:
    value: bytes
    mod_revision: int
    lease: int


class MemoryCluster:
    """The shared state: what etcd would hold. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.down = False
        self.revision = 1
        self._history: dict[str, list[tuple[int, _KV | None]]] = {}
        self._leases: dict[int, tuple[int, float]] = {}      # id -> (ttl, expires at)
        self._lease_ids = itertools.count(0x7CC0_0000_0001)
        self.lock = threading.RLock()

    # -- primitives, called with the lock held ------------------------------------------
    def begin(self) -> None:
        if self.down:
            raise StoreUnavailable("memory store: cluster down (test outage)")
        now = self.clock()
        for lease_id, (_, expires) in list(self._leases.items()):
            if expires <= now:
                self.revoke(lease_id)

    def get(self, key: str, revision: int | None = None) -> _KV | None:
        self.check_revision(revision)
        found = None
        for rev, kv in self._history.get(key, ()):
            if revision is not None and rev > revision:
                break
            found = kv
        return found

    def check_revision(self, revision: int | None) -> None:
        if revision is not None and revision > self.revision:
            raise StoreError(f"memory store: revision {revision} is in the future "
                             f"(now {self.revision})", "OUT_OF_RANGE")

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self._history if k.startswith(prefix))

    def write(self, puts: Mapping[str, bytes], deletes=(), leases: Mapping[str, int] | None = None) -> int:
        """Apply puts and deletes as one revision (one transaction); ``leases`` attaches
        some of the put keys to a lease."""
        self.revision += 1
        for key, value in puts.items():
            kv = _KV(bytes(value), self.revision, (leases or {}).get(key, 0))
            self._history.setdefault(key, []).append((self.revision, kv))
        for key in deletes:
            if self.get(key) is not None:
                self._history[key].append((self.revision, None))
        return self.revision

    def grant(self, ttl: int) -> int:
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = (ttl, self.clock() + ttl)
        return lease_id

    def refresh(self, lease_id: int) -> int | None:
        if lease_id not in self._leases:
            return None
        ttl, _ = self._leases[lease_id]
        self._leases[lease_id] = (ttl, self.clock() + ttl)
        return ttl

    def revoke(self, lease_id: int) -> None:
        if self._leases.pop(lease_id, None) is None:
            return
        attached = [k for k in self._history if (kv := self.get(k)) and kv.lease == lease_id]
        if attached:
            self.write({}, attached)


class MemoryStore(CheckpointStore):
    """One agent's client of a MemoryCluster."""

    def __init__(self, backend: MemoryCluster, cluster: str = "test"):
        self.backend = backend
        self.layout = Layout(cluster)
        self.reachable = True

    def _begin(self) -> MemoryCluster:
        if not self.reachable:
            raise StoreUnavailable("memory store: this client is partitioned (test outage)")
        self.backend.begin()
        return self.backend

    def _epoch(self, c: MemoryCluster, revision: int | None = None) -> tuple[int, int]:
        kv = c.get(self.layout.epoch, revision)
        return (int(kv.value), kv.mod_revision) if kv else (0, 0)

    def _fenced(self, c: MemoryCluster, lease: Lease) -> None:
        kv = c.get(self.layout.leader)
        if kv is None or kv.lease != lease.id or kv.value != base.leader_value(lease.name, lease.epoch):
            raise NotLeader(f"lease {lease.id:x} of {lease.name!r} (epoch {lease.epoch}) "
                            "no longer holds the leader key: nothing written")

    # -- leadership ----------------------------------------------------------------------
    def acquire_leader(self, name: str, ttl: int) -> Lease | None:
        base.check_leader_name(name)
        with self.backend.lock:
            c = self._begin()
            if c.get(self.layout.leader) is not None:
                return None
            epoch = self._epoch(c)[0] + 1
            lease_id = c.grant(int(ttl))
            c.write({self.layout.leader: base.leader_value(name, epoch),
                     self.layout.epoch: str(epoch).encode()},
                    leases={self.layout.leader: lease_id})
            return Lease(lease_id, name, epoch, int(ttl))

    def renew(self, lease: Lease) -> int:
        with self.backend.lock:
            ttl = self._begin().refresh(lease.id)
            if ttl is None:
                raise NotLeader(f"lease {lease.id:x} of {lease.name!r} expired")
            return ttl

    def resign(self, lease: Lease) -> None:
        with self.backend.lock:
            c = self._begin()
            c.revoke(lease.id)   # deletes the leader key if it is still attached to it

    def lease_time_left(self, lease_id: int) -> tuple[int, int] | None:
        with self.backend.lock:
            c = self._begin()
            if lease_id not in c._leases:
                return None
            ttl, expiry = c._leases[lease_id]
            return int(expiry - c.clock()), ttl

    def revoke_lapsed(self, lease_id: int) -> bool:
        with self.backend.lock:
            c = self._begin()
            existed = lease_id in c._leases
            c.revoke(lease_id)
            return existed

    def leader(self) -> LeaderState:
        with self.backend.lock:
            c = self._begin()
            epoch = self._epoch(c)[0]
            kv = c.get(self.layout.leader)
            if kv is None:
                return LeaderState(None, epoch, 0, c.revision)
            name, held_epoch = base.parse_leader_value(kv.value)
            return LeaderState(name, held_epoch, kv.lease, c.revision)

    def leader_changed(self, since_revision: int) -> bool:
        with self.backend.lock:
            c = self._begin()
            if self._epoch(c)[1] > since_revision:
                return True
            now = c.get(self.layout.leader)
            if now is not None:
                return now.mod_revision > since_revision
            return c.get(self.layout.leader, min(since_revision, c.revision)) is not None

    # -- records ------------------------------------------------------------------------
    def put_many(self, items: Mapping[str, bytes], *, leader_lease: Lease) -> int:
        named = base.check_batch(self.layout, items)
        with self.backend.lock:
            c = self._begin()
            self._fenced(c, leader_lease)
            return c.write(named) if named else c.revision

    def delete(self, conn_key: str, *, leader_lease: Lease) -> bool:
        name = self.layout.conn(conn_key)
        with self.backend.lock:
            c = self._begin()
            self._fenced(c, leader_lease)
            if c.get(name) is None:
                return False
            c.write({}, [name])
            return True

    def delete_many(self, conn_keys: list[str], *, leader_lease: Lease) -> int:
        names = [self.layout.conn(k) for k in conn_keys]
        if len(names) > base.MAX_TXN_OPS:
            raise BatchTooLarge("ops", len(names), base.MAX_TXN_OPS)
        with self.backend.lock:
            c = self._begin()
            self._fenced(c, leader_lease)
            there = [n for n in names if c.get(n) is not None]
            if there:
                c.write({}, there)
            return len(there)

    def get_all(self, prefix: str = "", *, revision: int | None = None) -> Snapshot:
        start = self.layout.conn_range(prefix)
        with self.backend.lock:
            c = self._begin()
            c.check_revision(revision)
            rev = c.revision if revision is None else revision
            items = {}
            for key in c.keys(start):
                kv = c.get(key, rev)
                if kv is not None:
                    items[self.layout.conn_key_of(key)] = kv.value
            return Snapshot(rev, items)

    # -- operator control keys and the leadership history ----------------------------------
    def put_control(self, name: str, value: bytes) -> int:
        key, value = self.layout.control(name), base.check_control_value(value)
        with self.backend.lock:
            return self._begin().write({key: value})

    def get_control(self, name: str) -> bytes | None:
        key = self.layout.control(name)
        with self.backend.lock:
            kv = self._begin().get(key)
            return None if kv is None else kv.value

    def delete_control(self, name: str) -> bool:
        key = self.layout.control(name)
        with self.backend.lock:
            c = self._begin()
            if c.get(key) is None:
                return False
            c.write({}, [key])
            return True

    def append_history(self, epoch: int, value: bytes) -> bool:
        key, value = self.layout.history(epoch), base.check_control_value(value)
        with self.backend.lock:
            c = self._begin()
            if c.get(key) is not None:
                return False
            c.write({key: value})
            return True

    def history(self) -> list[tuple[int, bytes]]:
        with self.backend.lock:
            c = self._begin()
            out = []
            for key in c.keys(self.layout.history_prefix):   # sorted: zero-padded epochs
                kv = c.get(key)
                if kv is not None:
                    out.append((self.layout.history_epoch_of(key), kv.value))
            return out

    def revoke_leader(self, *, lease_id: int | None = None) -> bool:
        with self.backend.lock:
            c = self._begin()
            kv = c.get(self.layout.leader)
            if kv is None or (lease_id is not None and kv.lease != lease_id):
                return False
            c.revoke(kv.lease)            # deletes the leader key with it
            return True
