// Command redirectproxy is a transparent TCP (and, with -udp, UDP) proxy
// for fwpd's kernel datapath, built on the proxy package: the proxy a
// policy's built-in connect redirect sends connections to.
//
//	fwpd (kernel datapath)            redirectproxy (-listen 127.0.0.1:3131)
//	  connect(10.0.0.1:80) ──redirect──▶ accept
//	                                      records, context, original dst ◀── fwpd (or the pinned maps)
//	                                      dial 10.0.0.1:80 with the records set ──▶ not redirected again
//	                                      proxy.Splice both ways
//
// For each accepted connection it asks for the redirect (records, context
// and the destination the client asked for) — first with the kernel
// datapath's socket options (getsockopt(SOL_FWP, ...) on the accepted
// socket, answered by a BPF hook from the datapath's maps: no round trip
// to fwpd; docs/sockopt.md), and when no hook answers for the socket
// (-sockopt=false, or a proxy where fwpd's hooks do not reach) through
// fwpd's socket, which
// answers only the redirect's target process (the provider context's
// target_pid) or root, or with -pins straight from the datapath's pinned
// maps (root) — dials the original destination with the records set, so
// the redirect that sent the client here sees its own proxy and lets the
// connection through (the records go on with setsockopt(SOL_FWP), or
// through fwpd's records socket when no hook answers), and splices. With
// -sockopt-only it never connects to fwpd. With -udp it relays datagrams on the
// same address: per client (source address) an outbound socket with the
// records set, connected to the destination the client asked for, whose
// replies go back to the client (the kernel datapath shows them as from
// that destination); a client's relay ends after -udp-idle. With -to ADDR
// it is the same relay without fwp: everything goes to ADDR (a baseline
// for benchmarks); with -original-dst it is the same relay as a proxy
// written for iptables REDIRECT, asking getsockopt(SO_ORIGINAL_DST) alone
// (another baseline: behind iptables, or behind fwp, which answers it too).
//
//	go run ./examples/redirectproxy -listen 127.0.0.1:3131 [-udp]
//
// A policy that sends TCP port 80 to it (fwpctl apply -f):
//
//	providers:
//	  - {key: redirectproxy, name: redirectproxy}
//	provider_contexts:
//	  - {key: to-redirectproxy, provider: redirectproxy, data: '{"proxy":"127.0.0.1:3131","target_pid":PID}'}
//	callouts:
//	  - {key: fwp.builtin.connect_redirect/redirectproxy, provider: redirectproxy, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
//	filters:
//	  - {key: web-to-redirectproxy, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown,
//	     callout: fwp.builtin.connect_redirect/redirectproxy, provider_context: to-redirectproxy,
//	     conditions: [{field: ip_remote_port, value: 80}]}
package main
