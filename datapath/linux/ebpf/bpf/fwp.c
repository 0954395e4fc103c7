// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// fwp's kernel datapath: cgroup socket hooks that classify connect, sendmsg
// and bind against the policy compiled into maps by the Go side (policy.go),
// and carry out fwp's built-in connect redirect.
//
// Classification is bit-vector based: every filter of a layer has a rank
// (its place in the engine's evaluation order). For each condition field a
// lookup maps the incoming value to a "class", and each class owns a bitset
// over ranks: the filters whose conditions on that field accept the value
// (filters without a condition on the field are set in every class). ANDing
// the field bitsets gives the matching filters; walking the set bits in rank
// order applies WFP arbitration. Every policy map key carries a generation,
// so a new policy is written beside the active one and switched by one write.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define NSLOTS 12  // layers: (kind 0..5) * 2 + v6
#define NFIELDS 10 // see FIELD_*
#define NWORDS 256 // bitset words: up to 16384 filters per layer
#define NSUM 4     // summary words: one bit per nonzero bitset word
#define MAXF (NWORDS * 64)
#define MAXR 1024 // redirect configurations per generation
#define CTXMAX 128

#define SLOT_CONNECT_REDIRECT 0
#define SLOT_AUTH_CONNECT 2
#define SLOT_BIND_REDIRECT 4
#define SLOT_RESOURCE_ASSIGNMENT 6
#define SLOT_AUTH_RECV_ACCEPT 8 // cgroup_skb/ingress (bpf/inbound.h)
#define SLOT_AUTH_LISTEN 10     // sockops TCP_LISTEN_CB, enforced at ingress

#define FIELD_RADDR 0
#define FIELD_LADDR 1
#define FIELD_RPORT 2
#define FIELD_LPORT 3
#define FIELD_PROTO 4
#define FIELD_UID 5
#define FIELD_CGROUP 6
#define FIELD_APP 7 // the executable: (device, inode) of the process's exe file
#define FIELD_GID 8 // the caller's gid
#define FIELD_ALL 9

#define ACT_BLOCK 1
#define ACT_PERMIT 2
#define ACT_REDIRECT 3
#define ACT_CALLOUT 4 // a Go callout decides: the flow goes to user space

#define FM_FAIL_OPEN 1	     // filter_meta.flags: PERMIT_IF_CALLOUT_UNREGISTERED
#define FM_CALLOUTS_LATER 2 // a callout filter follows in the layer: a hard decision does not end the walk

// Socket and packet mark bits of the callout path (Go: ebpf.Mark*). The
// connect hook sets one of the queue bits on a socket whose flow a Go
// callout decides; fwp's nftables rules queue that flow's SYN to user
// space, which answers with the permit or block bit.
#define FWP_MARK_MASK 0x0f000000
#define FWP_MARK_QUEUE_OPEN 0x01000000   // fail open: queue bypassed without a reader
#define FWP_MARK_QUEUE_CLOSED 0x02000000 // fail closed
#define FWP_MARK_PERMIT 0x04000000       // verdict: permitted (an inbound SYN: bpf/inbound.h)
#define SOL_SOCKET 1
#define SO_MARK 36

#define SO_ORIGINAL_DST 80
#define SOL_IP 0
#define SOL_IPV6 41
#define AF_INET 2
#define AF_INET6 10

struct config {
	__u32 gen;
	__u32 pad;
};

struct layer_cfg {
	__u32 nfilters;
	__u32 nwords;
	__u32 active;		     // bit per field with any condition
	__u32 default_class[NFIELDS]; // value present, no lookup entry
	__u32 empty_class[NFIELDS];   // value absent (e.g. local port before bind)
};

struct filter_meta {
	__u64 id;
	__u8 action;
	__u8 hard;
	__u16 flags; // FM_*
	__u32 sub_end; // rank of the first filter of the next sublayer
	__u32 redirect;
	__u32 handle;
};

struct bitset {
	__u64 sum[NSUM];
	__u64 w[NWORDS];
};

struct bs_key {
	__u32 glf;
	__u32 cls;
};

struct addr_key {
	__u32 prefixlen;
	__u32 glf;
	__u8 addr[16];
};

struct int_key {
	__u32 glf;
	__u32 dev; // FIELD_APP: the executable's device (kernel dev_t); 0 otherwise
	__u64 val; // FIELD_APP: its inode number
};

struct port_block {
	__u16 cls[32];
};

struct redirect_cfg {
	__u8 addr[16];
	__u16 port; // host order; 0 keeps the port (bind redirect)
	__u8 v6;
	__u8 keep_addr; // bind redirect: change the port only
	__u32 pid;
	__u32 handle;
	__u32 ctx_len;
	__u8 ctx[CTXMAX];
};

// redirect_state is what the connect hook records for a redirected socket;
// the Go side reads it as RedirectState.
struct redirect_state {
	__u8 orig_addr[16];
	__u8 proxy_addr[16];
	__u16 orig_port;  // host order
	__u16 proxy_port; // host order
	__u8 orig_v6;
	__u8 proxy_v6;
	__u8 proto;
	// A TCP 4-tuple record: 1 once the proxy's side of the connection
	// exists (sockops saw it established); a record of a connection whose
	// handshake never completed there is swept by user space.
	__u8 accepted;
	__u32 handle;
	__u32 target_pid;
	__u32 pid; // tgid of the connecting process
	__u32 uid;
	__u32 gid;
	// A UDP client's 4-tuple record: when (CLOCK_MONOTONIC seconds) the
	// socket closed; kept a grace period for datagrams still queued to the
	// proxy, then gone (Redirects.QueryRedirect). 0 while open.
	__u32 released;
	__u64 cookie;
	__u64 filter_id;
	__u64 cgroup_id;
	char comm[16];
	__u32 ctx_len;
	__u32 pad2;
	__u8 ctx[CTXMAX];
};

struct tuple_key {
	__u8 client[16];
	__u8 proxy[16];
	__u16 client_port; // host order
	__u16 proxy_port;  // host order
	__u8 v6;
	__u8 pad[3];
};

#define MAXRECORDS 8
struct records {
	__u32 n;
	__u32 handles[MAXRECORDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} fwp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * NSLOTS);
	__type(key, __u32);
	__type(value, struct layer_cfg);
} fwp_layers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * NSLOTS * MAXF);
	__type(key, __u32);
	__type(value, struct filter_meta);
} fwp_filters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct bs_key);
	__type(value, struct bitset);
} fwp_bitsets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct addr_key);
	__type(value, __u32);
} fwp_addrs SEC(".maps");

// Ports: per (gen, slot, local/remote) 2048 blocks of 32 class ids.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * NSLOTS * 2 * 2048);
	__type(key, __u32);
	__type(value, struct port_block);
} fwp_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct int_key);
	__type(value, __u32);
} fwp_ints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAXR);
	__type(key, __u32);
	__type(value, struct redirect_cfg);
} fwp_redirects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct redirect_state);
} fwp_sock_redirect SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple_key);
	__type(value, struct redirect_state);
} fwp_tuple_redirect SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct records);
} fwp_sock_records SEC(".maps");

// Records a proxy set with setsockopt(SOL_FWP), until the socket's connect
// moves them to fwp_sock_records (or the socket goes, and them with it).
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct records);
} fwp_sk_records SEC(".maps");

// A redirected UDP socket's 4-tuple key (by its cookie), written with its
// fwp_tuple_redirect record: sock_release cannot read a socket's source.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct tuple_key);
} fwp_udp_key SEC(".maps");

// The ports redirects send traffic to (a proxy's, a bind redirect's),
// set by user space before a policy naming them takes effect and never
// cleared while loaded: getpeername and recvmsg look for a socket's
// redirect only when its peer is on one of them.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} fwp_proxy_ports SEC(".maps");

// fwp_zero_state is one all-zero redirect_state, read-only to the
// programs: the connect hook inserts it for a socket's cookie and fills
// the map's own copy in place, so every field starts initialised and no
// scratch memory is needed (the value is too big for the stack, a per-CPU
// slot could be reused by a run that preempts this one on the same CPU,
// and a ring buffer nothing consumes never frees its space).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct redirect_state);
} fwp_zero_state SEC(".maps");

// flow_key is a TCP flow as its first packet carries it: the local
// (source) and remote (destination) address and port, v4 addresses in the
// first 4 bytes. User space finds a queued SYN's socket by it.
struct flow_key {
	__u8 local[16];
	__u8 remote[16];
	__u16 local_port;  // host order
	__u16 remote_port; // host order
	__u8 v6;
	__u8 pad[3];
};

// callout_flow is what the connect hook captured for a flow a Go callout
// decides (Go: CalloutFlow): the tuple it classified, at which layer the
// walk met the callout, and the connecting process.
struct callout_flow {
	__u8 raddr[16];
	__u8 laddr[16];
	__u64 cookie;
	__u64 cgroup_id;
	__u64 filter_id; // the callout filter the walk stopped at
	__u32 pid;	 // thread id
	__u32 tgid;	 // process id
	__u32 uid;
	__u32 gid;
	__u16 rport; // host order
	__u16 lport; // host order
	__u8 proto;
	__u8 v6;
	__u8 has_laddr;
	__u8 has_lport;
	__u8 slot;	 // SLOT_CONNECT_REDIRECT or SLOT_AUTH_CONNECT (+ v6)
	__u8 redirected; // the kernel redirected it before AUTH_CONNECT
	__u8 indexed;	 // key is set (sockops saw the SYN about to leave)
	__u8 fail_open;
	__u8 verdict; // set by user space once decided: 1 permit, 2 block (a resent SYN gets it again)
	__u8 pad[3];
	char comm[16];
	struct flow_key key;
};

// fwp_callout_flows: the flows waiting for a Go callout, by socket cookie;
// the entry goes with the socket (sock_release).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct callout_flow);
} fwp_callout_flows SEC(".maps");

