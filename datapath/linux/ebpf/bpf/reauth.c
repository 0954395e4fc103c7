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
#include <bpf/bpf_endian.h>
#include <stddef.h>

#include "flownote.h"

#define TCP_ESTABLISHED 1
#define TCP_CLOSE_WAIT 8
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_UDP 17
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
struct bpf_sock_ops;
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

// Liveness: the cookie of every full TCP socket (any state, listeners
// and connects in progress too) and every bound UDP socket of the
// namespace, whatever its cgroup. User space sweeps the per-socket state
// (redirect records, flow contexts) of cookies no namespace holds any
// more: what a lost closure report or a sock_release that never ran
// would otherwise keep (liveness.go).
SEC("iter/tcp")
int fwp_live_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; // a request or time-wait socket: no cookie of a socket we track
	__u64 cookie = bpf_get_socket_cookie(tp);
	bpf_seq_write(ctx->meta->seq, &cookie, sizeof(cookie));
	return 0;
}

SEC("iter/udp")
int fwp_live_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *us = ctx->udp_sk;
	if (!us)
		return 0;
	__u64 cookie = bpf_get_socket_cookie(us);
	bpf_seq_write(ctx->meta->seq, &cookie, sizeof(cookie));
	return 0;
}

// Flow events: ALE_FLOW_ESTABLISHED and ALE_ENDPOINT_CLOSURE for the
// kernel's flows. A sockops program reports an outbound TCP connection the
// connect hook noted when it is established, a sock_release program
// reports its end when the program closes the socket (the endpoint); user
// space runs the two layers' callouts and ends the flow's contexts
// (flowDeleteFn) then. The note's events bits make each report once per
// flow. Both programs are attached beside fwp.c's (cgroup hooks run every
// attached program).
#define FLOW_EV_ESTABLISHED 1
#define FLOW_EV_CLOSED 2

// fwp_flow_cfg[0] is nonzero while user space reads flow events
// (EnableFlowEvents). The programs are attached from EnableReauthorization
// on: without reports, the sockops program still notes accepted sockets,
// which the reauthorization pass needs.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fwp_flow_cfg SEC(".maps");

static __always_inline int reporting(void)
{
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&fwp_flow_cfg, &zero);
	return on && *on;
}

// The listener records of fwp.c's bpf/inbound.h (inlisten.h; the maps
// are fwp.c's, shared by replacement at load): an accepted socket's owner
// is its listener's.
#include "inlisten.h"

// The task's fields an owner record is read from (CO-RE), as inbound.h's
// in_owner_fill reads them.
struct cred___fwpr {
	struct {
		__u32 val;
	} uid;
	struct {
		__u32 val;
	} gid;
} __attribute__((preserve_access_index));
struct css_set___fwpr {
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));
struct super_block___fwpr {
	__u32 s_dev;
} __attribute__((preserve_access_index));
struct inode___fwpr {
	unsigned long i_ino;
	struct super_block___fwpr *i_sb;
} __attribute__((preserve_access_index));
struct file___fwpr {
	struct inode___fwpr *f_inode;
} __attribute__((preserve_access_index));
struct mm_struct___fwpr {
	struct file___fwpr *exe_file;
} __attribute__((preserve_access_index));
struct task_struct___fwpr {
	int tgid;
	char comm[16];
	const struct cred___fwpr *cred;
	struct css_set___fwpr *cgroups;
	struct mm_struct___fwpr *mm;
} __attribute__((preserve_access_index));

// listen_key is a socket's listener key (inbound.h's in_listen_note):
// the namespace, its local address as the socket has it, its port.
static __always_inline void listen_key(struct bpf_sock_ops *skops, struct in_listen_key *k)
{
	k->netns = bpf_get_netns_cookie(skops);
	k->lport = skops->local_port;
	if (skops->family == AF_INET6) {
		volatile __u32 a0 = skops->local_ip6[0], a1 = skops->local_ip6[1], a2 = skops->local_ip6[2], a3 = skops->local_ip6[3];
		__u32 a[4] = {a0, a1, a2, a3};
		__builtin_memcpy(k->laddr, a, 16);
		k->v6 = 1;
	} else {
		__u32 a = skops->local_ip4;
		__builtin_memcpy(k->laddr, &a, 4);
	}
}

