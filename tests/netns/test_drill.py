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


def test_primary_cut_off_from_etcd_fences_before_the_standby_takes_over():
    result = drill.run(10, seed=21, duration=3.0, fault="etcd-partition")
    assert result["a_fenced_ms"] is not None, result
    assert result["fenced_before_takeover"], result   # never two hosts speaking
    assert result["a_role"] == "fenced", result
    assert result["resurrected"] == 10, result
    assert result["lost_bytes"] == 0 and result["duplicated_bytes"] == 0 and result["resets"] == 0, result