// fwp_callout_tuples holds a waiting flow's record by its 4-tuple (copied
// by sockops when the source port exists), so user space finds it with one
// lookup, and notes its verdict there; sock_release removes it with the
// socket.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct callout_flow);
} fwp_callout_tuples SEC(".maps");

// callout_cfg: the network namespace (cookie) whose queues a callout path
// reads; 0 while none does.
struct callout_cfg {
	__u64 netns;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct callout_cfg);
} fwp_callout_cfg SEC(".maps");

#define EV_DROP 1
#define EV_REDIRECT 2

// event is one drop or redirect, for net events; the Go side reads it as
// fwpEvent. Process metadata is captured here, in the hook.
struct event {
	__u64 filter_id;
	__u64 cgroup_id;
	__u32 pid; // tgid
	__u32 uid;
	__u32 gid;
	__u16 rport; // host order
	__u16 lport; // host order
	__u8 raddr[16];
	__u8 laddr[16];
	__u8 proxy_addr[16];
	__u16 proxy_port;
	__u8 type;
	__u8 slot;
	__u8 proto;
	__u8 v6;
	__u8 has_laddr;
	__u8 proxy_v6;
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} fwp_events SEC(".maps");

// fwp_hits counts, per CPU, the classifications each filter decided.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} fwp_hits SEC(".maps");

// Redirect records by socket: made by the connect hook, ended by
// sock_release or a block at AUTH_CONNECT (fwp_kernel_redirect_records_total;
// made less released is the open sockets' records plus any a release
// never ended).
__u64 fwp_rec_made, fwp_rec_released;

// fwp_counts counts, per CPU, the kernel's classifications by layer slot
// and outcome: index slot * 2 + (1 for block, 0 for permit).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NSLOTS * 2);
	__type(key, __u32);
	__type(value, __u64);
} fwp_counts SEC(".maps");

static __always_inline void fwp_count(__u32 slot, __u32 action)
{
	__u32 k = (slot % NSLOTS) * 2 + (action == ACT_BLOCK);
	__u64 *c = bpf_map_lookup_elem(&fwp_counts, &k);
	if (c)
		*c += 1;
}

struct tuple {
	__u8 raddr[16];
	__u8 laddr[16];
	__u64 cgid;
	__u64 cookie;
	__u32 uid;
	__u32 gid;
	__u16 rport; // host order
	__u16 lport; // host order
	__u8 proto;
	__u8 v6;
	__u8 has_raddr;
	__u8 has_laddr;
	__u8 has_rport;
	__u8 has_lport;
	// owner_app: bit TO_OWNER_APP: the app field's class is app_cls, the
	// socket owner's executable looked up by the inbound layers
	// (bpf/inbound.h), not the current task's; bit TO_REDIRECTED: the
	// built-in connect redirect ran before this AUTH_CONNECT (the flags
	// field's IS_CONNECTION_REDIRECTED). (In the padding: the stack of
	// connect is at its limit.)
	__u8 owner_app;
	__u8 no_gid; // the group is unknown (an inbound socket without owner): empty
	__u32 app_cls;
};

struct walk {
	struct bitset *bs[NFIELDS];
	struct records *rec;
	__u64 sum[NSUM];
	__u64 sumbits;
	__u64 bits;
	__u64 decider;
	__u32 chunk;
	__u32 word;
	__u32 skip_to;
	__u32 base;
	__u32 redirect; // chosen redirect index + 1
	__u8 action;
	__u8 write; // at the end of a walk stopped by a callout filter: its flags
};

// ctz64 counts the trailing zeros of a nonzero x without branches: a
// branchy count gives the verifier a constant per path, and the walk
// callback's state (word, rank) would never converge across iterations.
static __always_inline __u32 ctz64(__u64 x)
{
	__u64 v = (x & -x) - 1; // the bits below the lowest set bit
	v = v - ((v >> 1) & 0x5555555555555555ULL);
	v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
	v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (v * 0x0101010101010101ULL) >> 56;
}

static __always_inline __u32 glf(__u32 gen, __u32 slot, __u32 field)
{
	return gen << 16 | slot << 8 | field;
}

static __always_inline int has_record(struct records *rec, __u32 handle)
{
	if (!rec)
		return 0;
#pragma unroll
	for (int i = 0; i < MAXRECORDS; i++)
		if (i < rec->n && rec->handles[i] == handle)
			return 1;
	return 0;
}

// WORDS_PER_STEP is how many nonzero summary words a walk step may AND.
// Measured at 10k filters, 4 or 8 were no faster than 1 (the loads, not the
// bpf_loop calls, dominate) and cost the verifier 2.5-4x the instructions.
#define WORDS_PER_STEP 1

// and_word ANDs one word of every field's bitset, stopping at zero: most
// words come out zero after a field or two.
static __always_inline __u64 and_word(struct walk *w, __u32 word)
{
	__u64 x = ~0ULL;
#pragma unroll
	for (int f = 0; f < NFIELDS; f++) {
		struct bitset *b = w->bs[f];
		if (!b)
			return 0;
		x &= b->w[word & (NWORDS - 1)];
		if (!x)
			return 0;
	}
	return x;
}

// walk_step is the bpf_loop callback. The verifier re-verifies a callback
// until the state it returns with falls within one already seen, comparing
// every scalar's range: the fields of w it carries from step to step must
// not hold a different constant on each path (see ctz64), or each constant
// is verified anew. Check with TestVerifierHeadroom after changing it.
static int walk_step(__u32 index, struct walk *w)
{
	if (w->bits) {
		__u64 low = w->bits & -w->bits;
		w->bits &= w->bits - 1;
		__u32 rank = w->word * 64 + ctz64(low);
		if (rank < w->skip_to)
			return 0;
		if (rank >= MAXF)
			return 1;
		__u32 key = w->base + rank;
		struct filter_meta *m = bpf_map_lookup_elem(&fwp_filters, &key);
		if (!m)
			return 1;
		__u8 act = m->action;
		if (act == ACT_CALLOUT) {
			// A Go callout can still change the decision unless a
			// hard block is in force: then the walk ends here.
			// Otherwise it ends with the callout filter as the
			// decider (no new state carried from step to step).
			if (w->action == ACT_BLOCK && !w->write)
				return 1;
			w->action = ACT_CALLOUT;
			w->decider = m->id;
			w->write = m->flags;
			return 1;
		}
		if (act == ACT_REDIRECT) {
			// A socket carrying a record of this redirect is the
			// proxy's own: the callout passes (no loop).
			if (has_record(w->rec, m->handle))
				return 0;
			if (!w->redirect)
				w->redirect = m->redirect + 1;
			act = ACT_PERMIT;
		}
		if (w->action == 0 || w->write) {
			w->action = act;
			w->write = !m->hard;
			w->decider = m->id;
		}
		w->skip_to = m->sub_end;
		// A hard decision is final unless a callout filter follows:
		// one may veto a hard permit (below a hard block the walk ends
		// at the first callout filter).
		return (w->write || (m->flags & FM_CALLOUTS_LATER)) ? 0 : 1;
	}
	if (w->sumbits) {
#pragma unroll
		for (int k = 0; k < WORDS_PER_STEP; k++) {
			if (!w->sumbits)
				return 0;
			__u64 low = w->sumbits & -w->sumbits;
			w->sumbits &= w->sumbits - 1;
			__u32 word = w->chunk * 64 + ctz64(low);
			if (word >= NWORDS)
				return 1;
			__u64 x = and_word(w, word);
			if (x) {
				w->bits = x;
				w->word = word;
				return 0;
			}
		}
		return 0;
	}
	w->chunk++;
	if (w->chunk >= NSUM)
		return 1;
	__u32 c = w->chunk;
	if (c < NSUM)
		w->sumbits = w->sum[c];
	return 0;
}

#define CLASS_MISS 0xffffffffU  // no lookup entry: the field's default class
#define CLASS_EMPTY 0xfffffffeU // value absent: the field's empty class

static __always_inline __u32 addr_class(__u32 g, __u8 has, __u8 *addr, __u8 v6)
{
	if (!has)
		return CLASS_EMPTY;
	struct addr_key k = {.prefixlen = 32 + (v6 ? 128 : 32), .glf = g};
	__builtin_memcpy(k.addr, addr, 16);
	__u32 *c = bpf_map_lookup_elem(&fwp_addrs, &k);
	return c ? *c : CLASS_MISS;
}

static __always_inline __u32 port_class(__u32 gen, __u32 slot, __u32 local, __u8 has, __u16 port)
{
	if (!has)
		return CLASS_EMPTY;
	__u32 k = ((gen * NSLOTS + slot) * 2 + local) * 2048 + (port >> 5);
	struct port_block *b = bpf_map_lookup_elem(&fwp_ports, &k);
	if (!b)
		return CLASS_MISS;
	return b->cls[port & 31];
}

static __always_inline __u32 int_class(__u32 g, __u64 v)
{
	struct int_key k = {.glf = g, .val = v};
	__u32 *c = bpf_map_lookup_elem(&fwp_ints, &k);
	return c ? *c : CLASS_MISS;
}

// Host tables (issue 15): the v4 host addresses of large address lists
// and runs of host filters, sorted, in one mmapable array that user space
// fills with a copy (no per-entry map update: a million addresses take
// milliseconds, where the LPM trie took seconds). A generation owns one
// half. fwp_host_runs gives each (generation, layer, address field) the
// slice of hosts that all have one class (found there first: a host is
// the longest prefix); fwp_id_runs gives each collapsed run of host
// filters (a filter meta whose id has RUN_BIT) the slice of its hosts,
// and fwp_host_ids the filter id of each, for net events and counters.
#define RUN_BIT (1ULL << 63)
#define MAXRUNS 64 // collapsed runs per layer and generation

struct host_run {
	__u32 off; // first index in fwp_hosts
	__u32 len;
	__u32 cls; // fwp_host_runs: the hosts' class; fwp_id_runs: a second slice's off
	__u32 pad; // fwp_id_runs: the second slice's len
};

