// Package inproc is fwp's in-process datapath: a Dialer, a ListenConfig and
// the connections they make run the ALE layers of a Go program's own
// sockets through an engine, with no privileges, on any OS. It is fwp's
// embedded mode and the way callout authors test callouts in CI.
//
//	Dial:    CONNECT_REDIRECT ─► AUTH_CONNECT ─► connect() ─► FLOW_ESTABLISHED
//	Listen:  BIND_REDIRECT ─► bind()/listen() ─► RESOURCE_ASSIGNMENT ─► AUTH_LISTEN
//	Accept:  accept() ─► AUTH_RECV_ACCEPT ─► FLOW_ESTABLISHED
//	UDP:     first datagram to a remote: CONNECT_REDIRECT ─► AUTH_CONNECT
//	         first datagram from a remote: AUTH_RECV_ACCEPT
//	         (an association idle for Options.UDPIdleTimeout ends: flow-delete)
//	Close:   ENDPOINT_CLOSURE ─► flow-delete of the flow's contexts (once)
//
// A block is an error wrapping *BlockedError (and ErrBlocked); a pend holds
// the dial, listen or accepted connection until the callout completes, the
// pend times out or the context ends. A connect redirect connects to the
// new address and keeps the redirect records and context for the proxy
// (package proxy); a bind redirect listens on the new address.
//
// Metadata carries what the process truly knows — pid, executable path,
// uid/gid, flow handle, direction, original destination, redirect target
// pid, records; on Linux the compartment (network namespace inode) and
// cgroup id; an accepted connection's parent endpoint; once a socket is
// connected, the interface it uses and its path MTU (a new UDP remote's
// datagram: the arrival interface, IP_PKTINFO); a zoned IPv6 remote's
// scope id — and leaves the rest absent.
package inproc