// note_listener records a new listener's owner (the listening process is
// current) in fwp.c's listener records, as inbound.h's in_listen does when
// the inbound hooks are attached: the reauthorization needs the owner of
// accepted sockets whatever the policy. The record goes when the socket
// stops listening (STATE_CB). A global function: its own frame.
__attribute__((noinline)) int note_listener(struct bpf_sock_ops *skops)
{
	if (!skops)
		return 0;
	struct in_listen_key k = {};
	listen_key(skops, &k);
	struct in_listener l = {.cookie = bpf_get_socket_cookie(skops)};
	struct task_struct___fwpr *task = (void *)bpf_get_current_task_btf();
	l.o.tgid = task->tgid;
	const struct cred___fwpr *cr = task->cred;
	if (cr) {
		l.o.uid = cr->uid.val;
		l.o.gid = cr->gid.val;
	}
	struct css_set___fwpr *cs = task->cgroups;
	if (cs) {
		struct cgroup *cg = cs->dfl_cgrp;
		if (cg) {
			struct kernfs_node *kn = cg->kn;
			if (kn)
				l.o.cgroup_id = kn->id;
		}
	}
	bpf_probe_read_kernel_str(l.o.comm, sizeof(l.o.comm), task->comm);
	struct mm_struct___fwpr *mm = task->mm;
	if (mm) {
		struct file___fwpr *f = mm->exe_file;
		if (f) {
			struct inode___fwpr *ino = f->f_inode;
			if (ino) {
				l.o.app_ino = ino->i_ino;
				struct super_block___fwpr *sb = ino->i_sb;
				l.o.app_dev = sb ? sb->s_dev : 0;
				l.o.has_app = 1;
			}
		}
	}
	l.o.has_owner = 1;
	if (!bpf_map_update_elem(&fwp_in_listeners, &k, &l, BPF_ANY) &&
	    !bpf_map_update_elem(&fwp_in_listen_idx, &l.cookie, &k, BPF_ANY))
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 0;
}

// forget_listener drops a listener's record when it stops listening (only
// its own), as inbound.h's in_listen_release.
static __always_inline void forget_listener(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct in_listen_key *k = bpf_map_lookup_elem(&fwp_in_listen_idx, &cookie);
	if (!k)
		return;
	struct in_listener *l = bpf_map_lookup_elem(&fwp_in_listeners, k);
	if (l && l->cookie == cookie)
		bpf_map_delete_elem(&fwp_in_listeners, k);
	bpf_map_delete_elem(&fwp_in_listen_idx, &cookie);
}

// flow_event is one report (Go: fwpreauthFlowEvent).
struct flow_event {
	struct flow_note note;
	__u64 cookie;
	__u8 src[16]; // the socket's local address
	__u8 dst[16]; // its peer
	__u16 sport;  // host order
	__u16 dport;  // host order
	__u8 type;    // FLOW_EV_*
	__u8 family;
	__u8 pad[2];
};

const struct flow_event *fwp_flow_event_type __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} fwp_flow_events SEC(".maps");

// fwp_flow_lost counts reports the ring buffer had no room for (a reader
// lagging by 1 MiB, ~7,000 reports).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} fwp_flow_lost SEC(".maps");