// Blocks of hosts: an array element takes a multiple of 8 bytes, so a
// 4-byte element would take 8 in the mapped memory.
#define HOST_BLOCK 1024
struct host_block {
	__u32 h[HOST_BLOCK];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 2048); // blocks: Options.MaxHosts / HOST_BLOCK
	__type(key, __u32);
	__type(value, struct host_block);
} fwp_hosts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 2048); // as fwp_hosts
	__type(key, __u32);
	__type(value, struct host_block);
} fwp_host_ids SEC(".maps");

// host_at is fwp_hosts (or fwp_host_ids) entry i, or 0 when out of
// range; *key is the lookup's key slot (one slot for a whole search: this
// stack counts in the deepest call chain).
static __always_inline __u32 *host_at(void *map, __u32 i, __u32 *key)
{
	*key = i / HOST_BLOCK;
	struct host_block *blk = bpf_map_lookup_elem(map, key);
	if (!blk)
		return 0;
	return &blk->h[i & (HOST_BLOCK - 1)];
}

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * NSLOTS * 2);
	__type(key, __u32);
	__type(value, struct host_run);
} fwp_host_runs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * NSLOTS * MAXRUNS);
	__type(key, __u32);
	__type(value, struct host_run);
} fwp_id_runs SEC(".maps");

// host_find returns the index of x in the sorted fwp_hosts[off,
// off+len), or -1: a binary search unrolled over at most 2^23 entries,
// branch-free but for the lookups (a branch per step would give the
// verifier 2^23 paths), on no stack (the deepest call chain's stack is
// bounded at 512 bytes and the walk takes most of it).
#define HOST_STEPS 23
static __always_inline int host_find(__u32 off, __u32 len, __u32 x, __u32 *key)
{
	if (!len || len > (1U << HOST_STEPS))
		return -1;
	__u32 base = off, n = len;
#pragma unroll
	for (int i = 0; i < HOST_STEPS; i++) {
		__u32 half = n / 2;
		__u32 *v = host_at(&fwp_hosts, base + half, key);
		if (!v)
			return -1;
		// v <= x: move up by half (the mask is all ones when x - v
		// does not borrow).
		__u64 keep = ((__u64)x - (__u64)*v) >> 63; // 1 when v > x
		base += half & (__u32)(keep - 1);
		n -= half;
	}
	__u32 *v = host_at(&fwp_hosts, base, key);
	if (v && *v == x)
		return base & 0x7fffffff;
	return -1;
}

static __always_inline __u32 load_be32(__u8 *a)
{
	return (__u32)a[0] << 24 | (__u32)a[1] << 16 | (__u32)a[2] << 8 | a[3];
}

// fwp_host_class classifies a v4 address by its field's host table, or
// returns CLASS_MISS (then the LPM trie decides). A global function of
// its own called from fwp_classify: the search's spills stay out of the
// deepest call chain's stack (prog + fwp_classify + fwp_field_class).
__attribute__((noinline)) int fwp_host_class(__u32 li, __u32 which, struct tuple *t)
{
	if (!t || t->v6 || !(which ? t->has_laddr : t->has_raddr))
		return CLASS_MISS;
	__u32 k = li * 2 + (which & 1);
	struct host_run *r = bpf_map_lookup_elem(&fwp_host_runs, &k);
	if (!r || !r->len)
		return CLASS_MISS;
	__u32 key;
	if (host_find(r->off, r->len, load_be32(which ? t->laddr : t->raddr), &key) < 0)
		return CLASS_MISS;
	// Looked up again rather than kept across the search: one register
	// less to spill (this function's stack counts in the deepest chain).
	r = bpf_map_lookup_elem(&fwp_host_runs, &k);
	return r ? r->cls : CLASS_MISS;
}

// fwp_run_decider is the id of the filter of a collapsed run (meta id
// RUN_BIT | run) that holds the tuple's remote address: the first of the
// run in rank order (Compile keeps one filter per host).
__attribute__((noinline)) __u64 fwp_run_decider(__u32 li, __u64 id, struct tuple *t)
{
	if (!t || t->v6)
		return 0;
	__u32 k = li * MAXRUNS + (__u32)(id & (MAXRUNS - 1));
	struct host_run *r = bpf_map_lookup_elem(&fwp_id_runs, &k);
	if (!r)
		return 0;
	__u32 x = load_be32(t->raddr);
	int i = host_find(r->off, r->len, x, &k);
	if (i < 0) {
		// Not in the host table: in the run's own slice (cls, pad).
		k = li * MAXRUNS + (__u32)(id & (MAXRUNS - 1));
		r = bpf_map_lookup_elem(&fwp_id_runs, &k);
		if (!r)
			return 0;
		i = host_find(r->cls, r->pad, x, &k);
	}
	if (i < 0)
		return 0;
	__u32 *fid = host_at(&fwp_host_ids, i, &k);
	return fid ? *fid : 0;
}

// The few kernel types the app field reads, relocated against the running
// kernel's BTF (CO-RE): only the fields named here are used.
struct super_block {
	__u32 s_dev;
} __attribute__((preserve_access_index));
struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));
struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));
struct mm_struct {
	struct file *exe_file;
} __attribute__((preserve_access_index));
struct task_struct {
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

// app_class classifies the calling process by its executable: the file
// the kernel keeps as mm->exe_file (what /proc/PID/exe shows), set by
// exec and shared by the process's threads, so no exec tracker or
// per-process map is needed: a process that started before fwpd is known
// as well as one that just exec'd, and identity changes the moment exec
// replaces the mm. A file is its device and inode, so a hard link or a
// bind mount is the same application and a copy is another. A kernel
// thread (no mm) has no executable: the empty class.
static __always_inline __u32 app_class(__u32 g)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = task->mm;
	if (!mm)
		return CLASS_EMPTY;
	struct file *f = mm->exe_file;
	if (!f)
		return CLASS_EMPTY;
	struct inode *ino = f->f_inode;
	if (!ino)
		return CLASS_EMPTY;
	struct int_key k = {.glf = g};
	k.val = ino->i_ino;
	struct super_block *sb = ino->i_sb;
	if (sb)
		k.dev = sb->s_dev;
	__u32 *c = bpf_map_lookup_elem(&fwp_ints, &k);
	return c ? *c : CLASS_MISS;
}

// Condition flags the hooks know, as the index bits of the flags value
// folded into the protocol field's key (policy.go: flagIndex).
#define TO_OWNER_APP 1
#define TO_REDIRECTED 2
#define TF_LOOPBACK 1 // FWP_CONDITION_FLAG_IS_LOOPBACK
#define TF_WILDCARD 2 // FWP_CONDITION_FLAG_IS_WILDCARD_BIND
#define TF_REDIRECTED 4 // FWP_CONDITION_FLAG_IS_CONNECTION_REDIRECTED
#define ACTIVE_FLAGS (1U << 31) // layer_cfg.active: flags folded into FIELD_PROTO
#define FIELD_FOLD 0x100 // fwp_field_class: fold the flags into the protocol's key

// tuple_flags is the flags word's index as the engine's datapaths compute
// it: loopback when the remote address is (127/8 or ::1; a v4-mapped
// address is v4 in the tuple), wildcard bind at the bind layers when the
// local address is unspecified, redirected after the built-in redirect.
// IS_REAUTHORIZE is never set here: a hook classifies each connect once.
static __always_inline __u32 tuple_flags(__u32 slot, struct tuple *t)
{
	__u32 x = 0;
	// AUTH_LISTEN has no remote endpoint in WFP (the tuple's is the
	// SYN's): never loopback there.
	if (t->has_raddr && (slot & ~1U) != SLOT_AUTH_LISTEN) {
		if (!t->v6) {
			if (t->raddr[0] == 127)
				x |= TF_LOOPBACK;
		} else {
			__u64 a, b;
			__builtin_memcpy(&a, t->raddr, 8);
			__builtin_memcpy(&b, t->raddr + 8, 8);
			if (a == 0 && b == bpf_cpu_to_be64(1))
				x |= TF_LOOPBACK;
		}
	}
	if ((slot & ~1U) == SLOT_BIND_REDIRECT || (slot & ~1U) == SLOT_RESOURCE_ASSIGNMENT)
		if (!t->has_laddr)
			x |= TF_WILDCARD;
	if (t->owner_app & TO_REDIRECTED)
		x |= TF_REDIRECTED;
	return x;
}

// field_class maps one field of the tuple to its class at layer li, or
// CLASS_MISS / CLASS_EMPTY. It is a global function so the verifier checks
// it once, not once per path.
__attribute__((noinline)) int fwp_field_class(__u32 li, __u32 f, struct tuple *t)
{
	if (!t)
		return CLASS_MISS;
	__u32 fold = f & FIELD_FOLD;
	f &= ~FIELD_FOLD;
	__u32 gen = li / NSLOTS, slot = li % NSLOTS;
	__u32 g = glf(gen, slot, f);
	switch (f) {
	case FIELD_RADDR:
		return addr_class(g, t->has_raddr, t->raddr, t->v6);
	case FIELD_LADDR:
		return addr_class(g, t->has_laddr, t->laddr, t->v6);
	case FIELD_RPORT:
		return port_class(gen, slot, 0, t->has_rport, t->rport);
	case FIELD_LPORT:
		return port_class(gen, slot, 1, t->has_lport, t->lport);
	case FIELD_PROTO:
		if (fold)
			return int_class(g, t->proto | (tuple_flags(slot, t) << 8));
		return int_class(g, t->proto);
	case FIELD_UID:
		return int_class(g, t->uid);
	case FIELD_APP:
		if (t->owner_app & TO_OWNER_APP)
			return t->app_cls;
		return app_class(g);
	case FIELD_GID:
		if (t->no_gid)
			return CLASS_EMPTY;
		return int_class(g, t->gid);
	}
	return int_class(g, t->cgid);
}

struct verdict {
	__u64 filter_id;
	__u32 redirect; // index + 1 of the chosen redirect, 0 for none
	__u32 action;
	__u32 nocount; // in: the caller counts the decision (count_hit)
	__u64 callout; // a callout filter decides: user space classifies
	__u32 callout_flags;
	__u32 pad;
};

