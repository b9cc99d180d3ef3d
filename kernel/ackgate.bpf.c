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
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define GATE_GUARDED 0x1  /* clamp ACKs, strip SACK, drop FIN/RST */
#define GATE_RELEASED 0x2 /* the application closes on purpose: FIN/RST may leave */
#define GATE_KEEP_SACK 0x4 /* SACK blocks pass: a just-passed endpoint (switchover), whose
			    * peer must learn at once which of its segments the isolated
			    * origin dropped, or it waits out its retransmission timer */

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_SACK 5
#define TCPOPT_TIMESTAMP 8

#define TCP_HDR_MIN 20
#define TCP_HDR_MAX 60

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

/* Rewrite the SACK option of length len at packet offset off: keep the blocks whose
 * right edge is not after the commit offset, compacted behind a shortened header, and
 * fill the rest with NOPs (the whole option when no block is kept). A SACK option whose
 * length is not 2 + 8n cannot be read block by block; it becomes NOPs entirely (a
 * receiver that parsed it loosely could otherwise take a block above the commit offset
 * from it). Returns the number of blocks removed.
 *
 * Positions are only ever helper offsets, never stack indexes: the verifier does not
 * track helper offsets precisely, so the option loop's states merge instead of
 * multiplying (with stack indexes the program was "too large" at 1M instructions). */
static __always_inline __u32 strip_sack(struct __sk_buff *skb, __u32 off, __u32 len,
					__u32 commit)
{
	__u8 rew[40] __attribute__((aligned(8)));
	__u32 blocks[8] = {}, out[8] = {};
	__u32 nblocks, kept = 0, removed = 0, b;

	__builtin_memset(rew, TCPOPT_NOP, sizeof(rew));
	if (len > 40)
		return 0;
	if (len < 10 || len > 34 || (len - 2) % 8) { /* 34: four blocks, the most that fit */
		bpf_skb_store_bytes(skb, off, rew, len, 0);
		return 1;
	}
	if (bpf_skb_load_bytes(skb, off + 2, blocks, len - 2))
		return 0;
	nblocks = (len - 2) / 8;
#pragma unroll
	for (b = 0; b < 4; b++) {
		if (b < nblocks) {
			if (after(bpf_ntohl(blocks[2 * b + 1]), commit)) {
				removed++;
			} else {
				if (kept == 0) {
					out[0] = blocks[2 * b];
					out[1] = blocks[2 * b + 1];
				} else if (kept == 1) {
					out[2] = blocks[2 * b];
					out[3] = blocks[2 * b + 1];
				} else if (kept == 2) {
					out[4] = blocks[2 * b];
					out[5] = blocks[2 * b + 1];
				} else {
					out[6] = blocks[2 * b];
					out[7] = blocks[2 * b + 1];
				}
				kept++;
			}
		}
	}
	if (!removed)
		return 0;
	if (kept) {
		rew[0] = TCPOPT_SACK;
		rew[1] = 2 + kept * 8;
#pragma unroll
		for (b = 0; b < 3; b++) /* kept < nblocks <= 4: at most 3 survive */
			if (b < kept)
				__builtin_memcpy(&rew[2 + 8 * b], &out[2 * b], 8);
	}
	bpf_skb_store_bytes(skb, off, rew, len, 0);
	return removed;
}