static __always_inline void flow_report(struct flow_note *n, __u64 cookie, __u8 type, __u8 family, __u32 *src, __u32 *dst, __u16 sport, __u16 dport)
{
	struct flow_event *e = bpf_ringbuf_reserve(&fwp_flow_events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *c = bpf_map_lookup_elem(&fwp_flow_lost, &zero);
		if (c)
			*c += 1;
		return;
	}
	__builtin_memcpy(&e->note, n, sizeof(e->note));
	e->cookie = cookie;
	__builtin_memcpy(e->src, src, 16);
	__builtin_memcpy(e->dst, dst, 16);
	e->sport = sport;
	e->dport = dport;
	e->type = type;
	e->family = family;
	e->pad[0] = 0;
	e->pad[1] = 0;
	bpf_ringbuf_submit(e, 0);
}

// note_accepted notes an accepted TCP socket (its owner: the listener's,
// from the listener records by the socket's local address, then by the
// wildcard) so that the reauthorization pass classifies it at
// AUTH_RECV_ACCEPT; src and dst are the socket's tuple. An accepted socket
// whose listener has no record (listening before the hooks) is not noted.
// A global function: its own stack frame.
// addr16: an address, for a global function's argument (its size is the
// pointee's).
struct addr16 {
	__u32 a[4];
};

__attribute__((noinline)) int note_accepted(struct bpf_sock_ops *skops, struct addr16 *sa, struct addr16 *da)
{
	if (!skops || !sa || !da)
		return 0;
	__u32 *src = sa->a, *dst = da->a;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	__u8 family = skops->family;
	struct in_listen_key k = {};
	listen_key(skops, &k);
	struct in_listener *l = bpf_map_lookup_elem(&fwp_in_listeners, &k);
	if (!l) {
		__builtin_memset(k.laddr, 0, 16);
		l = bpf_map_lookup_elem(&fwp_in_listeners, &k);
	}
	if (!l || !l->o.has_owner)
		return 0;
	struct flow_note *n = bpf_sk_storage_get(&fwp_sk_flow, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!n)
		return 0;
	// The tuple as AUTH_RECV_ACCEPT classified it: a v4 client of a
	// dual-stack listener (v4-mapped) is a v4 flow.
	int mapped = family == AF_INET6 && dst[0] == 0 && dst[1] == 0 && dst[2] == bpf_htonl(0xffff);
	if (family == AF_INET || mapped) {
		__builtin_memset(n->raddr, 0, 16);
		__builtin_memset(n->laddr, 0, 16);
		__builtin_memcpy(n->raddr, family == AF_INET ? dst : dst + 3, 4);
		__builtin_memcpy(n->laddr, family == AF_INET ? src : src + 3, 4);
		n->v6 = 0;
	} else {
		__builtin_memcpy(n->raddr, dst, 16);
		__builtin_memcpy(n->laddr, src, 16);
		n->v6 = 1;
	}
	n->rport = bpf_ntohl(skops->remote_port);
	n->lport = skops->local_port;
	n->proto = 6;
	n->has_laddr = 1;
	n->has_lport = 1;
	n->redirected = 0;
	n->inbound = 1;
	n->uid = l->o.uid;
	n->gid = l->o.gid;
	n->tgid = l->o.tgid;
	n->cgroup_id = l->o.cgroup_id;
	n->app_ino = l->o.has_app ? l->o.app_ino : 0;
	n->app_dev = l->o.has_app ? l->o.app_dev : 0;
	__builtin_memcpy(n->comm, l->o.comm, sizeof(n->comm));
	return 1;
}

