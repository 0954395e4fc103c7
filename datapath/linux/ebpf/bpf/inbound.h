// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// The inbound layers (issue 17): ALE_AUTH_RECV_ACCEPT and ALE_AUTH_LISTEN,
// enforced in the kernel for permit/block filters with the same walk as
// the connect layers. Included by fwp.c (it uses its maps and walk).
//
//   cgroup_skb/ingress  runs in sk_filter on the receiving socket of a
//                       hooked cgroup: an inbound SYN reaches it with the
//                       listener, a UDP datagram with the bound socket.
//                       The SYN and the first datagram of a UDP flow are
//                       classified at AUTH_RECV_ACCEPT; a block drops them
//                       (the peer sees no answer, as WFP drops inbound
//                       requests).
//   sockops LISTEN_CB   records the listening process; listen() cannot be
//                       refused there. AUTH_LISTEN is classified at the
//                       listener's first SYN (and again after a policy
//                       change); a blocked listener is marked and ingress
//                       drops every SYN to it.
//   bind4/6             record the socket's owner (the binding process: its
//                       uid, gid, cgroup, executable, pid, comm), which the
//                       inbound layers match: no process runs their hook.

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD

#include "inlisten.h"


struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sk_owner);
} fwp_sk_owner SEC(".maps");

// in_flow_key is a UDP flow as the receiving socket sees it: the socket
// (cookie), the peer and the local address it was sent to (zero for a
// flow the socket itself started: its sendmsg knows no local address).
struct in_flow_key {
	__u64 cookie;
	__u8 raddr[16];
	__u8 laddr[16];
	__u16 rport; // host order
	__u16 lport; // host order
	__u8 v6;
	__u8 pad[3];
};

struct in_flow {
	__u32 epoch;	// the policy epoch it was authorized in: valid in that one only
	__u32 outbound; // started by the socket (its AUTH_CONNECT permitted it)
};

// fwp_in_flows: the UDP flows authorized, so that only a flow's first
// datagram is classified. Bounded (LRU): a flow evicted is classified
// again at its next datagram, with the same answer under the same policy.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct in_flow_key);
	__type(value, struct in_flow);
} fwp_in_flows SEC(".maps");

// fwp_in_udp_owners: each UDP socket's owner (as in fwp_sk_owner) by
// socket cookie, for the callout path: it queues an inbound datagram
// before any socket hook runs, finds the receiving socket's cookie with
// sock_diag and its owner here (a socket's local storage cannot be read
// by cookie). Written at bind (or the implicit bind of a first send),
// removed at sock_release; bounded (LRU): a socket without a record takes
// its callout filter's flag.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct sk_owner);
} fwp_in_udp_owners SEC(".maps");

// fwp_in_epoch: a counter user space bumps after each policy switch, so
// flows and listens authorized before are classified again.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fwp_in_epoch SEC(".maps");