SEC("tc")
int ackgate(struct __sk_buff *skb)
{
	struct gate_key key = {};
	struct gate_conn *conn;
	struct gate_stats *st;
	__u8 old[TCP_HDR_MAX] __attribute__((aligned(8)));
	__u8 now[TCP_HDR_MAX] __attribute__((aligned(8)));
	struct tcphdr th;
	__u32 l4off, hlen, off, end, n, changed = 0;
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

	if (bpf_skb_load_bytes(skb, l4off, &th, sizeof(th)))
		return TC_ACT_OK;
	hlen = th.doff * 4;
	if (hlen < TCP_HDR_MIN || hlen > TCP_HDR_MAX || l4off + hlen > skb->len)
		return TC_ACT_OK; /* not a valid TCP header: not ours to judge */
	if (bpf_skb_load_bytes(skb, l4off, old, hlen))
		return TC_ACT_OK;

	__u32 seq = bpf_ntohl(th.seq);
	__u32 ack = bpf_ntohl(th.ack_seq);
	__u32 commit = conn->commit_seq;
	__u32 ws = conn->rcv_wscale;
	__u32 guard_flags = conn->flags;

	if (ws > 14)
		ws = 14;
	st = bpf_map_lookup_elem(&ackgate_stats, &key);

	if ((th.fin || th.rst) && !(guard_flags & GATE_RELEASED)) {
		if (st)
			__sync_fetch_and_add(&st->fin_rst_dropped, 1);
		return TC_ACT_SHOT;
	}

	if (st) {
		__u32 sent = seq + (skb->len - l4off - hlen) + th.syn;

		__sync_fetch_and_add(&st->packets, 1);
		if (!(st->seen & SEEN_ANY) || after(sent, st->snd_end))
			st->snd_end = sent;
		st->seen |= SEEN_ANY;
	}
	if (!th.ack || th.syn) /* nothing to clamp */
		return TC_ACT_OK;

	__u32 win = bpf_ntohs(th.window);
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
		__be32 nack = bpf_htonl(commit);
		__be16 nwin;

		if (nw > 65535)
			nw = 65535;
		nwin = bpf_htons(nw);
		if (bpf_skb_store_bytes(skb, l4off + offsetof(struct tcphdr, ack_seq), &nack, 4, 0) ||
		    bpf_skb_store_bytes(skb, l4off + offsetof(struct tcphdr, window), &nwin, 2, 0))
			goto fix_csum; /* whatever was written is covered by the checksum fix */
		changed = 1;
		if (st)
			__sync_fetch_and_add(&st->clamped, 1);
	}

	/* Options: EOL ends them; NOP is one byte; everything else is kind, length, data
	 * with length >= 2 and inside the header. Anything else stops the parse. */
	off = l4off + TCP_HDR_MIN;
	end = l4off + hlen;
	for (n = 0; n < 40; n++) {
		__u8 kl[2];
		__u32 len;

		if (off >= end || bpf_skb_load_bytes(skb, off, kl, 1))
			break;
		if (kl[0] == TCPOPT_EOL)
			break;
		if (kl[0] == TCPOPT_NOP) {
			off++;
			continue;
		}
		if (off + 1 >= end || bpf_skb_load_bytes(skb, off + 1, &kl[1], 1))
			break;
		len = kl[1];
		if (len < 2 || len > 40 || off + len > end)
			break;
		if (kl[0] == TCPOPT_TIMESTAMP && len == 10 && st) {
			__be32 ts[2];

			if (!bpf_skb_load_bytes(skb, off + 2, ts, 8)) {
				__u32 tsval = bpf_ntohl(ts[0]);

				if (!(st->seen & SEEN_TS) || after(tsval, st->ts_val))
					st->ts_val = tsval;
				st->ts_ecr = bpf_ntohl(ts[1]);
				st->seen |= SEEN_TS;
			}
		} else if (kl[0] == TCPOPT_SACK && !(guard_flags & GATE_KEEP_SACK)) {
			__u32 removed = strip_sack(skb, off, len, commit);

			if (removed) {
				changed = 1;
				if (st)
					__sync_fetch_and_add(&st->sack_stripped, removed);
			}
		}
		off += len;
	}

	if (!changed)
		return TC_ACT_OK;
fix_csum:
	/* Same length, same addresses: only the data part of the checksum changes. Under
	 * CHECKSUM_PARTIAL bpf_l4_csum_replace leaves the check field alone (it holds the
	 * pseudo-header sum; the device or skb_checksum_help sums the rest later). */
	if (bpf_skb_load_bytes(skb, l4off, now, hlen))
		return TC_ACT_OK;
	__s64 diff = bpf_csum_diff((__be32 *)old, hlen, (__be32 *)now, hlen, 0);

	if (diff >= 0)
		bpf_l4_csum_replace(skb, l4off + offsetof(struct tcphdr, check), 0, (__u32)diff, 0);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
