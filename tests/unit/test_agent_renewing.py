"""The lease is renewed while long actions run (``Agent._renewing``). A thousand-connection
takeover blocked the HA loop for longer than a one-second lease may go unrenewed, and the
new primary lost its lease in the middle of resurrecting. Memory store, no root."""

import os
import threading
import time

from checkpointd import decide
from checkpointd.agent import Agent
from checkpointd.config import Config
from checkpointd.store.errors import StoreUnavailable
from checkpointd.store.keyring import Keyring
from checkpointd.store.memory import MemoryCluster, MemoryStore

CONFIG = Config(cluster_name="pair", host_name="host-a", etcd_endpoints=("http://127.0.0.1:2379",),
                key_file="/etc/tcpcp/k", vips=("192.0.2.10",), interface="eth0",
                lease_ttl=1.0, renew_interval=0.05, retry_timeout=0.2, fence_margin=0.3,
                checkpoint_interval=5.0, commit_interval=0.01, msl=120.0, clock_skew=0.0,
                unprotected_grace=2.0)


class CountingStore(MemoryStore):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.renewals = 0
        self.fail = False

    def renew(self, lease):
        if self.fail:
            raise StoreUnavailable("renew", "etcd is away")
        self.renewals += 1
        return super().renew(lease)


def primary_agent():
    store = CountingStore(MemoryCluster(), "pair")
    agent = Agent(CONFIG, store, Keyring((("k1", os.urandom(32)),)))
    agent.machine.observe(decide.LeaderVanished(epoch=None))
    sent = agent.clock()
    agent.lease = store.acquire_leader(CONFIG.host_name, 2)
    agent.machine.observe(decide.LeaderAcquired(epoch=agent.lease.epoch, revision=0, at=sent))
    assert agent.machine.state.role is decide.Role.PRIMARY
    return agent, store


def test_a_long_action_is_covered_by_renewals_that_move_the_fencing_deadline():
    agent, store = primary_agent()
    before = agent.machine.state.last_renew
    with agent._renewing([decide.Isolate(1), decide.Resurrect(1)]):
        time.sleep(0.4)                        # the resurrection of many connections
    assert store.renewals >= 4
    assert agent.machine.state.last_renew > before + 0.25
    assert agent.machine.state.role is decide.Role.PRIMARY
    assert agent.renewed_at is not None
    assert not [t for t in threading.enumerate() if t.name == "checkpointd-renew"]


def test_short_actions_start_no_renewer():
    agent, store = primary_agent()
    with agent._renewing([decide.TakeVip(CONFIG.vips, "eth0"), decide.CheckpointAll()]):
        time.sleep(0.15)
    assert store.renewals == 0


def test_a_failed_renewal_ends_the_renewer_and_leaves_the_decision_to_the_loop():
    agent, store = primary_agent()
    store.fail = True
    before = agent.machine.state.last_renew
    with agent._renewing([decide.Resurrect(1)]):
        time.sleep(0.2)
    assert store.renewals == 0
    assert agent.machine.state.last_renew == before   # nothing claimed


def test_a_demoted_origin_keeps_its_lease_without_telling_the_role_machine():
    agent, store = primary_agent()
    agent.machine.observe(decide.SwitchoverRequested(target="host-b"))
    assert agent.machine.state.role is decide.Role.DEMOTED
    with agent._renewing([decide.PassConnections("host-b", agent.lease.epoch)]):
        time.sleep(0.2)
    assert store.renewals >= 2 and agent.renewed_at is not None
    assert agent.machine.state.role is decide.Role.DEMOTED