// count_hit counts a classification the filter id decided.
static __always_inline void count_hit(__u64 id)
{
	if (!id)
		return;
	__u64 *c = bpf_map_lookup_elem(&fwp_hits, &id);
	if (c) {
		*c += 1;
	} else {
		__u64 one = 1;
		bpf_map_update_elem(&fwp_hits, &id, &one, BPF_NOEXIST);
	}
}

// ACTIVE_NO_TRIE + f (f: FIELD_RADDR, FIELD_LADDR) in layer_cfg.active:
// the generation put no prefix of the field in the LPM trie (its
// addresses are all in a host table, or it has none), so a present
// address the host table missed takes the default class without a trie
// lookup (issue 15: ~0.1 us of a connect). Set, not clear, by user space:
// a generation written without it is looked up as before.
#define ACTIVE_NO_TRIE 16
static __always_inline int trie_empty(__u32 active, int f, struct tuple *t)
{
	if (f == FIELD_RADDR)
		return (active & (1U << (ACTIVE_NO_TRIE + FIELD_RADDR))) && t->has_raddr;
	if (f == FIELD_LADDR)
		return (active & (1U << (ACTIVE_NO_TRIE + FIELD_LADDR))) && t->has_laddr;
	return 0;
}

// fwp_classify runs one layer over the tuple and fills v with ACT_BLOCK or
// ACT_PERMIT and, at CONNECT_REDIRECT, the chosen redirect.
__attribute__((noinline)) int fwp_classify(__u32 gen, __u32 slot, struct tuple *t, struct verdict *v)
{
	if (!t || !v)
		return 0;
	v->action = ACT_PERMIT;
	v->redirect = 0;
	v->filter_id = 0;
	v->callout = 0;
	v->callout_flags = 0;
	gen &= 1;
	if (slot >= NSLOTS)
		return 0;
	__u32 li = gen * NSLOTS + slot;
	struct layer_cfg *lc = bpf_map_lookup_elem(&fwp_layers, &li);
	if (!lc || lc->nfilters == 0)
		return 0;
	struct walk w = {};
	__u64 cookie = t->cookie;
	// Only connect redirect filters consult the socket's records (bind
	// has no cookie): other layers save the lookup.
	if (cookie && slot < SLOT_AUTH_CONNECT)
		w.rec = bpf_map_lookup_elem(&fwp_sock_records, &cookie);
	w.base = li * MAXF;
	__u32 active = lc->active;
	__u32 n = lc->nfilters;
	// Only the fields with conditions are looked up. Their classes hold
	// installed filters only, so the all-filters bitset adds nothing to
	// the AND unless no field is active; the slots of inactive fields
	// repeat an active field's bitset (a cached reload, not a lookup).
	struct bitset *first = 0;
#pragma unroll
	for (int f = 0; f < FIELD_ALL; f++) {
		if (!(active & (1 << f)))
			continue;
		struct bs_key k = {.glf = glf(gen, slot, f)};
		__u32 c = CLASS_MISS;
		if (f == FIELD_RADDR || f == FIELD_LADDR)
			c = fwp_host_class(li, f, t); // a host table first
		if (c == CLASS_MISS && !trie_empty(active, f, t))
			c = fwp_field_class(li, f == FIELD_PROTO && (active & ACTIVE_FLAGS) ? f | FIELD_FOLD : f, t);
		if (c == CLASS_MISS)
			c = lc->default_class[f];
		else if (c == CLASS_EMPTY)
			c = lc->empty_class[f];
		k.cls = c;
		struct bitset *b = bpf_map_lookup_elem(&fwp_bitsets, &k);
		if (!b) {
			// A policy the Go side wrote inconsistently: fail closed.
			v->action = ACT_BLOCK;
			return 0;
		}
		w.bs[f] = b;
		if (!first)
			first = b;
	}
	if (!first) {
		struct bs_key k = {.glf = glf(gen, slot, FIELD_ALL), .cls = 0};
		first = bpf_map_lookup_elem(&fwp_bitsets, &k);
		if (!first) {
			v->action = ACT_BLOCK;
			return 0;
		}
	}
#pragma unroll
	for (int f = 0; f < NFIELDS; f++)
		if (!w.bs[f])
			w.bs[f] = first;
#pragma unroll
	for (int i = 0; i < NSUM; i++) {
		__u64 s = ~0ULL;
#pragma unroll
		for (int f = 0; f < NFIELDS; f++) {
			struct bitset *b = w.bs[f];
			if (!b)
				return 0;
			s &= b->sum[i];
		}
		w.sum[i] = s;
	}
	w.sumbits = w.sum[0];
	if (n > MAXF)
		n = MAXF;
	bpf_loop(n + NWORDS + NSUM + 1, walk_step, &w, 0);
	if (w.decider & RUN_BIT)
		w.decider = fwp_run_decider(li, w.decider, t);
	v->redirect = w.redirect;
	v->filter_id = w.decider;
	v->action = w.action == ACT_BLOCK ? ACT_BLOCK : ACT_PERMIT;
	if (w.action == ACT_CALLOUT) {
		v->callout = w.decider;
		v->callout_flags = w.write;
		return 0; // decided in user space; counted there
	}
	if (!v->nocount)
		count_hit(w.decider);
	return 0;
}

// fwp_emit reports a drop or a redirect on the ring buffer (dropped when
// the reader lags: events never slow the hook down).
__attribute__((noinline)) int fwp_emit(struct tuple *t, struct redirect_cfg *rc, __u64 filter_id, __u32 type, __u32 slot)
{
	if (!t)
		return 0;
	struct event *e = bpf_ringbuf_reserve(&fwp_events, sizeof(struct event), 0);
	if (!e)
		return 0;
	__u64 pt = bpf_get_current_pid_tgid();
	__u64 ug = bpf_get_current_uid_gid();
	e->filter_id = filter_id;
	e->cgroup_id = t->cgid;
	e->pid = pt >> 32;
	e->uid = (__u32)ug;
	e->gid = ug >> 32;
	e->rport = t->rport;
	e->lport = t->lport;
	__builtin_memcpy(e->raddr, t->raddr, 16);
	__builtin_memcpy(e->laddr, t->laddr, 16);
	if (rc) {
		__builtin_memcpy(e->proxy_addr, rc->addr, 16);
		e->proxy_port = rc->port;
		e->proxy_v6 = rc->v6;
	} else {
		__builtin_memset(e->proxy_addr, 0, 16);
		e->proxy_port = 0;
		e->proxy_v6 = 0;
	}
	e->type = type;
	e->slot = slot;
	e->proto = t->proto;
	e->v6 = t->v6;
	e->has_laddr = t->has_laddr;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
	return 0;
}

static __always_inline __u32 current_gen(void)
{
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&fwp_config, &zero);
	return c ? (c->gen & 1) : 0;
}

static __always_inline int is_v4mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

// LOAD_IP6 copies an IPv6 address word by word: context fields must be
// read with plain loads the verifier can rewrite.
#define LOAD_IP6(dst, src)            \
	do {                          \
		(dst)[0] = (src)[0];  \
		(dst)[1] = (src)[1];  \
		(dst)[2] = (src)[2];  \
		(dst)[3] = (src)[3];  \
	} while (0)

// store_addr writes a to dst as the maps hold addresses (a v4-mapped one
// as its v4 address in the first 4 bytes) and reports whether it is v6.
static __always_inline __u8 store_addr(__u8 *dst, const __u32 *a)
{
	if (is_v4mapped(a)) {
		__builtin_memcpy(dst, &a[3], 4);
		return 0;
	}
	__builtin_memcpy(dst, a, 16);
	return 1;
}

static __always_inline void fill_process(struct tuple *t)
{
	__u64 ug = bpf_get_current_uid_gid();
	t->uid = (__u32)ug;
	t->gid = ug >> 32;
	t->cgid = bpf_get_current_cgroup_id();
}

// local_from_sk reads the socket's local address and port, when bound.
static __always_inline void local_from_sk(struct tuple *t, struct bpf_sock *sk, int v6sock)
{
	if (!sk)
		return;
	if (!v6sock) {
		__u32 a = sk->src_ip4;
		if (a) {
			__builtin_memcpy(t->laddr, &a, 4);
			t->has_laddr = 1;
		}
	} else {
		__u32 a[4];
		LOAD_IP6(a, sk->src_ip6);
		if (t->v6) {
			if (a[0] | a[1] | a[2] | a[3]) {
				__builtin_memcpy(t->laddr, a, 16);
				t->has_laddr = 1;
			}
		} else if (is_v4mapped(a) && a[3]) {
			__builtin_memcpy(t->laddr, &a[3], 4);
			t->has_laddr = 1;
		}
	}
	__u32 p = sk->src_port;
	if (p) {
		t->lport = p;
		t->has_lport = 1;
	}
}

static __always_inline void set_user_addr(struct bpf_sock_addr *ctx, int v6sock, __u8 *addr, __u8 v6, __u16 port)
{
	if (!v6sock) {
		__u32 a;
		__builtin_memcpy(&a, addr, 4);
		ctx->user_ip4 = a;
	} else if (v6) {
		__u32 a[4];
		__builtin_memcpy(a, addr, 16);
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	} else {
		__u32 a;
		__builtin_memcpy(&a, addr, 4);
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = a;
	}
	ctx->user_port = bpf_htons(port);
}

// read_dest fills the tuple's remote side from the sockaddr the program
// sees; a v4-mapped destination of a v6 socket is classified at v4 layers.
static __always_inline void read_dest(struct bpf_sock_addr *ctx, struct tuple *t, int v6sock)
{
	if (!v6sock) {
		__u32 a = ctx->user_ip4;
		__builtin_memcpy(t->raddr, &a, 4);
	} else {
		__u32 a[4];
		LOAD_IP6(a, ctx->user_ip6);
		t->v6 = store_addr(t->raddr, a);
	}
	t->has_raddr = 1;
	t->rport = bpf_ntohs((__u16)ctx->user_port);
	t->has_rport = 1;
	t->proto = ctx->protocol;
}

