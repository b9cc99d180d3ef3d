"""The new primary adopts the lapsed epoch's records (resurrect/core.py ``adopt``): the same
content re-sealed under its own epoch, fenced by its lease, so that a takeover after its
own early death still finds records of the epoch that lapsed. Memory store, no root."""

import os
import time

from checkpointd.store.keyring import Keyring
from checkpointd.store.layout import Layout
from checkpointd.store.memory import MemoryCluster, MemoryStore
from checkpointd.store.record import CheckpointRecord, conn_key, open_many, seal
from resurrect.core import adopt

KEY = os.urandom(32)


class FakeAgent:
    def __init__(self, store, lease):
        self.store, self.lease = store, lease
        self.keyring = Keyring((("k1", KEY),))
        self.layout = Layout("t")
        self.notes: list[str] = []

    def note(self, text):
        self.notes.append(text)


def record(i: int, epoch: int) -> CheckpointRecord:
    return CheckpointRecord(conn_key=conn_key(("10.0.0.1", 80), ("10.0.0.2", 5000 + i)),
                            ici=b"\x01" * 64, app_state=b"s%d" % i, input_offset=100 + i,
                            output_offset=200, write_offset=300, ts_val=7,
                            wall_ns=time.time_ns(), epoch=epoch, seq=i, acked_input=90 + i)


def test_adopted_records_open_under_the_new_epoch_with_the_same_content():
    cluster = MemoryCluster()
    store = MemoryStore(cluster, "t")
    old = store.acquire_leader("a", 5)
    recs = [record(i, old.epoch) for i in range(150)]        # two batches
    agent = FakeAgent(store, old)
    store.put_many({r.conn_key: seal(r, agent.keyring, agent.layout.conn(r.conn_key))
                    for r in recs[:100]}, leader_lease=old)
    store.put_many({r.conn_key: seal(r, agent.keyring, agent.layout.conn(r.conn_key))
                    for r in recs[100:]}, leader_lease=old)
    store.resign(old)
    new = store.acquire_leader("b", 5)
    agent.lease = new
    assert adopt(agent, recs) == 150
    opened = open_many(store.get_all().items, agent.keyring, agent.layout.conn,
                       expected_epoch=new.epoch, now_ns=time.time_ns())
    assert not opened.refused and len(opened.records) == 150
    for r in recs:
        got = opened.records[r.conn_key]
        assert got == r.replace(epoch=new.epoch)


def test_adoption_is_fenced_and_reports_what_it_left():
    cluster = MemoryCluster()
    store = MemoryStore(cluster, "t")
    lease = store.acquire_leader("b", 5)
    store.resign(lease)                      # no longer the leader
    agent = FakeAgent(store, lease)
    assert adopt(agent, [record(1, 1)]) == 0
    assert agent.notes and "left as they were" in agent.notes[0]
    assert store.get_all().items == {}
