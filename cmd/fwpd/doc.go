// Command fwpd is fwp's daemon: the management plane (package mgmt) over
// one filter engine, served as gRPC on a unix socket, and the kernel
// datapath that enforces the policy on the system's own sockets.
//
//	fwpd [--socket PATH] [--state-dir DIR] [--admin-group G] [--reader-group G]
//	     [--metrics-addr ADDR] [--max-connections N] [--max-connections-per-user N]
//	     [--datapath kernel|none] [--cgroup PATH]
//	     [--keep-hooks-on-exit] [--bpffs-dir DIR] [--bpffs-lock-wait D] [--proxy-cgroup auto|none|DIR,...]
//	     [--callout-netns PATH] [--callout-queue-base N] [--callout-queue-len N] [--callout-hold-limit D]
//	     [--no-reauthorize-established]
//
// Root and members of --admin-group may change policy; members of
// --reader-group may list and explain it, read net events and subscribe,
// but see provider-context data only as its length and SHA-256; any other
// user may only open a session and query the redirects whose target it is
// (docs/security.md has the matrix). Roles are decided on the credentials
// the kernel recorded when the peer connected (SO_PEERCRED,
// SO_PEERGROUPS; Linux 4.13 or later). fwpd refuses to start when its
// state directory, a store file, the socket's directory or a pin it would
// adopt can be written or replaced by another user.
//
// With Type=notify (packaging/fwpd.service) it tells systemd READY=1 once
// the socket listens and the datapath is attached, and STOPPING=1 on
// SIGTERM ($NOTIFY_SOCKET). With --datapath kernel (the default) every commit
// is compiled into the eBPF maps before it takes effect, and a policy the
// kernel cannot enforce is refused. The files a policy's ale_app_id
// conditions name are watched: when a path names another file (a package
// upgrade renamed a new one over it) the policy is compiled again, so the
// rule follows the path. Proxies ask the kernel itself with
// socket options (docs/sockopt.md), which the proxy hooks answer on the
// sockets of --cgroup, of each redirect target's cgroup and of
// --proxy-cgroup; where no hook answers, they query redirects through the
// API and mark their outbound sockets through the side socket PATH.fd
// (SCM_RIGHTS). Callout programs register remote callouts, and clients
// classify through the engine, on PATH.callouts (admin right; see
// client.RegisterCallout and internal/server/callouts.go); its connection
// limits are the same as the other sockets'. SIGTERM or SIGINT shut it down gracefully; the hooks go
// with it unless --keep-hooks-on-exit.
//
// A policy whose filters call Go callouts at CONNECT_REDIRECT or
// AUTH_CONNECT (TCP or UDP) starts the kernel callout path (package nfqueue)
// before it takes effect: fwp's nftables tables and one queue per CPU
// (numbers from --callout-queue-base, --callout-queue-len packets each) in
// fwpd's network namespace, or in --callout-netns; the first packet of each
// such flow is held there while the engine runs the callout, at most
// --callout-hold-limit. A Go callout at CONNECT_REDIRECT may redirect the
// flow at run time (the held SYN is DNATed to its proxy); a UDP callout
// filter holds the first datagram of connected UDP flows; both bring
// conntrack into the namespace and are enabled only by such policies. A
// full queue, or no fwpd at all (killed, or exited with
// --keep-hooks-on-exit), leaves each such flow to its filter's
// fail-open/closed flag at once. The tables go when fwpd exits. /metrics
// counts the path's flows by outcome.
//
// After every commit fwpd reauthorizes the established connections (and
// connected UDP sockets, and accepted TCP connections) of --cgroup, as WFP
// does when filters change: the engine classifies each again at
// ALE_AUTH_CONNECT (accepted ones at ALE_AUTH_RECV_ACCEPT) with
// IS_REAUTHORIZE and the kernel resets those the new policy blocks
// (bpf_sock_destroy from a socket iterator, Linux 6.5), each a flow_reset
// net event, counted in /metrics; --no-reauthorize-established turns it
// off. A policy with filters at ALE_FLOW_ESTABLISHED or
// ALE_ENDPOINT_CLOSURE has them run for the kernel's TCP flows (outbound
// and accepted) and connected UDP sockets' ends from the hooks' flow
// events (docs/semantics.md, "Kernel callout path").
//
// Each of the two sockets serves at most --max-connections connections at
// once (default 1024), the last sixteenth of them only to root, and at
// most --max-connections-per-user (default 64) to any one other user, so
// that one local user cannot lock the administrators out. More are closed
// as soon as they are accepted, so a client fails at once rather than
// hanging in the backlog, and logged (at debug level, plus a warning at
// most once a minute). A peer on PATH.fd
// must send its request within 5 seconds or is dropped.
//
// With --policy-source etcd (--etcd-endpoints URL,..., --etcd-prefix,
// --etcd-cert/--etcd-key/--etcd-cacert, --node-name, --node-labels
// k=v,..., --etcd-lease-ttl) fwpd also follows the fleet policy kept in
// etcd (package fleet): each revision applied as one transaction, its
// objects persistent and owned by the provider fwp.fleet, local objects
// untouched; the host's status under PREFIXnodes/NAME and in
// STATE-DIR/fleet-status.json; fwp_fleet_* metrics.
package main
