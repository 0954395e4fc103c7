// Command fwpd is fwp's daemon: the management plane (package mgmt) over
// one filter engine, served as gRPC on a unix socket, and the kernel
// datapath that enforces the policy on the system's own sockets.
//
//	fwpd [--socket PATH] [--state-dir DIR] [--admin-group G] [--metrics-addr ADDR]
//	     [--max-connections N] [--max-connections-per-user N]
//	     [--datapath kernel|none] [--cgroup PATH]
//	     [--keep-hooks-on-exit] [--bpffs-dir DIR]
//	     [--callout-netns PATH] [--callout-queue-base N] [--callout-hold-limit D]
//
// Root and members of --admin-group may change policy; everyone who can
// open the socket may read it. Both are decided on the credentials the
// kernel recorded when the peer connected (SO_PEERCRED, SO_PEERGROUPS;
// Linux 4.13 or later). With --datapath kernel (the default) every commit
// is compiled into the eBPF maps before it takes effect, and a policy the
// kernel cannot enforce is refused. Proxies query redirects through the
// API and mark their outbound sockets through the side socket PATH.fd
// (SCM_RIGHTS). SIGTERM or SIGINT shut it down gracefully; the hooks go
// with it unless --keep-hooks-on-exit.
//
// A policy whose filters call Go callouts at CONNECT_REDIRECT or
// AUTH_CONNECT (TCP) starts the kernel callout path (package nfqueue) before
// it takes effect: fwp's nftables tables and one queue per CPU (numbers
// from --callout-queue-base) in fwpd's network namespace, or in
// --callout-netns; the first packet of each such flow is held there while
// the engine runs the callout, at most --callout-hold-limit. The tables go
// when fwpd exits. /metrics counts the path's flows by outcome.
//
// Each of the two sockets serves at most --max-connections connections at
// once (default 1024), the last sixteenth of them only to root, and at
// most --max-connections-per-user (default 64) to any one other user, so
// that one local user cannot lock the administrators out. More are closed
// as soon as they are accepted, so a client fails at once rather than
// hanging in the backlog, and logged (at debug level, plus a warning at
// most once a minute). A peer on PATH.fd
// must send its request within 5 seconds or is dropped.
package main