// The kernel types the owner is read from (CO-RE, relocated against the
// running kernel's BTF); the ___fwpin suffix keeps them apart from fwp.c's.
struct kernfs_node___fwpin {
	__u64 id;
} __attribute__((preserve_access_index));
struct cgroup___fwpin {
	struct kernfs_node___fwpin *kn;
} __attribute__((preserve_access_index));
struct css_set___fwpin {
	struct cgroup___fwpin *dfl_cgrp;
} __attribute__((preserve_access_index));
struct cred___fwpin {
	struct {
		__u32 val;
	} uid;
	struct {
		__u32 val;
	} gid;
} __attribute__((preserve_access_index));
struct task_struct___fwpin {
	int tgid;
	char comm[16];
	const struct cred___fwpin *cred;
	struct css_set___fwpin *cgroups;
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

static __always_inline __u32 in_epoch(void)
{
	__u32 zero = 0;
	__u32 *e = bpf_map_lookup_elem(&fwp_in_epoch, &zero);
	return e ? *e : 0;
}

// in_owner_fill records the current process as the socket's owner: what
// bpf_get_current_uid_gid and bpf_get_current_cgroup_id would give (the
// real uid and gid, the cgroup v2 id), its executable as app_class reads
// it, and its pid and comm for net events. Read through the task (CO-RE)
// because sockops has no such helpers.
static __always_inline void in_owner_fill(struct sk_owner *o)
{
	struct task_struct___fwpin *task = (void *)bpf_get_current_task_btf();
	o->tgid = task->tgid;
	const struct cred___fwpin *cr = task->cred;
	if (cr) {
		o->uid = cr->uid.val;
		o->gid = cr->gid.val;
	}
	struct css_set___fwpin *cs = task->cgroups;
	if (cs) {
		struct cgroup___fwpin *cg = cs->dfl_cgrp;
		if (cg) {
			struct kernfs_node___fwpin *kn = cg->kn;
			if (kn)
				o->cgroup_id = kn->id;
		}
	}
	bpf_probe_read_kernel_str(o->comm, sizeof(o->comm), task->comm);
	o->has_app = 0;
	struct mm_struct *mm = task->mm;
	if (mm) {
		struct file *f = mm->exe_file;
		if (f) {
			struct inode *ino = f->f_inode;
			if (ino) {
				o->app_ino = ino->i_ino;
				struct super_block *sb = ino->i_sb;
				o->app_dev = sb ? sb->s_dev : 0;
				o->has_app = 1;
			}
		}
	}
	o->has_owner = 1;
}

// in_note_owner: the bind hook records the binding process as the owner.
static __always_inline void in_note_owner(struct bpf_sock *sk)
{
	if (!sk)
		return;
	struct sk_owner *o = bpf_sk_storage_get(&fwp_sk_owner, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o)
		in_owner_fill(o);
}

// in_note_udp_owner copies a UDP socket's owner record into
// fwp_in_udp_owners by cookie (a global function: its own frame).
__attribute__((noinline)) int in_note_udp_owner(struct bpf_sock_addr *ctx)
{
	if (!ctx)
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->protocol != IPPROTO_UDP)
		return 0;
	struct sk_owner *o = bpf_sk_storage_get(&fwp_sk_owner, sk, 0, 0);
	if (!o)
		return 0;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_update_elem(&fwp_in_udp_owners, &cookie, o, BPF_ANY);
	return 0;
}

// in_layer_used reports whether the active policy has filters at a slot.
static __always_inline int in_layer_used(__u32 gen, __u32 slot)
{
	__u32 li = (gen & 1) * NSLOTS + slot;
	struct layer_cfg *lc = bpf_map_lookup_elem(&fwp_layers, &li);
	return lc && lc->nfilters;
}

#include "udpreply.h" // a UDP flow's later sends (in_note_udp, fwp_in_udp_permit record them)

// in_note_udp: a UDP socket of the hooked cgroups sent to a peer (its
// AUTH_CONNECT permitted it): the peer's replies are that flow, not new
// inbound ones. A socket bound implicitly (by this send) gets its owner
// here. Only while the policy has AUTH_RECV_ACCEPT filters. A global
// function: its key stays off connect's stack, which is at the verifier's
// limit with the walk's.
__attribute__((noinline)) int in_note_udp(struct bpf_sock_addr *ctx, struct tuple *t, __u32 gen)
{
	if (!t)
		return 0;
	fwp_udp_reply_note(t, in_epoch()); // its later sends are the flow's (udpreply.h)
	if (!in_layer_used(gen, SLOT_AUTH_RECV_ACCEPT + t->v6))
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (sk && !bpf_sk_storage_get(&fwp_sk_owner, sk, 0, 0)) {
		in_note_owner(sk);
		in_note_udp_owner(ctx);
	}
	struct in_flow_key k = {.cookie = t->cookie, .rport = t->rport, .v6 = t->v6};
	__builtin_memcpy(k.raddr, t->raddr, 16);
	__u32 ep = in_epoch();
	struct in_flow *f = bpf_map_lookup_elem(&fwp_in_flows, &k);
	if (f && f->outbound && f->epoch == ep)
		return 0;
	struct in_flow v = {.epoch = ep, .outbound = 1};
	bpf_map_update_elem(&fwp_in_flows, &k, &v, BPF_ANY);
	return 0;
}

