// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Replies within an inbound UDP flow (issue 17, item 1). In WFP a datagram
// an unconnected socket receives and AUTH_RECV_ACCEPT permits makes an ALE
// flow; the socket's sends to that remote belong to it and are not a new
// outbound connection (CONNECT_REDIRECT, AUTH_CONNECT are not classified
// for them). Here:
//
//   ingress   records each inbound UDP flow it lets in (permitted by a
//             filter, by no filter, or by a Go callout's verdict mark) by
//             (socket cookie, remote address and port), with the local
//             address the datagram came to and the policy epoch — only
//             while the policy has filters at the outbound layers of the
//             flow's family (otherwise a send is never refused or
//             redirected, and nothing needs remembering).
//   sendmsg   looks the destination up first (one lookup): a send to a
//             remote whose flow was let in under this epoch passes
//             without a classification. A send naming a local address
//             (IP_PKTINFO) or from a socket bound to one goes there only
//             if it is the flow's.
//
//   connect   a send AUTH_CONNECT permits (not one handed to a Go
//             callout) records its flow the same way (in_note_udp):
//             the socket's later sends to that remote are the flow's, as
//             WFP keeps an ALE flow per endpoint rather than classifying
//             each datagram. A redirected send records the proxy, so the
//             next send to the original destination is redirected again.
//
// Included by inbound.h (its epoch and layer test).

// udp_reply_key is an inbound UDP flow as its socket's sends see it: the
// socket's cookie fixes its local port, and the remote is the send's
// destination (a v4-mapped one as its v4 address, as the ingress tuple).
struct udp_reply_key {
	__u64 cookie;
	__u8 raddr[16];
	__u16 rport; // host order
	__u8 v6;
	__u8 pad[5];
};

struct udp_reply {
	__u32 epoch;	// the policy epoch the flow was let in: valid in that one only
	__u8 laddr[16]; // the local address the datagram came to
};

// fwp_udp_replies: the inbound UDP flows whose replies pass. Bounded (LRU):
// an evicted flow's next reply is classified as a first send, and the
// remote's next datagram records the flow again.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_reply_key);
	__type(value, struct udp_reply);
} fwp_udp_replies SEC(".maps");

#define UDP_REPLY_SENT 0     // sends passed as replies, unclassified
#define UDP_REPLY_RECORDED 1 // flows recorded (inbound, or started by a send)
#define UDP_REPLY_NCOUNTS 2

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UDP_REPLY_NCOUNTS);
	__type(key, __u32);
	__type(value, __u64);
} fwp_udp_reply_counts SEC(".maps");

static __always_inline void udp_reply_count(__u32 i)
{
	__u64 *c = bpf_map_lookup_elem(&fwp_udp_reply_counts, &i);
	if (c)
		*c += 1;
}

// udp_reply_wanted: a send of this family could be refused or redirected
// (the policy has filters at its outbound layers).
static __always_inline int udp_reply_wanted(__u32 gen, __u8 v6)
{
	return in_layer_used(gen, SLOT_CONNECT_REDIRECT + v6) || in_layer_used(gen, SLOT_AUTH_CONNECT + v6);
}

// fwp_udp_reply_note records a UDP flow: one the ingress hook lets in, or
// one a permitted send started; while wanted (a global function: its key
// off the callers' frames).
__attribute__((noinline)) int fwp_udp_reply_note(struct tuple *t, __u32 ep)
{
	if (!t || !udp_reply_wanted(current_gen(), t->v6))
		return 0;
	struct udp_reply_key k = {.cookie = t->cookie, .rport = t->rport, .v6 = t->v6};
	__builtin_memcpy(k.raddr, t->raddr, 16);
	struct udp_reply v = {.epoch = ep};
	__builtin_memcpy(v.laddr, t->laddr, 16);
	if (!bpf_map_update_elem(&fwp_udp_replies, &k, &v, BPF_ANY))
		udp_reply_count(UDP_REPLY_RECORDED);
	return 1;
}

// udp_reply reports whether an unconnected UDP send is a reply within an
// inbound flow let in under the current policy epoch. A flow let in under
// an older policy does not exempt: the send is classified as a first send
// (the remote's next datagram, classified under the new policy, records
// the flow again). See docs/semantics.md, "UDP flows on the send side".
static __always_inline int udp_reply(struct bpf_sock_addr *ctx, int v6sock)
{
	if (!ctx || ctx->protocol != IPPROTO_UDP)
		return 0;
	struct udp_reply_key k = {.cookie = bpf_get_socket_cookie(ctx)};
	__u32 src[4] = {};
	struct bpf_sock *sk = ctx->sk;
	if (!v6sock) {
		__u32 a = ctx->user_ip4;
		__builtin_memcpy(k.raddr, &a, 4);
		src[0] = ctx->msg_src_ip4;
		if (!src[0] && sk)
			src[0] = sk->src_ip4;
	} else {
		__u32 a[4];
		LOAD_IP6(a, ctx->user_ip6);
		k.v6 = store_addr(k.raddr, a);
		LOAD_IP6(src, ctx->msg_src_ip6);
		if (!(src[0] | src[1] | src[2] | src[3]) && sk)
			LOAD_IP6(src, sk->src_ip6);
	}
	k.rport = bpf_ntohs((__u16)ctx->user_port);
	struct udp_reply *r = bpf_map_lookup_elem(&fwp_udp_replies, &k);
	if (!r || r->epoch != in_epoch())
		return 0;
	// The local address the send names or the socket is bound to, as the
	// flow's key holds it (a wildcard one names none: the flow's).
	__u8 l[16] = {};
	if (!v6sock) {
		__builtin_memcpy(l, src, 4);
	} else if (k.v6) {
		__builtin_memcpy(l, src, 16);
	} else if (is_v4mapped(src)) {
		__builtin_memcpy(l, &src[3], 4);
	} else if (src[0] | src[1] | src[2] | src[3]) {
		return 0; // a v6 source for a v4 remote: not this flow
	}
	__u64 l0, l1, f0, f1;
	__builtin_memcpy(&l0, l, 8);
	__builtin_memcpy(&l1, l + 8, 8);
	if (l0 | l1) {
		__builtin_memcpy(&f0, r->laddr, 8);
		__builtin_memcpy(&f1, r->laddr + 8, 8);
		if (l0 != f0 || l1 != f1)
			return 0;
	}
	udp_reply_count(UDP_REPLY_SENT);
	return 1;
}

// One global function per family: its own frame, and each reads only its
// family's context fields (msg_src_ip4 exists in sendmsg4 alone).
__attribute__((noinline)) int fwp_udp_reply4(struct bpf_sock_addr *ctx) { return udp_reply(ctx, 0); }
__attribute__((noinline)) int fwp_udp_reply6(struct bpf_sock_addr *ctx) { return udp_reply(ctx, 1); }
