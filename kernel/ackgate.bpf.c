// SPDX-License-Identifier: GPL-2.0-only
/*
 * The ACK gate: tc clsact egress program that keeps the host from acknowledging input
 * beyond the application's commit offset (docs/ackgate.md).
 *
 * Why: the kernel acknowledges bytes as soon as they arrive. If the application has
 * consumed them but not yet committed them to a checkpoint, a host crash loses them for
 * good: the peer saw them acknowledged and will never send them again. Clamping the ACK
 * number to the commit offset leaves those bytes in the peer's send queue.
 *
 * For every outgoing TCP segment of a guarded connection (an entry in ackgate_conns):
 *   - FIN and RST are dropped unless the entry is flagged RELEASED (a killed process
 *     must not close the connection that a destination is about to resurrect);
 *   - ack_seq beyond the commit offset is clamped to it (serial-number comparison), and
 *     the window is widened so that the advertised right edge does not move back;
 *   - SACK and D-SACK blocks that cover data above the commit offset are removed: left
 *     in, they tell the peer that the bytes between the clamped ACK and the block were
 *     lost (it would retransmit them all), and after a crash they would keep the peer
 *     from resending what the destination needs;
 *   - the TCP checksum follows every change (bpf_csum_diff over the old and new header,
 *     applied with bpf_l4_csum_replace: a no-op under CHECKSUM_PARTIAL, whose check
 *     field holds only the pseudo-header sum, which none of these fields is part of).
 * Every other packet passes untouched. Malformed options stop the parse; the packet
 * passes with whatever was already rewritten (each rewrite leaves well-formed options).
 * Nothing changes a packet's length.
 *
 * The agent (kernel/ackgate.py) creates the maps and loads this object itself; its ELF
 * loader understands exactly what this file produces: one program section "tc", map
 * relocations against the symbols in ".maps", no .data/.rodata/.bss, no subprograms
 * (everything is __always_inline). The ".maps" definitions below are what the loader
 * checks its own map layout against (and what `tc ... bpf obj` would use when debugging).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define GATE_GUARDED 0x1  /* clamp ACKs, strip SACK, drop FIN/RST */
#define GATE_RELEASED 0x2 /* the application closes on purpose: FIN/RST may leave */

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_SACK 5
#define TCPOPT_TIMESTAMP 8

#define TCP_HDR_MIN 20
#define TCP_HDR_MAX 60
#define BUF 64 /* header buffer; indexes are masked with BUF - 1 for the verifier */

/* 36 bytes. IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d): the family is in the
 * address, so the key stays fixed-size and a dual-stack socket's getsockname() form
 * (::ffff:10.0.0.1) is already the key's form. Ports in network byte order. */
struct gate_key {
	__u8 laddr[16];
	__u8 raddr[16];
	__be16 lport;
	__be16 rport;
};

/* Written only by the agent (one BPF_MAP_UPDATE_ELEM per commit). */
struct gate_conn {
	__u32 commit_seq; /* highest ack_seq the peer may see (host byte order) */
	__u8 rcv_wscale;  /* our receive window scale: the shift of our window field */
	__u8 flags;       /* GATE_* */
	__u16 pad;
};

/* Written only by this program (atomically where it counts); the agent creates the
 * entry with zeros, reads it, and deletes it. Kept apart from gate_conn because a map
 * update replaces the whole value: counters in the agent's value would be overwritten
 * by every commit. */
struct gate_stats {
	__u64 clamped;         /* segments whose ack_seq was lowered */
	__u64 sack_stripped;   /* SACK/D-SACK blocks removed */
	__u64 fin_rst_dropped; /* FIN or RST segments dropped */
	__u64 packets;         /* segments of this connection seen */
	/* What the agent needs to emit a pure ACK of its own after a commit: */
	__u32 snd_end;    /* highest seq + length sent: a sequence number the peer accepts */
	__u32 kernel_ack; /* the kernel's latest ack_seq (before clamping) */
	__u32 right_edge; /* highest kernel right edge: ack + (window << wscale) */
	__u32 ts_val;     /* highest TSval sent (PAWS: never send an older one) */
	__u32 ts_ecr;     /* latest TSecr sent */
	__u32 seen;       /* SEEN_* */
};

#define SEEN_ANY 0x1
#define SEEN_TS 0x2
#define SEEN_ACK 0x4

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct gate_key);
	__type(value, struct gate_conn);
} ackgate_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct gate_key);
	__type(value, struct gate_stats);
} ackgate_stats SEC(".maps");