// fwp_callout_udp: 1 while the served namespace's callout path holds the
// first datagram of UDP flows (its conntrack rules are installed); until
// then a UDP flow that reaches a Go callout takes its filter's flag.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fwp_callout_udp SEC(".maps");

static __always_inline int callout_proto_held(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return 1;
	if (proto != IPPROTO_UDP)
		return 0;
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&fwp_callout_udp, &zero);
	return on && *on;
}

// callout_records: a flow handed to a Go callout at CONNECT_REDIRECT takes
// the records a proxy set on its socket (setsockopt(SOL_FWP)) by cookie,
// where user space reads them for the callout's RedirectState (a chained
// proxy's connection is not redirected again by the same callout) and the
// proxy API finds them should the callout redirect it.
static __always_inline void callout_records(struct bpf_sock_addr *ctx, __u64 cookie)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return;
	struct records *r = bpf_sk_storage_get(&fwp_sk_records, sk, 0, 0);
	if (!r)
		return;
	bpf_map_update_elem(&fwp_sock_records, &cookie, r, BPF_ANY);
	bpf_sk_storage_delete(&fwp_sk_records, sk);
}

// fwp_upcall hands a TCP flow whose classification reached a Go callout to
// user space: it records what the hook knows by socket cookie and marks
// the socket so that fwp's nftables rules queue the flow's SYN. It returns
// 1 to let connect() proceed (the SYN waits in the queue for the verdict),
// 0 for EPERM when the flow cannot be handed over and its filter fails
// closed. A global function: verified once, its own stack frame.
__attribute__((noinline)) int fwp_upcall(struct bpf_sock_addr *ctx, struct tuple *t, struct verdict *v, __u32 slot, __u32 redirected)
{
	if (!t || !v)
		return 0;
	__u8 open = (v->callout_flags & FM_FAIL_OPEN) != 0;
	// Only TCP (the SYN) and connected UDP (the first datagram, once the
	// path holds UDP) are queued; anything else takes the filter's flag.
	// (An unconnected send's datagram took the socket's mark before this
	// hook ran: it cannot be held. redirected's bit 1: a sendmsg.)
	if (!callout_proto_held(t->proto) || (redirected & 2))
		return open;
	redirected &= 1;
	// Nothing would read the queue this flow's SYN goes to (no callout
	// path, or one serving another namespace): the filter's flag, at once.
	__u32 zero = 0;
	struct callout_cfg *cc = bpf_map_lookup_elem(&fwp_callout_cfg, &zero);
	if (!cc || !cc->netns || cc->netns != bpf_get_netns_cookie(ctx))
		return open;
	struct callout_flow f = {};
	__builtin_memcpy(f.raddr, t->raddr, 16);
	__builtin_memcpy(f.laddr, t->laddr, 16);
	f.cookie = t->cookie;
	f.cgroup_id = t->cgid;
	f.filter_id = v->callout;
	__u64 pt = bpf_get_current_pid_tgid();
	__u64 ug = bpf_get_current_uid_gid();
	f.pid = (__u32)pt;
	f.tgid = pt >> 32;
	f.uid = (__u32)ug;
	f.gid = ug >> 32;
	f.rport = t->rport;
	f.lport = t->lport;
	f.proto = t->proto;
	f.v6 = t->v6;
	f.has_laddr = t->has_laddr;
	f.has_lport = t->has_lport;
	f.slot = slot;
	f.redirected = redirected;
	f.fail_open = open;
	bpf_get_current_comm(f.comm, sizeof(f.comm));
	__u64 cookie = t->cookie;
	if (slot < SLOT_AUTH_CONNECT)
		callout_records(ctx, cookie);
	if (bpf_map_update_elem(&fwp_callout_flows, &cookie, &f, BPF_ANY))
		return open;
	int mark = 0;
	if (bpf_getsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)))
		mark = 0;
	mark = (mark & ~FWP_MARK_MASK) | (open ? FWP_MARK_QUEUE_OPEN : FWP_MARK_QUEUE_CLOSED);
	if (bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark))) {
		bpf_map_delete_elem(&fwp_callout_flows, &cookie);
		return open;
	}
	return 1;
}

#include "inbound.h"

// do_connect is ALE_CONNECT_REDIRECT then ALE_AUTH_CONNECT for a connect or
// an unconnected sendmsg. It returns 1 to let the call proceed, 0 for EPERM.
static __always_inline int do_connect(struct bpf_sock_addr *ctx, int v6sock, __u32 sendmsg)
{
	struct tuple t = {};
	read_dest(ctx, &t, v6sock);
	local_from_sk(&t, ctx->sk, v6sock);
	fill_process(&t);
	__u32 gen = current_gen();
	__u64 cookie = bpf_get_socket_cookie(ctx);
	t.cookie = cookie;
	struct verdict v = {.nocount = 1};
	fwp_classify(gen, SLOT_CONNECT_REDIRECT + t.v6, &t, &v);
	struct bpf_sock *sk = ctx->sk;
	if (v.redirect && sk) {
		// A redirect would run: records a proxy set with
		// setsockopt(SOL_FWP) may exempt the socket. They go by cookie
		// from now on, where the classification, the proxy's queries
		// and sock_release look for them, and the layer is classified
		// again with them. (Only here: other connects never pay.)
		struct records *r = bpf_sk_storage_get(&fwp_sk_records, sk, 0, 0);
		if (r) {
			bpf_map_update_elem(&fwp_sock_records, &cookie, r, BPF_ANY);
			bpf_sk_storage_delete(&fwp_sk_records, sk);
			fwp_classify(gen, SLOT_CONNECT_REDIRECT + t.v6, &t, &v);
		}
	}
	if (v.callout)
		return fwp_upcall(ctx, &t, &v, SLOT_CONNECT_REDIRECT + t.v6, sendmsg << 1) ? 1 : 0;
	count_hit(v.filter_id); // the decision kept, once
	v.nocount = 0;
	fwp_count(SLOT_CONNECT_REDIRECT + t.v6, v.action);
	if (v.action == ACT_BLOCK) {
		fwp_emit(&t, 0, v.filter_id, EV_DROP, SLOT_CONNECT_REDIRECT + t.v6);
		return 0;
	}
	__u32 redirect = v.redirect;
	__u64 redirect_filter = v.filter_id;
	int redirected = 0;
	if (redirect && (t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP)) {
		__u32 ri = gen * MAXR + (redirect - 1);
		struct redirect_cfg *rc = bpf_map_lookup_elem(&fwp_redirects, &ri);
		// A v4 socket cannot reach a v6 proxy: the redirect is skipped.
		if (rc && (v6sock || !rc->v6)) {
			__u32 zero = 0;
			struct redirect_state *z = bpf_map_lookup_elem(&fwp_zero_state, &zero);
			struct redirect_state *st = 0;
			if (z && bpf_map_update_elem(&fwp_sock_redirect, &cookie, z, BPF_ANY) == 0)
				st = bpf_map_lookup_elem(&fwp_sock_redirect, &cookie);
			if (!st) {
				// Never silently unproxied: refused, reported as a drop.
				fwp_emit(&t, 0, redirect_filter, EV_DROP, SLOT_CONNECT_REDIRECT + t.v6);
				return 0;
			}
			__builtin_memcpy(st->orig_addr, t.raddr, 16);
			__builtin_memcpy(st->proxy_addr, rc->addr, 16);
			st->orig_port = t.rport;
			st->proxy_port = rc->port;
			st->orig_v6 = t.v6;
			st->proxy_v6 = rc->v6;
			st->proto = t.proto;
			st->handle = rc->handle;
			st->target_pid = rc->pid;
			__u64 pt = bpf_get_current_pid_tgid();
			__u64 ug = bpf_get_current_uid_gid();
			st->pid = pt >> 32;
			st->uid = (__u32)ug;
			st->gid = ug >> 32;
			st->cookie = cookie;
			st->filter_id = redirect_filter;
			st->cgroup_id = t.cgid;
			bpf_get_current_comm(st->comm, sizeof(st->comm));
			__u32 n = rc->ctx_len;
			if (n > CTXMAX)
				n = CTXMAX;
			st->ctx_len = n;
			__builtin_memcpy(st->ctx, rc->ctx, CTXMAX);
			set_user_addr(ctx, v6sock, rc->addr, rc->v6, rc->port);
			// Reported with the original destination; a block at
			// AUTH_CONNECT of the proxy's address follows as a drop.
			fwp_emit(&t, rc, redirect_filter, EV_REDIRECT, SLOT_CONNECT_REDIRECT + t.v6);
			__builtin_memcpy(t.raddr, rc->addr, 16);
			t.v6 = rc->v6;
			t.rport = rc->port;
			t.owner_app |= TO_REDIRECTED;
			redirected = 1;
			__sync_fetch_and_add(&fwp_rec_made, 1);
		}
	}
	__u8 slot = SLOT_AUTH_CONNECT + t.v6;
	fwp_classify(gen, slot, &t, &v);
	if (v.callout)
		return fwp_upcall(ctx, &t, &v, slot, redirected | (sendmsg << 1)) ? 1 : 0;
	fwp_count(slot, v.action);
	if (v.action == ACT_BLOCK) {
		if (redirected) {
			bpf_map_delete_elem(&fwp_sock_redirect, &cookie);
			__sync_fetch_and_add(&fwp_rec_released, 1);
		}
		fwp_emit(&t, 0, v.filter_id, EV_DROP, slot);
		return 0;
	}
	if (t.proto == IPPROTO_UDP)
		in_note_udp(ctx, &t, gen); // its replies are not new inbound flows
	return 1;
}

#include "flownote.h"

// fwp_note_cfg[0] is nonzero while user space wants each connected
// socket's flow_note (reauthorization of live flows, flow events).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fwp_note_cfg SEC(".maps");

