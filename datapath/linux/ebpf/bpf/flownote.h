// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// flow_note: what the connect hook classified at ALE_AUTH_CONNECT for a
// socket it let connect — or, for an accepted TCP socket, its tuple and
// its listener's owner (inbound, AUTH_RECV_ACCEPT) — kept in the socket's
// local storage (it goes with the socket). fwp.c writes it; reauth.c's socket iterators read it to
// reauthorize live flows after a policy change and to report a flow's
// establishment and end (Go: ebpf.LiveFlow).
#ifndef FWP_FLOWNOTE_H
#define FWP_FLOWNOTE_H

struct flow_note {
	__u8 raddr[16]; // as AUTH_CONNECT classified it (the proxy's when redirected)
	__u8 laddr[16]; // when bound at connect
	__u64 cgroup_id;
	__u64 app_ino; // the executable (mm->exe_file); 0: none (a kernel thread)
	__u32 app_dev;
	__u32 tgid;
	__u32 uid;
	__u32 gid;
	__u16 rport; // host order
	__u16 lport; // host order, when bound at connect
	__u8 proto;
	__u8 v6;
	__u8 has_laddr;
	__u8 has_lport;
	__u8 redirected; // the kernel's built-in redirect ran before AUTH_CONNECT
	__u8 events;	 // FLOW_EV_* bits reported for the flow (reauth.c)
	__u8 family;	 // of sport..dst, set with FLOW_EV_ESTABLISHED
	__u8 inbound;	 // an accepted TCP socket (reauth.c's sockops): classified at AUTH_RECV_ACCEPT, raddr is the client
	__u8 pad[4];
	char comm[16];
	// The socket's 4-tuple when it was established (reauth.c's sockops):
	// sock_release cannot read a socket's addresses.
	__u8 src[16];
	__u8 dst[16];
	__u16 sport; // host order
	__u16 dport; // host order
	__u32 pad2;
};

// fwp_sk_flow: the note, per socket.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct flow_note);
} fwp_sk_flow SEC(".maps");

#endif