static __always_inline int after(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0;
}

static __always_inline __u32 get32(const __u8 *buf, __u32 off)
{
	return ((__u32)buf[off & (BUF - 1)] << 24) | ((__u32)buf[(off + 1) & (BUF - 1)] << 16) |
	       ((__u32)buf[(off + 2) & (BUF - 1)] << 8) | (__u32)buf[(off + 3) & (BUF - 1)];
}

static __always_inline void put32(__u8 *buf, __u32 off, __u32 v)
{
	buf[off & (BUF - 1)] = v >> 24;
	buf[(off + 1) & (BUF - 1)] = v >> 16;
	buf[(off + 2) & (BUF - 1)] = v >> 8;
	buf[(off + 3) & (BUF - 1)] = v;
}

/* Rewrite the SACK option at buf[at..at+len): keep the blocks whose right edge is not
 * after the commit offset, compacted behind a shortened header, and fill the rest with
 * NOPs (the whole option when no block is kept). A SACK option whose length is not
 * 2 + 8n cannot be read block by block; it is replaced by NOPs entirely (a receiver that
 * parsed it loosely could otherwise take a block above the commit offset from it).
 * Returns the number of blocks removed. */
static __always_inline __u32 strip_sack(__u8 *buf, __u32 at, __u32 len, __u32 commit)
{
	__u32 kept = 0, removed = 0, nblocks, i, b;

	if (len < 10 || (len - 2) % 8) {
		for (i = 0; i < 40; i++) {
			if (i >= len)
				break;
			buf[(at + i) & (BUF - 1)] = TCPOPT_NOP;
		}
		return 1;
	}
	nblocks = (len - 2) / 8; /* at most 4: the option fits in 40 bytes */
	for (b = 0; b < 4; b++) {
		if (b >= nblocks)
			break;
		__u32 src = at + 2 + b * 8;
		__u32 start = get32(buf, src), end = get32(buf, src + 4);

		if (after(end, commit)) {
			removed++;
			continue;
		}
		if (kept != b) {
			__u32 dst = at + 2 + kept * 8;

			put32(buf, dst, start);
			put32(buf, dst + 4, end);
		}
		kept++;
	}
	if (!removed)
		return 0;
	if (kept) {
		buf[(at + 1) & (BUF - 1)] = 2 + kept * 8;
		i = 2 + kept * 8;
	} else {
		i = 0;
	}
	for (; i < 34; i++) {
		if (i >= len)
			break;
		buf[(at + i) & (BUF - 1)] = TCPOPT_NOP;
	}
	return removed;
}