// fwp_note keeps what AUTH_CONNECT classified for a socket whose connect
// goes on (do_connect returned 1), in the socket's storage: the tuple as
// the hook saw it (after a built-in redirect: the proxy), the caller and
// its executable. A socket iterator reauthorizes the flow with it after a
// policy change (reauth.c). It always returns 1. Called through a global
// function per family (fwp_note4, fwp_note6): its own stack frame, and
// each reads only its family's address fields.
static __always_inline int fwp_note(struct bpf_sock_addr *ctx, int v6sock)
{
	if (!ctx)
		return 1;
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&fwp_note_cfg, &zero);
	if (!on || !*on)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct flow_note *n = bpf_sk_storage_get(&fwp_sk_flow, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!n)
		return 1;
	struct tuple t = {};
	read_dest(ctx, &t, v6sock);
	local_from_sk(&t, sk, v6sock);
	__builtin_memcpy(n->raddr, t.raddr, 16);
	__builtin_memcpy(n->laddr, t.laddr, 16);
	n->rport = t.rport;
	n->lport = t.lport;
	n->proto = t.proto;
	n->v6 = t.v6;
	n->has_laddr = t.has_laddr;
	n->has_lport = t.has_lport;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	n->redirected = bpf_map_lookup_elem(&fwp_sock_redirect, &cookie) != 0;
	__u64 ug = bpf_get_current_uid_gid();
	n->uid = (__u32)ug;
	n->gid = ug >> 32;
	n->tgid = bpf_get_current_pid_tgid() >> 32;
	n->cgroup_id = bpf_get_current_cgroup_id();
	n->app_ino = 0;
	n->app_dev = 0;
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = task->mm;
	struct file *f = mm ? mm->exe_file : 0;
	struct inode *ino = f ? f->f_inode : 0;
	if (ino) {
		n->app_ino = ino->i_ino;
		struct super_block *sb = ino->i_sb;
		if (sb)
			n->app_dev = sb->s_dev;
	}
	bpf_get_current_comm(n->comm, sizeof(n->comm));
	return 1;
}

__attribute__((noinline)) int fwp_note4(struct bpf_sock_addr *ctx) { return fwp_note(ctx, 0); }
__attribute__((noinline)) int fwp_note6(struct bpf_sock_addr *ctx) { return fwp_note(ctx, 1); }

// connect notes the flow it lets proceed (sendmsg, per datagram, does not).
SEC("cgroup/connect4")
int fwp_connect4(struct bpf_sock_addr *ctx) { return do_connect(ctx, 0, 0) ? fwp_note4(ctx) : 0; }

SEC("cgroup/connect6")
int fwp_connect6(struct bpf_sock_addr *ctx) { return do_connect(ctx, 1, 0) ? fwp_note6(ctx) : 0; }

// sendmsg: a reply within an inbound UDP flow passes unclassified
// (udpreply.h); any other unconnected send is a first send.
SEC("cgroup/sendmsg4")
int fwp_sendmsg4(struct bpf_sock_addr *ctx) { return fwp_udp_reply4(ctx) || do_connect(ctx, 0, 1); }

SEC("cgroup/sendmsg6")
int fwp_sendmsg6(struct bpf_sock_addr *ctx) { return fwp_udp_reply6(ctx) || do_connect(ctx, 1, 1); }

// restore_peer makes the proxy's address look like the original
// destination (getpeername, and the source of UDP replies).
static __always_inline int restore_peer(struct bpf_sock_addr *ctx, int v6sock)
{
	__u32 port = bpf_ntohs((__u16)ctx->user_port);
	__u8 *used = bpf_map_lookup_elem(&fwp_proxy_ports, &port);
	if (!used || !*used)
		return 1; // not a proxy's port: the common case, one array read
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct redirect_state *st = bpf_map_lookup_elem(&fwp_sock_redirect, &cookie);
	if (!st)
		return 1;
	struct tuple t = {};
	read_dest(ctx, &t, v6sock);
	if (t.rport != st->proxy_port || t.v6 != st->proxy_v6)
		return 1;
	__u32 a[4], b[4];
	__builtin_memcpy(a, t.raddr, 16);
	__builtin_memcpy(b, st->proxy_addr, 16);
	if ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]))
		return 1;
	set_user_addr(ctx, v6sock, st->orig_addr, st->orig_v6, st->orig_port);
	return 1;
}

SEC("cgroup/getpeername4")
int fwp_getpeername4(struct bpf_sock_addr *ctx) { return restore_peer(ctx, 0); }

SEC("cgroup/getpeername6")
int fwp_getpeername6(struct bpf_sock_addr *ctx) { return restore_peer(ctx, 1); }

SEC("cgroup/recvmsg4")
int fwp_recvmsg4(struct bpf_sock_addr *ctx) { return restore_peer(ctx, 0); }

SEC("cgroup/recvmsg6")
int fwp_recvmsg6(struct bpf_sock_addr *ctx) { return restore_peer(ctx, 1); }

// do_bind is ALE_BIND_REDIRECT then ALE_RESOURCE_ASSIGNMENT.
static __always_inline int do_bind(struct bpf_sock_addr *ctx, int v6sock)
{
	struct tuple t = {};
	if (!v6sock) {
		__u32 a = ctx->user_ip4;
		if (a) {
			__builtin_memcpy(t.laddr, &a, 4);
			t.has_laddr = 1;
		}
	} else {
		__u32 a[4];
		LOAD_IP6(a, ctx->user_ip6);
		t.v6 = store_addr(t.laddr, a);
		t.has_laddr = t.v6 ? (a[0] | a[1] | a[2] | a[3]) != 0 : a[3] != 0;
	}
	__u16 p = bpf_ntohs((__u16)ctx->user_port);
	if (p) {
		t.lport = p;
		t.has_lport = 1;
	}
	t.proto = ctx->protocol;
	fill_process(&t);
	__u32 gen = current_gen();
	struct verdict v = {};
	fwp_classify(gen, SLOT_BIND_REDIRECT + t.v6, &t, &v);
	fwp_count(SLOT_BIND_REDIRECT + t.v6, v.action);
	if (v.action == ACT_BLOCK) {
		fwp_emit(&t, 0, v.filter_id, EV_DROP, SLOT_BIND_REDIRECT + t.v6);
		return 0;
	}
	if (v.redirect) {
		// The built-in bind redirect moves the local address or port;
		// RESOURCE_ASSIGNMENT then sees the new one.
		__u32 ri = gen * MAXR + (v.redirect - 1);
		struct redirect_cfg *rc = bpf_map_lookup_elem(&fwp_redirects, &ri);
		if (rc && (rc->keep_addr || rc->v6 == t.v6) && (v6sock || !rc->v6)) {
			if (!rc->keep_addr) {
				__builtin_memcpy(t.laddr, rc->addr, 16);
				t.has_laddr = 1;
			}
			if (rc->port) {
				t.lport = rc->port;
				t.has_lport = 1;
			}
			set_user_addr(ctx, v6sock, t.laddr, t.v6, t.lport);
		}
	}
	__u8 rslot = SLOT_RESOURCE_ASSIGNMENT + t.v6;
	fwp_classify(gen, rslot, &t, &v);
	fwp_count(rslot, v.action);
	if (v.action == ACT_BLOCK) {
		fwp_emit(&t, 0, v.filter_id, EV_DROP, rslot);
		return 0;
	}
	in_note_owner(ctx->sk); // who owns the socket, for the inbound layers
	in_note_udp_owner(ctx); // and, for a UDP socket, by cookie (inbound.h)
	return 1;
}

SEC("cgroup/bind4")
int fwp_bind4(struct bpf_sock_addr *ctx) { return do_bind(ctx, 0); }

SEC("cgroup/bind6")
int fwp_bind6(struct bpf_sock_addr *ctx) { return do_bind(ctx, 1); }

// accepted_sockops ends a redirected connection's 4-tuple record with the
// proxy's accepted socket: the proxy queries it while the connection is
// open, and the client may have closed first. The socket asks for state
// callbacks only when it has a record; the record goes when it closes.
// Records of connections never accepted there (the handshake did not
// complete: a client's reset overtook its ACK, the SYN-ACK was lost) and of
// proxies outside the hooked cgroups (no sockops) are swept by user space
// once their client has closed (Datapath.SweepReleased).
static __always_inline int accepted_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] != BPF_TCP_CLOSE)
		return 1;
	struct tuple_key k = {};
	if (skops->family == AF_INET) {
		__u32 a = skops->remote_ip4;
		__builtin_memcpy(k.client, &a, 4);
		a = skops->local_ip4;
		__builtin_memcpy(k.proxy, &a, 4);
	} else {
		__u32 c[4], p[4];
		LOAD_IP6(c, skops->remote_ip6);
		LOAD_IP6(p, skops->local_ip6);
		k.v6 = store_addr(k.client, c);
		store_addr(k.proxy, p);
	}
	k.client_port = bpf_ntohl(skops->remote_port);
	k.proxy_port = skops->local_port;
	struct redirect_state *t = bpf_map_lookup_elem(&fwp_tuple_redirect, &k);
	if (!t) {
		// A connection accepted from a listener the callout path
		// records inherits its STATE_CB flag: not needed here.
		if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && (skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		t->accepted = 1;
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	} else
		bpf_map_delete_elem(&fwp_tuple_redirect, &k);
	return 1;
}

// callout_index: a flow waiting for a Go callout is about to send its SYN
// (its source port exists now): index it by the 4-tuple user space reads
// from the queued packet.
static __always_inline void callout_index(struct bpf_sock_ops *skops, __u64 cookie)
{
	struct callout_flow *f = bpf_map_lookup_elem(&fwp_callout_flows, &cookie);
	if (!f)
		return;
	struct flow_key k = {};
	if (skops->family == AF_INET) {
		__u32 a = skops->local_ip4;
		__builtin_memcpy(k.local, &a, 4);
		a = skops->remote_ip4;
		__builtin_memcpy(k.remote, &a, 4);
	} else {
		__u32 l[4], r[4];
		LOAD_IP6(l, skops->local_ip6);
		LOAD_IP6(r, skops->remote_ip6);
		k.v6 = store_addr(k.local, l);
		store_addr(k.remote, r);
	}
	k.local_port = skops->local_port;
	k.remote_port = bpf_ntohl(skops->remote_port);
	f->key = k;
	f->indexed = 1;
	if (bpf_map_update_elem(&fwp_callout_tuples, &k, f, BPF_ANY))
		f->indexed = 0;
}