// fwp_flow_sockops: an outbound TCP connection the connect hook noted is
// established (ACTIVE), or a TCP connection was accepted (PASSIVE: noted
// here); each reported once, while user space reads the reports.
SEC("sockops")
int fwp_flow_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	if (op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		note_listener(skops);
		return 1;
	}
	if (op == BPF_SOCK_OPS_STATE_CB) {
		if (skops->args[0] == BPF_TCP_LISTEN)
			forget_listener(skops);
		return 1;
	}
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	// An accepted socket inherits its listener's callback flags; they
	// are left alone (fwp.c's sockops decides whether an accepted socket
	// reports its state changes: a redirect record ends with them).
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	int report = reporting();
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && !report)
		return 1;
	// Volatile reads: the compiler must not merge the two branches' loads
	// into one through a selected pointer (the verifier refuses a context
	// pointer that is not at a constant offset).
	__u32 src[4] = {}, dst[4] = {};
	__u8 family = skops->family;
	volatile __u32 *c = (volatile __u32 *)skops;
	if (family == AF_INET) {
		src[0] = c[offsetof(struct bpf_sock_ops, local_ip4) / 4];
		dst[0] = c[offsetof(struct bpf_sock_ops, remote_ip4) / 4];
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			src[i] = c[offsetof(struct bpf_sock_ops, local_ip6) / 4 + i];
			dst[i] = c[offsetof(struct bpf_sock_ops, remote_ip6) / 4 + i];
		}
	}
	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && !note_accepted(skops, (struct addr16 *)src, (struct addr16 *)dst))
		return 1;
	struct flow_note *n = bpf_sk_storage_get(&fwp_sk_flow, sk, 0, 0);
	if (!n || (n->events & FLOW_EV_ESTABLISHED))
		return 1;
	if (!report)
		return 1;
	n->events |= FLOW_EV_ESTABLISHED;
	__builtin_memcpy(n->src, src, 16);
	__builtin_memcpy(n->dst, dst, 16);
	n->sport = skops->local_port;
	n->dport = bpf_ntohl(skops->remote_port);
	n->family = family;
	flow_report(n, bpf_get_socket_cookie(skops), FLOW_EV_ESTABLISHED, family, src, dst, n->sport, n->dport);
	return 1;
}

// udp_closing fills a connected UDP socket's event tuple (no sockops
// event established it): the peer from its note (as AUTH_CONNECT
// classified it), the local address and port the socket has now (connect
// chose them). sock_release's context is the kernel's struct sock, but the
// verifier lets it read only the peer's fields: the local ones are read
// with bpf_probe_read_kernel (CO-RE offsets); when that fails, the note's
// (bound before connect) or zero.
static __always_inline void udp_closing(struct bpf_sock *sk, struct flow_note *n)
{
	struct sock_common *skc = (struct sock_common *)sk;
	n->family = n->v6 ? AF_INET6 : AF_INET;
	__builtin_memcpy(n->dst, n->raddr, 16);
	n->dport = n->rport;
	__u32 src[4] = {};
	long err = n->v6 ? bpf_probe_read_kernel(src, 16, &skc->skc_v6_rcv_saddr)
			 : bpf_probe_read_kernel(src, 4, &skc->skc_rcv_saddr);
	if (err) {
		if (n->has_laddr)
			__builtin_memcpy(src, n->laddr, 16);
		else
			__builtin_memset(src, 0, 16);
	}
	__builtin_memcpy(n->src, src, 16);
	__u16 num = 0;
	if (bpf_probe_read_kernel(&num, sizeof(num), &skc->skc_num) != 0)
		num = n->has_lport ? n->lport : 0;
	n->sport = num;
}

// fwp_flow_release reports the end of a flow the note has: an outbound TCP
// connection established (sockops reported it) or a UDP socket its
// program connected (the connect hook noted it; no establishment report:
// docs/semantics.md).
SEC("cgroup/sock_release")
int fwp_flow_release(struct bpf_sock *sk)
{
	if (!reporting())
		return 1;
	struct flow_note *n = bpf_sk_storage_get(&fwp_sk_flow, sk, 0, 0);
	if (!n || (n->events & FLOW_EV_CLOSED))
		return 1;
	if (n->proto == IPPROTO_UDP)
		udp_closing(sk, n);
	else if (!(n->events & FLOW_EV_ESTABLISHED))
		return 1;
	n->events |= FLOW_EV_CLOSED;
	flow_report(n, bpf_get_socket_cookie(sk), FLOW_EV_CLOSED, n->family, (__u32 *)n->src, (__u32 *)n->dst, n->sport, n->dport);
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
