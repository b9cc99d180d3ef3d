"""Live passing under load (issue 2): kernel.livepass builds its own topology, runs the
unmodified peer (peers/stream_peer.py) streaming both ways on N connections, passes them
all from A to B in the middle, and reports what the peer and both servers verified.

Only correctness is asserted here: no byte lost, duplicated or corrupted, no RST, no early
FIN, every connection passed (or, when the destination refuses, none, and the origin
carried on). Timings are the benchmarks' business.
"""

from __future__ import annotations

import pytest

from kernel import livepass

pytestmark = pytest.mark.netns

FAST = dict(warmup_s=0.5, after_s=0.5)


def assert_nothing_lost(figures: dict) -> None:
    lossless = {k: figures[k] for k in ("lost_bytes", "duplicated_bytes", "corrupt_bytes",
                                        "resets", "early_fins")}
    assert lossless == dict.fromkeys(lossless, 0), figures
    assert figures["bytes_verified"] > 0
    peer = figures["peer"]
    assert peer["ok"] and peer["connect_failures"] == peer["errors"] == 0, peer
    assert peer["bytes_verified"] > 0  # server -> peer verified by the peer


@pytest.mark.parametrize("connections, family", [(1, 4), (100, 4), (10, 6)],
                         ids=["1-v4", "100-v4", "10-v6"])
def test_every_connection_passes_under_load(connections, family):
    figures = livepass.run(connections, family=family, **FAST)
    assert figures["pass_error"] is None, figures["pass_error"]
    assert figures["passed"] == connections
    assert_nothing_lost(figures)
    # Both directions kept flowing after the pass: the destination verified peer bytes.
    destination = figures["server"]["destination"]
    assert destination["bytes_verified"] > 0, figures["server"]
    assert figures["peer"]["connections"] == connections


def test_refused_record_undoes_the_pass_and_the_origin_carries_on():
    figures = livepass.run(10, family=4, corrupt_one=True, **FAST)
    assert figures["passed"] == 0
    assert figures["pass_error"] and "ICIError" in figures["pass_error"], figures["pass_error"]
    assert_nothing_lost(figures)
    origin, destination = figures["server"]["origin"], figures["server"]["destination"]
    assert destination["bytes_received"] == destination["bytes_sent"] == 0, destination
    assert origin["bytes_verified"] > 0, origin
