"""One table of ICI shapes drives the golden encodings, the encoder and the decoder tests.

Golden files live in tests/golden/<name>.hex. They are the compatibility promise: a
record written by this version must decode the same way in every later version, so a
golden file is never regenerated for an existing name; new shapes get new names.
"""

from ipaddress import IPv4Address, IPv6Address

from kernel.ici import F_SACK, F_TIMESTAMP, F_WINDOW, F_WSCALE, ICI

_ALL = F_WSCALE | F_SACK | F_TIMESTAMP | F_WINDOW

CASES = {
    # no options negotiated, empty queues
    "v4_minimal": ICI(
        family=4, local_addr=IPv4Address("10.77.0.100"), local_port=7000,
        remote_addr=IPv4Address("10.77.0.1"), remote_port=40000, mss_clamp=536,
        snd_una=1000, snd_nxt=1000, write_seq=1000, rcv_nxt=5000, copied_seq=5000,
        dump_time_ns=1_700_000_000_000_000_000),
    # every option, all three queues non-empty
    "v4_full": ICI(
        family=4, local_addr=IPv4Address("10.77.0.100"), local_port=7000,
        remote_addr=IPv4Address("10.77.0.1"), remote_port=40001, flags=_ALL,
        mss_clamp=1448, snd_wscale=7, rcv_wscale=9,
        snd_una=100, snd_nxt=104, write_seq=110, rcv_nxt=2003, copied_seq=2000,
        snd_wl1=2000, snd_wnd=65535, max_window=65535, rcv_wnd=131072, rcv_wup=2003,
        ts_val=123456788, dump_time_ns=1_700_000_000_123_456_789,
        recv_queue=b"abc", sent_queue=b"SENT", unsent_queue=b"UNSENT"),
    # IPv6, microsecond timestamp clock (bit 0 set)
    "v6_usec_ts": ICI(
        family=6, local_addr=IPv6Address("fd77::100"), local_port=443,
        remote_addr=IPv6Address("fd77::1"), remote_port=51234, flags=_ALL,
        mss_clamp=1428, snd_wscale=14, rcv_wscale=14,
        snd_una=7, snd_nxt=7, write_seq=7, rcv_nxt=9, copied_seq=9,
        snd_wl1=9, snd_wnd=1 << 20, max_window=1 << 20, rcv_wnd=1 << 16, rcv_wup=9,
        ts_val=987654321, dump_time_ns=1_800_000_000_000_000_000),
    # sequence numbers that wrap across 2^32 inside every queue
    "v4_wrapping": ICI(
        family=4, local_addr=IPv4Address("192.0.2.1"), local_port=65535,
        remote_addr=IPv4Address("198.51.100.2"), remote_port=1, flags=F_SACK | F_WINDOW,
        mss_clamp=1460,
        snd_una=0xFFFFFFFE, snd_nxt=0x00000002, write_seq=0x00000005,
        rcv_nxt=0x00000001, copied_seq=0xFFFFFFFD,
        snd_wl1=0xFFFFFFF0, snd_wnd=1000, max_window=2000, rcv_wnd=4000, rcv_wup=0xFFFFFFFF,
        dump_time_ns=1, recv_queue=b"wrap", sent_queue=b"1234", unsent_queue=b"xyz"),
    # an old kernel without TCP_REPAIR_WINDOW: the window part absent
    "v6_no_window": ICI(
        family=6, local_addr=IPv6Address("2001:db8::1"), local_port=80,
        remote_addr=IPv6Address("2001:db8::2"), remote_port=60000, flags=F_TIMESTAMP,
        mss_clamp=1220, snd_una=5, snd_nxt=6, write_seq=6, rcv_nxt=1, copied_seq=1,
        ts_val=2, dump_time_ns=2, sent_queue=b"!"),
}