// sockops: once a redirected TCP client has its source port, index its
// redirect by the 4-tuple the proxy will see on the accepted connection
// (egress does it for UDP).
SEC("sockops")
int fwp_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[0] == BPF_TCP_LISTEN)
		return in_listen_release(skops); // bpf/inbound.h
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB || skops->op == BPF_SOCK_OPS_STATE_CB)
		return accepted_sockops(skops);
	if (skops->op == BPF_SOCK_OPS_TCP_LISTEN_CB)
		return in_listen(skops);
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	callout_index(skops, cookie);
	struct redirect_state *st = bpf_map_lookup_elem(&fwp_sock_redirect, &cookie);
	if (!st)
		return 1;
	struct tuple_key k = {};
	if (skops->family == AF_INET) {
		__u32 a = skops->local_ip4;
		__builtin_memcpy(k.client, &a, 4);
	} else {
		__u32 a[4];
		LOAD_IP6(a, skops->local_ip6);
		k.v6 = store_addr(k.client, a);
	}
	__builtin_memcpy(k.proxy, st->proxy_addr, 16);
	k.client_port = skops->local_port;
	k.proxy_port = st->proxy_port;
	if (k.v6 != st->proxy_v6)
		return 1;
	bpf_map_update_elem(&fwp_tuple_redirect, &k, st, BPF_ANY);
	return 1;
}

// egress indexes a redirected UDP socket by the 4-tuple the proxy sees on
// its datagrams (client address and port -> proxy), as sockops does for
// TCP. It runs per packet because no socket hook sees every UDP socket
// with its source port: a connect of an unbound socket runs before the
// kernel binds it, and a connected send runs no hook. A wildcard source
// (an unconnected socket on 0.0.0.0 or ::) is stored as zero, which
// QueryRedirect falls back to. Lookups only on the common path; the index
// is written when the socket's record changed.
// udp_client_key builds the 4-tuple key a redirected UDP socket's
// datagrams reach the proxy with; 0 when it has none (no source port yet,
// or a source of the other family).
static __always_inline int udp_client_key(struct bpf_sock *sk, struct redirect_state *st, struct tuple_key *k)
{
	__u32 port = sk->src_port;
	if (!port)
		return 0;
	k->v6 = st->proxy_v6;
	if (sk->family == AF_INET) {
		__u32 a = sk->src_ip4;
		__builtin_memcpy(k->client, &a, 4);
	} else {
		__u32 a[4];
		LOAD_IP6(a, sk->src_ip6);
		if (is_v4mapped(a)) {
			if (k->v6)
				return 0;
			__builtin_memcpy(k->client, &a[3], 4);
		} else if (k->v6) {
			__builtin_memcpy(k->client, a, 16);
		} else if (a[0] | a[1] | a[2] | a[3]) {
			return 0;
		}
	}
	__builtin_memcpy(k->proxy, st->proxy_addr, 16);
	k->client_port = port;
	k->proxy_port = st->proxy_port;
	return 1;
}

SEC("cgroup_skb/egress")
int fwp_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_UDP || !sk->src_port)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct redirect_state *st = bpf_map_lookup_elem(&fwp_sock_redirect, &cookie);
	if (!st)
		return 1;
	struct tuple_key k = {};
	if (!udp_client_key(sk, st, &k))
		return 1;
	struct redirect_state *old = bpf_map_lookup_elem(&fwp_tuple_redirect, &k);
	if (old && old->cookie == cookie && old->handle == st->handle && old->orig_port == st->orig_port) {
		__u32 a[4], b[4];
		__builtin_memcpy(a, old->orig_addr, 16);
		__builtin_memcpy(b, st->orig_addr, 16);
		if (!((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])))
			return 1;
	}
	bpf_map_update_elem(&fwp_tuple_redirect, &k, st, BPF_ANY);
	bpf_map_update_elem(&fwp_udp_key, &cookie, &k, BPF_ANY);
	return 1;
}

// accepted_tuple builds the redirect index key of a proxy's accepted
// socket: its peer is the client, its local address the proxy.
static __always_inline void accepted_tuple(struct bpf_sock *sk, struct tuple_key *k)
{
	if (sk->family == AF_INET) {
		__u32 a = sk->dst_ip4;
		__builtin_memcpy(k->client, &a, 4);
		a = sk->src_ip4;
		__builtin_memcpy(k->proxy, &a, 4);
	} else {
		__u32 c[4], p[4];
		LOAD_IP6(c, sk->dst_ip6);
		LOAD_IP6(p, sk->src_ip6);
		k->v6 = store_addr(k->client, c);
		store_addr(k->proxy, p);
	}
	k->client_port = bpf_ntohs(sk->dst_port);
	k->proxy_port = sk->src_port;
}

// fwp's proxy API as socket options answered in the kernel: WFP's
// SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS / _CONTEXT and
// SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS (seeds 000, 001). A private level
// no kernel protocol answers; the table is in docs/sockopt.md and
// proxy/sockopt_linux.go.
#define SOL_FWP 0x667770 // "fwp"
#define FWP_SO_REDIRECT_RECORDS 1 // get (accepted socket) and set (outbound, before connect)
#define FWP_SO_REDIRECT_CONTEXT 2 // get: the redirect's context bytes
#define FWP_SO_ORIGINAL_DST 3     // get: sockaddr_in or sockaddr_in6 of the original destination
#define FWP_SO_REDIRECT_QUERY 4   // get: all three in one call (struct fwp_redirect_query)

// The answer to FWP_SO_REDIRECT_QUERY: what a proxy asks for every
// accepted connection, in one system call instead of three.
struct fwp_redirect_query {
	__u8 orig[28];     // struct sockaddr_in or sockaddr_in6 (its family says which)
	__u16 records_len; // bytes of records
	__u16 context_len; // bytes of context; 0: the redirect set none
	__u8 records[4 + 4 * 8];
	__u8 context[CTXMAX];
};
#define FWP_RECORDS_MAGIC 0x6b707766 // "fwpk" read as a little-endian word
#define FWP_RECORDS_MAX (4 + 4 * MAXRECORDS)
#define FWP_ENOENT 2
#define FWP_ENODATA 61
#define FWP_EACCES 13
#define FWP_EINVAL 22
// RELEASED_GRACE is Redirects.ReleasedGrace's default: a closed UDP
// client's record answers no socket option after it.
#define RELEASED_GRACE 30

// target_key names one (redirect handle, target process) pair of the
// active policy: who may put records naming that redirect on a socket.
struct target_key {
	__u32 handle;
	__u32 pid;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * MAXR);
	__type(key, struct target_key);
	__type(value, __u8);
} fwp_targets SEC(".maps");

// caller_is_root: the caller's uid (in the initial user namespace) is 0.
// A hook cannot test capabilities; uid 0 is what can open the maps'
// pins and detach the hooks anyway.
static __always_inline int caller_is_root(void)
{
	return (__u32)bpf_get_current_uid_gid() == 0;
}

static __always_inline int sockopt_fail(int err)
{
	bpf_set_retval(-err);
	return 1;
}

// records_chain writes the records a proxy gets for a redirect: the magic
// word, then the client socket's own records and this redirect's handle
// (the last MAXRECORDS of that chain). Returns the words written.
static __always_inline __u32 records_chain(struct redirect_state *st, __u32 out[1 + MAXRECORDS])
{
	__u64 cookie = st->cookie;
	struct records *rec = bpf_map_lookup_elem(&fwp_sock_records, &cookie);
	__u32 rn = rec ? rec->n : 0;
	if (rn > MAXRECORDS)
		rn = MAXRECORDS;
	__u32 start = rn + 1 > MAXRECORDS ? rn + 1 - MAXRECORDS : 0;
	out[0] = FWP_RECORDS_MAGIC;
#pragma unroll
	for (int j = 0; j < MAXRECORDS; j++) {
		__u32 idx = start + j;
		if (idx < rn && rec)
			out[1 + j] = rec->handles[idx & (MAXRECORDS - 1)];
		else if (idx == rn)
			out[1 + j] = st->handle;
		else
			break;
	}
	return 1 + rn + 1 - start;
}

// fwp_query_all answers FWP_SO_REDIRECT_QUERY (the caller is checked):
// the original destination, the records chain and the context at once.
static __always_inline int fwp_query_all(struct bpf_sockopt *ctx, struct redirect_state *st)
{
	struct fwp_redirect_query *q = ctx->optval;
	if (!st || (void *)(q + 1) > ctx->optval_end)
		return sockopt_fail(FWP_EINVAL);
	__builtin_memset(q->orig, 0, sizeof(q->orig));
	if (!st->orig_v6) {
		struct sockaddr_in *sa = (void *)q->orig;
		sa->sin_family = AF_INET;
		sa->sin_port = bpf_htons(st->orig_port);
		__builtin_memcpy(&sa->sin_addr, st->orig_addr, 4);
	} else {
		struct sockaddr_in6 *sa = (void *)q->orig;
		sa->sin6_family = AF_INET6;
		sa->sin6_port = bpf_htons(st->orig_port);
		__builtin_memcpy(&sa->sin6_addr, st->orig_addr, 16);
	}
	__u32 words[1 + MAXRECORDS] = {};
	__u32 m = records_chain(st, words);
	__builtin_memcpy(q->records, words, sizeof(words));
	q->records_len = 4 * m;
	__u32 n = st->ctx_len;
	if (n > CTXMAX)
		n = CTXMAX;
	q->context_len = n;
	__builtin_memcpy(q->context, st->ctx, CTXMAX);
	ctx->optlen = sizeof(*q);
	// Two stores: the compiler would merge them into one 8-byte store,
	// which the verifier refuses on a sockopt context.
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}