SEC("tc")
int ackgate(struct __sk_buff *skb)
{
	struct gate_key key = {};
	struct gate_conn *conn;
	struct gate_stats *st;
	__u8 hdr[BUF] __attribute__((aligned(8)));
	__u8 old[BUF] __attribute__((aligned(8)));
	__u32 l4off, hlen, i, n, changed = 0;
	__u16 ports[2];

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return TC_ACT_OK;
		if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_TCP)
			return TC_ACT_OK;
		if (ip.frag_off & bpf_htons(0x3fff)) /* a fragment: no whole TCP header */
			return TC_ACT_OK;
		l4off = ETH_HLEN + ip.ihl * 4;
		key.laddr[10] = key.laddr[11] = 0xff;
		key.raddr[10] = key.raddr[11] = 0xff;
		__builtin_memcpy(&key.laddr[12], &ip.saddr, 4);
		__builtin_memcpy(&key.raddr[12], &ip.daddr, 4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return TC_ACT_OK;
		/* Extension headers are not walked: the stack sends TCP right after the
		 * fixed header (docs/ackgate.md, limits). */
		if (ip6.version != 6 || ip6.nexthdr != IPPROTO_TCP)
			return TC_ACT_OK;
		l4off = ETH_HLEN + sizeof(ip6);
		__builtin_memcpy(key.laddr, &ip6.saddr, 16);
		__builtin_memcpy(key.raddr, &ip6.daddr, 16);
	} else {
		return TC_ACT_OK;
	}

	if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)))
		return TC_ACT_OK;
	key.lport = ports[0];
	key.rport = ports[1];
	conn = bpf_map_lookup_elem(&ackgate_conns, &key);
	if (!conn || !(conn->flags & GATE_GUARDED))
		return TC_ACT_OK; /* not ours: untouched */

	__builtin_memset(hdr, 0, sizeof(hdr));
	if (bpf_skb_load_bytes(skb, l4off, hdr, TCP_HDR_MIN))
		return TC_ACT_OK;
	hlen = (hdr[12] >> 4) * 4;
	if (hlen < TCP_HDR_MIN || hlen > TCP_HDR_MAX || l4off + hlen > skb->len)
		return TC_ACT_OK; /* not a valid TCP header: not ours to judge */
	if (hlen > TCP_HDR_MIN &&
	    bpf_skb_load_bytes(skb, l4off + TCP_HDR_MIN, &hdr[TCP_HDR_MIN], hlen - TCP_HDR_MIN))
		return TC_ACT_OK;

	__u8 tcpflags = hdr[13];
	__u32 seq = get32(hdr, 4);
	__u32 ack = get32(hdr, 8);
	__u32 commit = conn->commit_seq;
	__u32 ws = conn->rcv_wscale;
	__u32 guard_flags = conn->flags;

	if (ws > 14)
		ws = 14;
	st = bpf_map_lookup_elem(&ackgate_stats, &key);

	if ((tcpflags & (0x01 | 0x04)) && !(guard_flags & GATE_RELEASED)) { /* FIN, RST */
		if (st)
			__sync_fetch_and_add(&st->fin_rst_dropped, 1);
		return TC_ACT_SHOT;
	}

	if (st) {
		__u32 end = seq + (skb->len - l4off - hlen) + !!(tcpflags & 0x02);

		__sync_fetch_and_add(&st->packets, 1);
		if (!(st->seen & SEEN_ANY) || after(end, st->snd_end))
			st->snd_end = end;
		st->seen |= SEEN_ANY;
	}
	if (!(tcpflags & 0x10) || (tcpflags & 0x02)) /* no ACK, or a SYN: nothing to clamp */
		return TC_ACT_OK;

	__builtin_memcpy(old, hdr, sizeof(old));
	__u32 win = ((__u32)hdr[14] << 8) | hdr[15];
	__u32 right = ack + (win << ws);

	if (st) {
		st->kernel_ack = ack;
		if (!(st->seen & SEEN_ACK) || after(right, st->right_edge))
			st->right_edge = right;
		st->seen |= SEEN_ACK;
	}

	if (after(ack, commit)) {
		/* right >= ack > commit, so the difference is positive. */
		__u32 nw = (right - commit + (1U << ws) - 1) >> ws;

		if (nw > 65535)
			nw = 65535;
		put32(hdr, 8, commit);
		hdr[14] = nw >> 8;
		hdr[15] = nw;
		changed = 1;
		if (st)
			__sync_fetch_and_add(&st->clamped, 1);
	}

	/* Options: EOL ends them; NOP is one byte; everything else is kind, length, data
	 * with length >= 2 and inside the header. Anything else stops the parse. */
	i = TCP_HDR_MIN;
	for (n = 0; n < 40; n++) {
		if (i >= hlen)
			break;
		__u8 kind = hdr[i & (BUF - 1)];

		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			i++;
			continue;
		}
		if (i + 1 >= hlen)
			break;
		__u32 len = hdr[(i + 1) & (BUF - 1)];

		if (len < 2 || i + len > hlen)
			break;
		if (kind == TCPOPT_TIMESTAMP && len == 10 && st) {
			__u32 tsval = get32(hdr, i + 2);

			if (!(st->seen & SEEN_TS) || after(tsval, st->ts_val))
				st->ts_val = tsval;
			st->ts_ecr = get32(hdr, i + 6);
			st->seen |= SEEN_TS;
		} else if (kind == TCPOPT_SACK) {
			__u32 removed = strip_sack(hdr, i, len, commit);

			if (removed) {
				changed = 1;
				if (st)
					__sync_fetch_and_add(&st->sack_stripped, removed);
			}
		}
		i += len;
	}

	if (!changed)
		return TC_ACT_OK;
	/* Same length, same addresses: only the checksum's data part changes. */
	__s64 diff = bpf_csum_diff((__be32 *)old, hlen & 63, (__be32 *)hdr, hlen & 63, 0);

	if (diff < 0)
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, l4off, hdr, hlen & 63, 0))
		return TC_ACT_OK; /* unchanged packet: the kernel's own, still valid */
	bpf_l4_csum_replace(skb, l4off + 16, 0, (__u32)diff, 0);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