// in_owner_tuple fills the process fields of an inbound tuple from the
// socket's owner; a socket with none (bound before the hooks, or never
// bound by a hooked process) has the socket's uid and cgroup, and no
// group or application (empty: they match no condition).
static __always_inline void in_owner_tuple(struct tuple *t, struct sk_owner *o, __u32 sock_uid, __u64 sock_cgid)
{
	if (o && o->has_owner) {
		t->uid = o->uid;
		t->gid = o->gid;
		t->cgid = o->cgroup_id;
		return;
	}
	t->uid = sock_uid;
	t->cgid = sock_cgid;
	t->no_gid = 1;
}

// in_app_class looks the owner's executable up in the app classes of one
// layer (the walk's field lookup would read the current task's, and no
// process runs the ingress hook).
static __always_inline void in_app_class(struct tuple *t, struct sk_owner *o, __u32 gen, __u32 slot)
{
	t->owner_app = 1;
	t->app_cls = CLASS_EMPTY;
	if (!o || !o->has_owner || !o->has_app)
		return;
	struct int_key k = {.glf = glf(gen & 1, slot, FIELD_APP), .dev = o->app_dev, .val = o->app_ino};
	__u32 *c = bpf_map_lookup_elem(&fwp_ints, &k);
	t->app_cls = c ? *c : CLASS_MISS;
}