// fwp_query answers SOL_FWP getsockopt on a proxy's accepted socket (or a
// UDP socket connected to the client) from the redirect recorded for its
// 4-tuple. Only the redirect's target process (tgid) or root may ask.
static __always_inline int fwp_query(struct bpf_sockopt *ctx, struct redirect_state *st)
{
	int name = ctx->optname;
	if (name < FWP_SO_REDIRECT_RECORDS || name > FWP_SO_REDIRECT_QUERY)
		return 1; // not ours: the kernel's answer (ENOPROTOOPT) stands
	if (!st)
		return sockopt_fail(FWP_ENOENT);
	if (st->released) {
		__u32 now = bpf_ktime_get_ns() / 1000000000;
		if (now - st->released >= RELEASED_GRACE)
			return sockopt_fail(FWP_ENOENT);
	}
	if (!caller_is_root() && (!st->target_pid || st->target_pid != bpf_get_current_pid_tgid() >> 32))
		return sockopt_fail(FWP_EACCES);
	__u8 *p = ctx->optval, *end = ctx->optval_end;
	long room = end - p;
	if (name == FWP_SO_REDIRECT_QUERY)
		return fwp_query_all(ctx, st);
	if (name == FWP_SO_REDIRECT_RECORDS) {
		__u32 words[1 + MAXRECORDS] = {};
		__u32 m = records_chain(st, words);
		if (room < 4 * m)
			return sockopt_fail(FWP_EINVAL);
		for (int j = 0; j < 1 + MAXRECORDS; j++) {
			if (j >= m)
				break;
			__u8 *q = p + 4 * j;
			if (q + 4 > end)
				return sockopt_fail(FWP_EINVAL);
			*(__u32 *)q = words[j];
		}
		ctx->optlen = 4 * m;
	} else if (name == FWP_SO_REDIRECT_CONTEXT) {
		__u32 n = st->ctx_len;
		if (n > CTXMAX)
			n = CTXMAX;
		if (n == 0) // the kernel cannot return an empty value (optlen 0: unchanged)
			return sockopt_fail(FWP_ENODATA);
		if (room < n)
			return sockopt_fail(FWP_EINVAL);
		for (__u32 i = 0; i < CTXMAX; i++) {
			if (i >= n)
				break;
			__u8 *q = p + i;
			if (q + 1 > end)
				return sockopt_fail(FWP_EINVAL);
			*q = st->ctx[i];
		}
		ctx->optlen = n;
	} else {
		if (!st->orig_v6) {
			struct sockaddr_in sa = {};
			sa.sin_family = AF_INET;
			sa.sin_port = bpf_htons(st->orig_port);
			__builtin_memcpy(&sa.sin_addr, st->orig_addr, 4);
			if (p + sizeof(sa) > end)
				return sockopt_fail(FWP_EINVAL);
			__builtin_memcpy(p, &sa, sizeof(sa));
			ctx->optlen = sizeof(sa);
		} else {
			struct sockaddr_in6 sa = {};
			sa.sin6_family = AF_INET6;
			sa.sin6_port = bpf_htons(st->orig_port);
			__builtin_memcpy(&sa.sin6_addr, st->orig_addr, 16);
			if (p + sizeof(sa) > end)
				return sockopt_fail(FWP_EINVAL);
			__builtin_memcpy(p, &sa, sizeof(sa));
			ctx->optlen = sizeof(sa);
		}
	}
	ctx->retval = 0;
	return 1;
}

// getsockopt answers SO_ORIGINAL_DST (and IP6T_SO_ORIGINAL_DST) on the
// proxy's accepted socket, as iptables REDIRECT does (to whoever holds the
// socket, as netfilter does), and fwp's SOL_FWP options (fwp_query).
SEC("cgroup/getsockopt")
int fwp_getsockopt(struct bpf_sockopt *ctx)
{
	int fwp = ctx->level == SOL_FWP;
	if (!fwp && (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6)))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct tuple_key k = {};
	accepted_tuple(sk, &k);
	struct redirect_state *st = bpf_map_lookup_elem(&fwp_tuple_redirect, &k);
	if (fwp)
		return fwp_query(ctx, st);
	if (!st)
		return 1;
	__u8 *p = ctx->optval;
	if (ctx->level == SOL_IP) {
		if (st->orig_v6)
			return 1;
		struct sockaddr_in sa = {};
		sa.sin_family = AF_INET;
		sa.sin_port = bpf_htons(st->orig_port);
		__builtin_memcpy(&sa.sin_addr, st->orig_addr, 4);
		if (p + sizeof(sa) > (__u8 *)ctx->optval_end)
			return 1;
		__builtin_memcpy(p, &sa, sizeof(sa));
		ctx->optlen = sizeof(sa);
	} else {
		struct sockaddr_in6 sa = {};
		sa.sin6_family = AF_INET6;
		sa.sin6_port = bpf_htons(st->orig_port);
		if (st->orig_v6) {
			__builtin_memcpy(&sa.sin6_addr, st->orig_addr, 16);
		} else {
			__u32 m = bpf_htonl(0xffff);
			__builtin_memcpy((__u8 *)&sa.sin6_addr + 10 - 2, &m, 4);
			__builtin_memcpy((__u8 *)&sa.sin6_addr + 12, st->orig_addr, 4);
		}
		if (p + sizeof(sa) > (__u8 *)ctx->optval_end)
			return 1;
		__builtin_memcpy(p, &sa, sizeof(sa));
		ctx->optlen = sizeof(sa);
	}
	ctx->retval = 0;
	return 1;
}

// setsockopt(SOL_FWP, FWP_SO_REDIRECT_RECORDS) on a proxy's outbound
// socket, before connect, stores the records (as the getsockopt gave them)
// in the socket's local storage (a sockopt program cannot read a socket's
// cookie); its connect moves them to fwp_sock_records by cookie, and it
// is not redirected again by those redirects. Only the target process of the redirect the last record
// names (the one the proxy's accepted connection came through), or root,
// may set them: anyone else could mark their own sockets to escape a
// redirect. The kernel never sees the option (optlen -1).
SEC("cgroup/setsockopt")
int fwp_setsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_FWP || ctx->optname != FWP_SO_REDIRECT_RECORDS)
		return 1;
	int len = ctx->optlen;
	if (len < 0)
		return 1; // taken by this hook in another cgroup on the path
	if (len < 8 || len > FWP_RECORDS_MAX || (len & 3))
		return sockopt_fail(FWP_EINVAL) - 1;
	__u8 *p = ctx->optval, *end = ctx->optval_end;
	if (p + 4 > end || *(__u32 *)p != FWP_RECORDS_MAGIC)
		return sockopt_fail(FWP_EINVAL) - 1;
	__u32 n = ((__u32)len - 4) / 4;
	struct records rec = {.n = n};
	__u32 last = 0;
#pragma unroll
	for (int i = 0; i < MAXRECORDS; i++) {
		if (i >= n)
			break;
		__u8 *q = p + 4 + 4 * i;
		if (q + 4 > end)
			return sockopt_fail(FWP_EINVAL) - 1;
		last = *(__u32 *)q;
		rec.handles[i] = last;
	}
	if (!caller_is_root()) {
		struct target_key tk = {.handle = last, .pid = bpf_get_current_pid_tgid() >> 32};
		if (!bpf_map_lookup_elem(&fwp_targets, &tk))
			return sockopt_fail(FWP_EACCES) - 1;
	}
	struct bpf_sock *sk = ctx->sk;
	struct records *r = sk ? bpf_sk_storage_get(&fwp_sk_records, sk, &rec, BPF_SK_STORAGE_GET_F_CREATE) : 0;
	if (!r)
		return sockopt_fail(FWP_EINVAL) - 1;
	*r = rec; // a second setsockopt replaces the records
	ctx->optlen = -1;
	return 1;
}

// sock_release drops what the hooks keep per socket. A redirected UDP
// socket's 4-tuple record is stamped with the time instead: datagrams it
// sent may still wait in the proxy's queue.
SEC("cgroup/sock_release")
int fwp_sock_release(struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_socket_cookie(sk);
	// Lookups are lock-free; deletes of absent keys would still lock.
	struct redirect_state *st = bpf_map_lookup_elem(&fwp_sock_redirect, &cookie);
	if (st) {
		struct tuple_key *k;
		if (st->proto == IPPROTO_UDP && (k = bpf_map_lookup_elem(&fwp_udp_key, &cookie))) {
			struct redirect_state *t = bpf_map_lookup_elem(&fwp_tuple_redirect, k);
			if (t && t->cookie == cookie) {
				__u32 now = bpf_ktime_get_ns() / 1000000000;
				t->released = now ? now : 1; // 0 means open
			}
			bpf_map_delete_elem(&fwp_udp_key, &cookie);
		}
		// Counted only by whoever deletes it: the liveness sweep
		// (liveness.go) may have, and counts its own.
		if (bpf_map_delete_elem(&fwp_sock_redirect, &cookie) == 0)
			__sync_fetch_and_add(&fwp_rec_released, 1);
	}
	if (bpf_map_lookup_elem(&fwp_sock_records, &cookie))
		bpf_map_delete_elem(&fwp_sock_records, &cookie);
	if (sk->protocol == IPPROTO_UDP && bpf_map_lookup_elem(&fwp_in_udp_owners, &cookie))
		bpf_map_delete_elem(&fwp_in_udp_owners, &cookie);
	struct callout_flow *cf = bpf_map_lookup_elem(&fwp_callout_flows, &cookie);
	if (cf) {
		if (cf->indexed) {
			struct flow_key k = cf->key;
			bpf_map_delete_elem(&fwp_callout_tuples, &k);
		}
		bpf_map_delete_elem(&fwp_callout_flows, &cookie);
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
