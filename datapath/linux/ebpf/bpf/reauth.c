// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Reauthorization of live flows (issue 17): socket iterators over the TCP
// and UDP sockets of a network namespace. The dump programs write, for
// each connected socket of the hooked cgroups that the connect hook noted
// (flownote.h), a reauth_flow record; user space classifies each again
// with IS_REAUTHORIZE against the new policy (the engine decides, exactly
// as it decides a new flow) and puts the cookies of the flows the policy
// now blocks in fwp_reauth_kill; the destroy programs then end those
// sockets with bpf_sock_destroy (kernel >= 6.5): a TCP peer gets a reset,
// the program's next call fails with ECONNABORTED. A separate object from
// fwp.c: the iterators need kernel types and a kfunc, and load only where
// reauthorization is wanted; fwp_sk_flow is fwp.c's map, shared by
// replacement at load.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "flownote.h"

#define TCP_ESTABLISHED 1
#define TCP_CLOSE_WAIT 8
#define AF_INET 2
#define AF_INET6 10
#define MAX_CGROUP_DEPTH 64

// The kernel types the iterators read, relocated against the running
// kernel's BTF (CO-RE): only the fields named here are used.
struct seq_file;
struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));
struct cgroup;
struct cgroup_subsys_state {
	struct cgroup *cgroup;
	struct cgroup_subsys_state *parent;
} __attribute__((preserve_access_index));
struct cgroup {
	struct cgroup_subsys_state self;
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));
struct sock_cgroup_data {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));
struct in6_addr {
	union {
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));
struct sock_common {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport; // network order
	__u16 skc_num;   // host order
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));
struct sock {
	struct sock_common __sk_common;
	struct sock_cgroup_data sk_cgrp_data;
} __attribute__((preserve_access_index));
struct tcp_sock;
struct udp_sock;
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));
struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

// reauth_flow is one live flow as the dump programs report it (Go:
// fwpreauthReauthFlow): the connect hook's note and the socket now.
struct reauth_flow {
	struct flow_note note;
	__u64 cookie;
	__u64 sk_cgroup; // the socket's cgroup (where it was created)
	__u8 src[16];	 // the socket's local address now
	__u8 dst[16];	 // its peer
	__u16 sport;	 // host order
	__u16 dport;	 // host order
	__u8 state;
	__u8 family;
	__u8 proto;
	__u8 pad;
};

// For bpf2go (-type reauth_flow): a type only the stack uses has no BTF.
const struct reauth_flow *fwp_reauth_flow_type __attribute__((unused));

// fwp_reauth_cgroups: the cgroups the hooks are attached to (by id); a
// socket is touched only when it was created in one of them or below.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} fwp_reauth_cgroups SEC(".maps");

// fwp_reauth_kill: cookies of the flows the new policy blocks, written by
// user space before a destroy pass; each entry goes when its socket is
// found.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} fwp_reauth_kill SEC(".maps");

// hooked reports whether the socket's cgroup is one of the hooked cgroups
// or below one, walking up at most MAX_CGROUP_DEPTH levels.
static __always_inline int hooked(struct sock *sk, __u64 *cgid)
{
	struct cgroup *cg = sk->sk_cgrp_data.cgroup;
	for (int i = 0; i < MAX_CGROUP_DEPTH; i++) {
		if (!cg)
			return 0;
		struct kernfs_node *kn = cg->kn;
		if (!kn)
			return 0;
		__u64 id = kn->id;
		if (i == 0)
			*cgid = id;
		if (bpf_map_lookup_elem(&fwp_reauth_cgroups, &id))
			return 1;
		struct cgroup_subsys_state *p = cg->self.parent;
		if (!p)
			return 0;
		cg = p->cgroup;
	}
	return 0;
}

static __always_inline int visit(struct seq_file *seq, struct sock_common *skc, struct sock *sk, __u8 proto, int destroy)
{
	__u8 state = skc->skc_state;
	if (state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT)
		return 0;
	struct flow_note *n = bpf_sk_storage_get(&fwp_sk_flow, sk, 0, 0);
	if (!n)
		return 0; // not connected through the hooks
	__u64 cg = 0;
	if (!hooked(sk, &cg))
		return 0;
	__u64 cookie = bpf_get_socket_cookie(sk);
	if (destroy) {
		if (!bpf_map_lookup_elem(&fwp_reauth_kill, &cookie))
			return 0;
		bpf_map_delete_elem(&fwp_reauth_kill, &cookie);
		if (bpf_sock_destroy(skc) == 0)
			bpf_seq_write(seq, &cookie, sizeof(cookie));
		return 0;
	}
	struct reauth_flow r = {};
	__builtin_memcpy(&r.note, n, sizeof(r.note));
	r.cookie = cookie;
	r.sk_cgroup = cg;
	r.state = state;
	r.proto = proto;
	r.family = skc->skc_family;
	r.sport = skc->skc_num;
	r.dport = __builtin_bswap16(skc->skc_dport);
	if (r.family == AF_INET) {
		__u32 a = skc->skc_rcv_saddr;
		__builtin_memcpy(r.src, &a, 4);
		a = skc->skc_daddr;
		__builtin_memcpy(r.dst, &a, 4);
	} else {
		__u32 a[4];
		a[0] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[0];
		a[1] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[1];
		a[2] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[2];
		a[3] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[3];
		__builtin_memcpy(r.src, a, 16);
		a[0] = skc->skc_v6_daddr.in6_u.u6_addr32[0];
		a[1] = skc->skc_v6_daddr.in6_u.u6_addr32[1];
		a[2] = skc->skc_v6_daddr.in6_u.u6_addr32[2];
		a[3] = skc->skc_v6_daddr.in6_u.u6_addr32[3];
		__builtin_memcpy(r.dst, a, 16);
	}
	bpf_seq_write(seq, &r, sizeof(r));
	return 0;
}

static __always_inline int tcp(struct bpf_iter__tcp *ctx, int destroy)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; // a request or time-wait socket
	return visit(ctx->meta->seq, skc, (struct sock *)tp, 6, destroy);
}

static __always_inline int udp(struct bpf_iter__udp *ctx, int destroy)
{
	struct udp_sock *us = ctx->udp_sk;
	if (!us)
		return 0;
	struct sock *sk = (struct sock *)us;
	return visit(ctx->meta->seq, (struct sock_common *)sk, sk, 17, destroy);
}

SEC("iter/tcp")
int fwp_reauth_tcp(struct bpf_iter__tcp *ctx) { return tcp(ctx, 0); }

SEC("iter/tcp")
int fwp_destroy_tcp(struct bpf_iter__tcp *ctx) { return tcp(ctx, 1); }

SEC("iter/udp")
int fwp_reauth_udp(struct bpf_iter__udp *ctx) { return udp(ctx, 0); }

SEC("iter/udp")
int fwp_destroy_udp(struct bpf_iter__udp *ctx) { return udp(ctx, 1); }

char _license[] SEC("license") = "Dual BSD/GPL";