// fwp_emit_in reports an inbound drop with the socket owner's metadata.
__attribute__((noinline)) int fwp_emit_in(struct tuple *t, struct sk_owner *o, __u64 filter_id, __u32 slot)
{
	if (!t)
		return 0;
	struct event *e = bpf_ringbuf_reserve(&fwp_events, sizeof(struct event), 0);
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	e->filter_id = filter_id;
	e->cgroup_id = t->cgid;
	e->uid = t->uid;
	e->gid = t->gid;
	e->rport = t->rport;
	e->lport = t->lport;
	__builtin_memcpy(e->raddr, t->raddr, 16);
	__builtin_memcpy(e->laddr, t->laddr, 16);
	e->type = EV_DROP;
	e->slot = slot;
	e->proto = t->proto;
	e->v6 = t->v6;
	e->has_laddr = t->has_laddr;
	if (o && o->has_owner) {
		e->pid = o->tgid;
		__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

// in_listen_tuple: a listener's local address and port (its bound
// address; a wildcard one is absent, as at bind).
static __always_inline void in_listen_tuple(struct tuple *t, __u32 family, __u32 ip4, const __u32 *ip6, __u32 port)
{
	if (family == AF_INET) {
		if (ip4) {
			__builtin_memcpy(t->laddr, &ip4, 4);
			t->has_laddr = 1;
		}
	} else {
		t->v6 = store_addr(t->laddr, ip6);
		t->has_laddr = t->v6 ? (ip6[0] | ip6[1] | ip6[2] | ip6[3]) != 0 : ip6[3] != 0;
	}
	if (port) {
		t->lport = port;
		t->has_lport = 1;
	}
	t->proto = IPPROTO_TCP;
}

// in_listen_classify runs AUTH_LISTEN for a listener and marks it in its
// owner record: blocked or not, in this policy epoch.
static __always_inline void in_listen_classify(struct sk_owner *o, struct tuple *t, __u32 ep, struct verdict *v)
{
	__u32 gen = current_gen();
	__u32 slot = SLOT_AUTH_LISTEN + t->v6;
	in_app_class(t, o, gen, slot);
	v->nocount = 0;
	fwp_classify(gen, slot, t, v);
	fwp_count(slot, v->action);
	// The answer before its epoch (a compiler barrier; x86 keeps stores
	// in order): a SYN on another CPU that sees the new epoch sees its
	// answer.
	o->listen_slot = slot;
	o->listen_blocked = v->action == ACT_BLOCK;
	o->listen_filter = v->filter_id;
	asm volatile("" ::: "memory");
	o->listen_epoch = ep + 1;
}

// in_listen_note records a new listener's owner by address for the
// callout path (a global function: its own frame).
__attribute__((noinline)) int in_listen_note(struct bpf_sock_ops *skops, struct sk_owner *o)
{
	if (!skops || !o)
		return 0;
	struct in_listen_key k = {.netns = bpf_get_netns_cookie(skops), .lport = skops->local_port};
	if (skops->family == AF_INET6) {
		// One 32-bit load each (the context allows no wider one).
		volatile __u32 a0 = skops->local_ip6[0], a1 = skops->local_ip6[1], a2 = skops->local_ip6[2], a3 = skops->local_ip6[3];
		__u32 a[4] = {a0, a1, a2, a3};
		__builtin_memcpy(k.laddr, a, 16);
		k.v6 = 1;
	} else {
		__u32 a = skops->local_ip4;
		__builtin_memcpy(k.laddr, &a, 4);
	}
	struct in_listener l = {.cookie = bpf_get_socket_cookie(skops)};
	__builtin_memcpy(&l.o, o, sizeof(l.o));
	if (!bpf_map_update_elem(&fwp_in_listeners, &k, &l, BPF_ANY) &&
	    !bpf_map_update_elem(&fwp_in_listen_idx, &l.cookie, &k, BPF_ANY))
		// Told when it stops listening (in_listen_release).
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 0;
}

// in_listen_release forgets a listener's record when it stops listening
// (only its own: another socket may hold the address by now).
static __always_inline int in_listen_release(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct in_listen_key *k = bpf_map_lookup_elem(&fwp_in_listen_idx, &cookie);
	if (!k)
		return 1;
	struct in_listener *l = bpf_map_lookup_elem(&fwp_in_listeners, k);
	if (l && l->cookie == cookie)
		bpf_map_delete_elem(&fwp_in_listeners, k);
	bpf_map_delete_elem(&fwp_in_listen_idx, &cookie);
	return 1;
}

// in_listen: sockops at listen(): the listening process is current, so
// it is recorded as the owner. The listen is classified at its first SYN
// (fwp_ingress), not here: the walk in sockops would cost the verifier
// another ~130k instructions for a decision that acts only there.
static __always_inline int in_listen(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	struct sk_owner *o = bpf_sk_storage_get(&fwp_sk_owner, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return 1;
	in_owner_fill(o);
	o->listen_epoch = 0; // not classified yet
	in_listen_note(skops, o);
	return 1;
}

// in_parse reads an inbound packet's addresses and ports (the remote side
// is its source) and, for TCP, its flags. The packet starts at the IP
// header. IPv6 extension headers are skipped (a few); -1 when the
// transport header is not found: the packet is dropped if it needed a
// classification (see fwp_ingress).
__attribute__((noinline)) int fwp_in_parse(struct __sk_buff *skb, struct tuple *t)
{
	if (!t)
		return -1;
	__u32 off;
	__u8 nh;
	if (skb->protocol == bpf_htons(ETH_P_IP_)) {
		__u8 ip[20];
		if (bpf_skb_load_bytes(skb, 0, ip, 20))
			return -1;
		off = (ip[0] & 15) * 4;
		nh = ip[9];
		__builtin_memcpy(t->raddr, ip + 12, 4);
		__builtin_memcpy(t->laddr, ip + 16, 4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6_)) {
		__u8 ip[40];
		if (bpf_skb_load_bytes(skb, 0, ip, 40))
			return -1;
		__u32 s[4], d[4];
		__builtin_memcpy(s, ip + 8, 16);
		__builtin_memcpy(d, ip + 24, 16);
		t->v6 = store_addr(t->raddr, s);
		store_addr(t->laddr, d);
		off = 40;
		nh = ip[6];
#pragma unroll
		for (int i = 0; i < 6; i++) {
			__u8 h[2];
			if (nh == 0 || nh == 43 || nh == 60 || nh == 51 || nh == 44) {
				if (bpf_skb_load_bytes(skb, off, h, 2))
					return -1;
				if (nh == 44)
					off += 8;
				else if (nh == 51)
					off += ((__u32)h[1] + 2) * 4;
				else
					off += ((__u32)h[1] + 1) * 8;
				nh = h[0];
			}
		}
	} else {
		return -1;
	}
	if (nh != t->proto)
		return -1;
	__u8 l4[14];
	if (nh == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, off, l4, 14))
			return -1;
	} else if (bpf_skb_load_bytes(skb, off, l4, 4)) {
		return -1;
	}
	t->rport = (__u16)l4[0] << 8 | l4[1];
	t->lport = (__u16)l4[2] << 8 | l4[3];
	t->has_raddr = t->has_laddr = t->has_rport = t->has_lport = 1;
	return nh == IPPROTO_TCP ? l4[13] : 0;
}

// fwp_in_udp_seen reports whether a datagram belongs to a UDP flow already
// authorized in this epoch: one the socket started (sent to the peer), or
// one permitted here.
// (Global functions keep their keys off the stack of the walk's caller.)
__attribute__((noinline)) int fwp_in_udp_seen(struct tuple *t, __u32 ep)
{
	if (!t)
		return 0;
	struct in_flow_key k = {.cookie = t->cookie, .rport = t->rport, .v6 = t->v6};
	__builtin_memcpy(k.raddr, t->raddr, 16);
	struct in_flow *f = bpf_map_lookup_elem(&fwp_in_flows, &k);
	if (f && f->epoch == ep)
		return 1;
	__builtin_memcpy(k.laddr, t->laddr, 16);
	k.lport = t->lport;
	f = bpf_map_lookup_elem(&fwp_in_flows, &k);
	return f && f->epoch == ep;
}

// fwp_in_udp_permit records a UDP flow permitted in this epoch.
__attribute__((noinline)) int fwp_in_udp_permit(struct tuple *t, __u32 ep)
{
	if (!t)
		return 0;
	struct in_flow_key k = {.cookie = t->cookie, .rport = t->rport, .lport = t->lport, .v6 = t->v6};
	__builtin_memcpy(k.raddr, t->raddr, 16);
	__builtin_memcpy(k.laddr, t->laddr, 16);
	struct in_flow v = {.epoch = ep};
	bpf_map_update_elem(&fwp_in_flows, &k, &v, BPF_ANY);
	fwp_udp_reply_note(t, ep); // the socket's replies are this flow
	return 0;
}

// fwp_ingress classifies inbound connection requests and first datagrams
// of the hooked cgroups' sockets. Everything else costs a few loads:
// packets of connected sockets (established TCP, connected UDP: their
// flow was authorized at connect or accept) return at once.
SEC("cgroup_skb/ingress")
int fwp_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	__u32 proto = sk->protocol;
	if (proto == IPPROTO_TCP) {
		if (sk->state != BPF_TCP_LISTEN)
			return 1;
	} else if (proto != IPPROTO_UDP || sk->state == BPF_TCP_ESTABLISHED) {
		return 1;
	}
	struct tuple t = {};
	struct verdict v = {};
	t.proto = proto;
	int flags = fwp_in_parse(skb, &t);
	__u32 ep = in_epoch(); // before the generation: a switch between is seen as stale
	__u32 gen = current_gen();
	if (flags < 0) {
		// Not classifiable (no transport header found): dropped when
		// the policy could have refused it, passed otherwise.
		if (in_layer_used(gen, SLOT_AUTH_RECV_ACCEPT) || in_layer_used(gen, SLOT_AUTH_RECV_ACCEPT + 1) ||
		    (proto == IPPROTO_TCP && (in_layer_used(gen, SLOT_AUTH_LISTEN) || in_layer_used(gen, SLOT_AUTH_LISTEN + 1))))
			return 0;
		return 1;
	}
	if (proto == IPPROTO_TCP && (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return 1; // not a connection request (the handshake's ACK, a RST...)
	t.cookie = bpf_get_socket_cookie(skb);
	if (proto == IPPROTO_UDP && fwp_in_udp_seen(&t, ep))
		return 1; // a reply, or a later datagram of an authorized flow
	struct sk_owner *o = bpf_sk_storage_get(&fwp_sk_owner, sk, 0, 0);
	// The socket's uid and cgroup are asked where used, not kept: two
	// spills less in the frame that heads the deepest call chain
	// (ingress + fwp_classify + fwp_host_class, at most 512 bytes).
#define suid bpf_get_socket_uid(skb)
#define scg bpf_skb_cgroup_id(skb)
	if (proto == IPPROTO_TCP) {
		// AUTH_LISTEN, classified at the listener's first SYN and
		// again after a policy change, with what listen() had: the
		// listener's bound address and its owner.
		if (!o || o->listen_epoch != ep + 1) {
			if (!o)
				o = bpf_sk_storage_get(&fwp_sk_owner, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (o) {
				// The tuple is the listener's, then the packet's
				// again (parsed anew: rare, and the stack is tight).
				__builtin_memset(&t, 0, sizeof(t));
				__u32 *ip6 = (__u32 *)t.raddr;
				LOAD_IP6(ip6, sk->src_ip6);
				in_listen_tuple(&t, sk->family, sk->src_ip4, ip6, sk->src_port);
				__builtin_memset(t.raddr, 0, 16);
				in_owner_tuple(&t, o, suid, scg);
				in_listen_classify(o, &t, ep, &v);
				__builtin_memset(&t, 0, sizeof(t));
				t.proto = proto;
				if (fwp_in_parse(skb, &t) < 0)
					return 0;
				t.cookie = bpf_get_socket_cookie(skb);
			}
		}
		if (o && o->listen_blocked) {
			// Each SYN refused is a drop event (the listen was
			// counted once, when classified).
			in_owner_tuple(&t, o, suid, scg);
			fwp_emit_in(&t, o, o->listen_filter, o->listen_slot);
			return 0;
		}
	}
	__u32 rslot = SLOT_AUTH_RECV_ACCEPT + t.v6;
	if (!in_layer_used(gen, rslot)) {
		// Nothing to decide. A UDP flow is still recorded when a send
		// could be refused or redirected, so that the socket's replies
		// pass as the flow's (udpreply.h) and its next datagrams return
		// at fwp_in_udp_seen.
		if (proto == IPPROTO_UDP && udp_reply_wanted(gen, t.v6))
			fwp_in_udp_permit(&t, ep);
		return 1;
	}
	in_owner_tuple(&t, o, suid, scg);
	in_app_class(&t, o, gen, rslot);
	v.nocount = 0;
	fwp_classify(gen, rslot, &t, &v);
	if (v.callout) {
		// A Go callout decides: the callout path queued the SYN or the
		// UDP flow's first datagram at netfilter's input hook, which
		// runs before this one, and its permit is the verdict's mark (a
		// block dropped the packet in the queue). fwp's input chain
		// clears the bit on every SYN and datagram before queueing (a
		// datagram of a flow permitted before gets it back from its
		// conntrack entry) and a peer cannot set skb->mark, so a packet
		// without it was not answered by user space (no reader, a full
		// queue): the filter's PERMIT_IF_CALLOUT_UNREGISTERED decides.
		if (skb->mark & FWP_MARK_PERMIT) {
			if (proto == IPPROTO_UDP)
				fwp_in_udp_permit(&t, ep);
			return 1;
		}
		v.action = (v.callout_flags & FM_FAIL_OPEN) ? ACT_PERMIT : ACT_BLOCK;
		v.filter_id = v.callout;
	}
	fwp_count(rslot, v.action);
	if (v.action == ACT_BLOCK) {
		fwp_emit_in(&t, o, v.filter_id, rslot);
		return 0;
	}
	if (proto == IPPROTO_UDP)
		fwp_in_udp_permit(&t, ep);
	return 1;
#undef suid
#undef scg
}
