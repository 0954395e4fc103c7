// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// A socket's owner (sk_owner) and the listener records by address
// (fwp_in_listeners, fwp_in_listen_idx): fwp.c's inbound hooks (inbound.h)
// and reauth.c's sockops both write them, and reauth.c reads an accepted
// socket's owner from them. One definition for both objects: the maps are
// fwp.c's, shared with reauth.c by replacement at load, so their layouts
// must be the same.
#ifndef FWP_INLISTEN_H
#define FWP_INLISTEN_H

// sk_owner is what the inbound layers know of a socket's owner, recorded
// in a process context (bind, listen) in the socket's local storage.
struct sk_owner {
	__u64 cgroup_id;
	__u64 app_ino;
	__u64 listen_filter; // the filter that blocked the listen
	__u32 app_dev;
	__u32 tgid;
	__u32 uid;
	__u32 gid;
	__u32 listen_epoch; // the policy epoch + 1 the listen was classified in; 0: never
	__u8 has_owner;	    // filled in a process context
	__u8 has_app;
	__u8 listen_blocked;
	__u8 listen_slot;
	char comm[16];
};

// in_listen_key finds a listener's owner from user space (the callout
// path's inbound SYNs, queued before any hook knows the socket): the
// namespace, the listener's bound address as the socket has it (family:
// v6 for AF_INET6, address zero for a wildcard one) and port.
struct in_listen_key {
	__u64 netns;
	__u8 laddr[16];
	__u16 lport; // host order
	__u8 v6;
	__u8 pad[5];
};

struct in_listener {
	__u64 cookie; // the listening socket's: the transport endpoint handle
	struct sk_owner o;
};

// fwp_in_listeners: the listeners of the hooked cgroups by address, with
// the owner the ingress hook classifies with. Bounded (LRU); an entry goes
// at sock_release. A SYN whose listener has none is answered without a
// verdict mark: ingress applies the callout filter's flag.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct in_listen_key);
	__type(value, struct in_listener);
} fwp_in_listeners SEC(".maps");

// fwp_in_listen_idx: each recorded listener's key by socket cookie, for
// the listener's close (sockops STATE_CB: cgroup/sock_release was not
// seen running for listeners here).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct in_listen_key);
} fwp_in_listen_idx SEC(".maps");

#endif
