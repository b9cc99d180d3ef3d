"""Root-free tests of the probe segment: headers, checksums, and parse() reading them back."""

import struct

import pytest

from kernel import probe
from kernel.probe import TH_ACK, _csum, parse, segment

from ici_cases import CASES


@pytest.mark.parametrize("name", ["v4_full", "v6_usec_ts", "v4_wrapping", "v4_minimal"])
def test_probe_is_one_old_byte_with_valid_checksums(name):
    ici = CASES[name]
    packet = segment(ici, ts_val=4242)
    src, sport, dst, dport, seq, ack, flags, window, payload = parse(packet)
    assert payload == 1
    assert (src, sport, dst, dport) == (ici.local_addr, ici.local_port, ici.remote_addr, ici.remote_port)
    assert seq == (ici.snd_una - 1) & 0xFFFFFFFF   # one byte the peer already has
    assert ack == ici.rcv_nxt
    assert flags & TH_ACK
    if ici.family == 4:
        assert _csum(packet[:20]) == 0
        tcp = packet[20:]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        tcp = packet[40:]
        pseudo = packet[8:40] + struct.pack("!IxxxB", len(tcp), 6)
    assert _csum(pseudo + tcp) == 0
    has_ts = b"\x01\x01\x08\x0a" + struct.pack("!I", 4242) in tcp
    assert has_ts == ici.timestamps


def test_window_is_scaled_down():
    ici = CASES["v4_full"]  # rcv_wnd 131072, rcv_wscale 9
    window = parse(segment(ici, None))[7]
    assert window == 131072 >> 9


def test_parse_ignores_ethernet_padding():
    ici = CASES["v4_minimal"].replace(rcv_wnd=0)
    packet = segment(ici, None, payload=b"") + b"\0" * 6  # a 40-byte ACK padded to 46
    assert parse(packet)[8] == 0


def test_parse_ignores_non_tcp_and_short_packets():
    assert parse(b"") is None
    assert parse(b"\x45" + b"\0" * 8 + b"\x11" + b"\0" * 30) is None  # UDP
    assert parse(b"\x60" + b"\0" * 10) is None


@pytest.mark.parametrize("name", ["v4_full", "v6_usec_ts"])
def test_nudge_quotes_the_peers_oldest_unacknowledged_byte(name):
    from kernel.nudge import icmp_unreachable

    ici = CASES[name]
    msg = icmp_unreachable(ici)
    if ici.family == 4:
        assert msg[:2] == bytes([3, 1])            # destination unreachable, host unreachable
        assert _csum(msg) == 0
        quoted_ip, quoted_tcp = msg[8:28], msg[28:36]
        assert quoted_ip[12:16] == ici.remote_addr.packed and quoted_ip[16:20] == ici.local_addr.packed
        assert _csum(quoted_ip) == 0
    else:
        assert msg[:2] == bytes([1, 0])            # ICMPv6 destination unreachable, no route
        quoted_ip, quoted_tcp = msg[8:48], msg[48:56]
        assert quoted_ip[8:24] == ici.remote_addr.packed and quoted_ip[24:40] == ici.local_addr.packed
    sport, dport, seq = struct.unpack("!HHI", quoted_tcp)
    assert (sport, dport, seq) == (ici.remote_port, ici.local_port, ici.rcv_nxt)


def test_passing_record_round_trip_and_envelope_damage():
    from kernel import passing
    from kernel.errors import ICIError

    ici = CASES["v4_full"]
    blob = passing.pack(ici, b"app-state", peer_acked=102)
    rec = passing.unpack(blob)
    assert (rec.ici, rec.app_state, rec.peer_acked) == (ici, b"app-state", 102)
    assert passing.unpack(passing.pack(ici, b"")).peer_acked is None
    for pos in (9, 12, len(blob) - 6):  # flags, peer_acked, the application state
        bad = bytearray(blob)
        bad[pos] ^= 1
        with pytest.raises(ICIError) as err:
            passing.unpack(bytes(bad))
        assert err.value.field == "record"
    with pytest.raises(ICIError):
        passing.unpack(blob[:-1])


@pytest.mark.parametrize("elapsed,want", [(0.0, 1), (0.19, 1), (0.2, 1), (0.61, 2), (1.5, 3), (3.0, 4)])
def test_backoff_steps_to_undo(elapsed, want):
    from kernel.nudge import backoffs
    assert backoffs(elapsed) == want


def test_solicited_node_group_as_proc_prints_it():
    import ipaddress

    from kernel.vip import solicited_node
    assert solicited_node(ipaddress.ip_address("fd77::1:2345")) == "ff0200000000000000000001ff012345"
