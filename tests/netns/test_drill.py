"""Fail-over drills in CI: the primary is crashed at a random moment under load (seeded),
20 connections (curl downloads and KV sessions), and nothing may be lost or repeated."""

import pytest

from checkpointd import drill

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("seed", [11, 12])
def test_drill_loses_nothing(seed):
    result = drill.run(20, seed=seed, duration=3.0)
    assert result["resurrected"] == 20, result
    assert result["lost_bytes"] == 0 and result["duplicated_bytes"] == 0, result
    assert result["resets"] == 0, result
    assert result["kv"]["ok"] and result["kv"]["replies_verified"] > 0, result
    assert result["bytes_verified"] > 0
    m = result["metrics_b"]   # scraped from b's /metrics, as Prometheus would
    assert m["tcpcp_resurrections_total"] == 20 and m['tcpcp_role{role="primary"}'] == 1, m
    assert m["tcpcp_checkpoints_total"] > 0 and m["tcpcp_commit_latency_seconds_count"] > 0, m


def test_primary_cut_off_from_etcd_fences_before_the_standby_takes_over():
    result = drill.run(10, seed=21, duration=3.0, fault="etcd-partition")
    assert result["a_fenced_ms"] is not None, result
    assert result["fenced_before_takeover"], result   # never two hosts speaking
    assert result["a_role"] == "fenced", result
    assert result["resurrected"] == 10, result
    assert result["lost_bytes"] == 0 and result["duplicated_bytes"] == 0 and result["resets"] == 0, result


def test_kill_between_a_durable_checkpoint_and_the_gate_raise_loses_nothing():
    """The primary's committer stops after an etcd write and before the ACK gates are
    raised, then the host crashes: the peers' snd_una is one commit behind the records,
    and the resurrection nudges them at both offsets."""
    result = drill.run(20, seed=31, duration=3.0, fault="mid-commit")
    assert result["resurrected"] == 20, result
    assert result["lost_bytes"] == 0 and result["duplicated_bytes"] == 0 and result["resets"] == 0, result
    assert result["kv"]["ok"], result


def test_etcd_without_quorum_fail_safe_then_crash_loses_nothing():
    """Two of three etcd members die: the primary cannot renew, the standby confirms it
    cannot reach etcd either, so the primary keeps serving (never fenced) and releases the
    ACK gate after the 1 s grace; quorum returns, it re-protects its connections, and a
    crash after that is survived with nothing lost."""
    result = drill.run(10, seed=41, duration=11.0, fault="etcd-outage")
    assert result["a_roles_during_outage"] == ["primary"], result
    assert result["a_unprotected_during_outage"], result
    assert result["resurrected"] == 10 and result["refused"] == 0, result
    assert result["lost_bytes"] == 0 and result["duplicated_bytes"] == 0 and result["resets"] == 0, result


def test_operator_switchover_of_100_connections_under_load_loses_nothing():
    """`resurrect switchover --to b`, run as an operator runs it: a freezes its
    applications, isolates its connections and passes every one live to b, with its
    queues and the application's exact state; b takes the leader key at once (no lease to
    wait for) and activates them. Nothing is resurrected from a checkpoint."""
    result = drill.run(100, seed=51, duration=6.0, fault="switchover", http_rate=200_000, kv_rate=20)
    sw = result["switchover"]
    assert result["passed_live"] == 100 and result["resurrected"] == 0, result
    assert sw["frozen"] == sw["asked"] == sw["passed_live"] == 100 and sw["error"] is None, sw
    assert result["metrics_b"].get('tcpcp_passed_total{direction="in"}') == 100, result["metrics_b"]
    assert result["lost_bytes"] == 0 and result["duplicated_bytes"] == 0 and result["resets"] == 0, result
    assert result["detection_ms"] is not None and result["detection_ms"] < 1000, result


def test_switchover_by_checkpoint_when_passing_is_off_loses_nothing():
    """``switchover.pass = false`` (and the path every connection takes when the target
    refuses a pass): a isolates its connections, writes a final checkpoint of each and
    releases the leader key; b resurrects every one."""
    result = drill.run(40, seed=52, duration=5.0, fault="switchover", http_rate=200_000, kv_rate=20,
                       switchover_pass=False)
    assert result["resurrected"] == 40 and result["passed_live"] == 0 and result["refused"] == 0, result
    assert result["lost_bytes"] == 0 and result["duplicated_bytes"] == 0 and result["resets"] == 0, result
