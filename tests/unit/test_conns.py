"""Checkpoints re-anchored from the registration dump, read back by offsets.resume()."""

from ipaddress import IPv4Address

import pytest

from checkpointd.conns import Registration, checkpoint_ici
from checkpointd.offsets import StreamCheckpoint, resume
from kernel.ici import F_SACK, F_TIMESTAMP, F_WINDOW, F_WSCALE, ICI

# registered right after the request arrived: 20 unread request bytes, nothing written
REG_ICI = ICI(
    family=4, local_addr=IPv4Address("10.77.0.100"), local_port=80,
    remote_addr=IPv4Address("10.77.0.1"), remote_port=40000,
    flags=F_WSCALE | F_SACK | F_TIMESTAMP | F_WINDOW, mss_clamp=1448, snd_wscale=7, rcv_wscale=7,
    snd_una=0xFFFFFF00, snd_nxt=0xFFFFFF00, write_seq=0xFFFFFF00,
    rcv_nxt=0xFFFFFFF0 + 20 & 0xFFFFFFFF, copied_seq=0xFFFFFFF0,
    snd_wl1=0xFFFFFFF0, snd_wnd=65535, max_window=65535, rcv_wnd=65535, rcv_wup=0x4,
    ts_val=1000, dump_time_ns=10**18, recv_queue=b"G" * 20)
REG = Registration(REG_ICI, read=0, write=0, bytes_acked=0, rcv_wscale=7)


def test_logged_output_resends_what_the_peer_lacks():
    ici, w = checkpoint_ici(REG, input_offset=20, write_offset=300, unacked=b"x" * 100,
                            acked_offset=None, ts_val=2000, wall_ns=2 * 10**18)
    assert w == 300 and ici.sent_queue == b"x" * 100 and ici.recv_queue == b""
    assert ici.copied_seq == ici.rcv_nxt == (0xFFFFFFF0 + 20) & 0xFFFFFFFF
    ck = StreamCheckpoint.from_ici(ici, input_offset=20, output_offset=300, read_offset=20, write_offset=w)
    peer_acked = (0xFFFFFF00 + 250) & 0xFFFFFFFF      # the peer got 250 of the 300 bytes
    r = resume(ck, peer_acked)
    assert r.resend == b"x" * 50 and r.discard == 0 and r.input_offset == 20


def test_regenerable_output_anchors_at_the_acknowledged_position():
    ici, w = checkpoint_ici(REG, input_offset=20, write_offset=5000, unacked=b"",
                            acked_offset=4000, ts_val=2000, wall_ns=2 * 10**18)
    assert w == 4000 and ici.sent_queue == b""
    ck = StreamCheckpoint.from_ici(ici, input_offset=20, output_offset=0, read_offset=20, write_offset=w)
    r = resume(ck, (0xFFFFFF00 + 4500) & 0xFFFFFFFF)  # the peer got more after the checkpoint
    assert r.resend == b"" and r.discard == 4500 and r.acked_offset == 4500


def test_acked_offset_from_tcp_info_counters():
    reg = Registration(REG_ICI.replace(snd_una=0xFFFFFF00 - 10, sent_queue=b"s" * 10), read=0,
                       write=10, bytes_acked=7, rcv_wscale=7)
    assert reg.una_offset == 0
    assert reg.acked_offset(107) == 100


def test_offsets_before_the_registration_are_refused():
    with pytest.raises(ValueError):
        checkpoint_ici(REG, input_offset=-1, write_offset=0, unacked=b"", acked_offset=None,
                       ts_val=0, wall_ns=0)
    with pytest.raises(ValueError):
        checkpoint_ici(REG.__class__(REG_ICI, read=0, write=10, bytes_acked=0, rcv_wscale=7),
                       input_offset=0, write_offset=5, unacked=b"", acked_offset=None, ts_val=0, wall_ns=0)


def test_bytes_acknowledged_before_registration_travel_in_the_record():
    ici, _ = checkpoint_ici(REG, input_offset=5, write_offset=0, unacked=b"", acked_offset=0,
                            ts_val=1, wall_ns=1)
    assert ici.recv_queue == b"G" * 15
    assert ici.copied_seq == (0xFFFFFFF0 + 5) & 0xFFFFFFFF and ici.rcv_nxt == REG_ICI.rcv_nxt
    ici, _ = checkpoint_ici(REG, input_offset=20, write_offset=0, unacked=b"", acked_offset=0,
                            ts_val=1, wall_ns=1)
    assert ici.recv_queue == b""
