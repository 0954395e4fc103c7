// Package ebpf is fwp's kernel datapath: eBPF programs on a cgroup v2 that
// filter and redirect the sockets of unmodified programs, with the policy of
// the engine compiled into BPF maps.
//
// # Hooks and layers
//
// Load verifies the programs and creates the maps; Attach links them
// (bpf_link, gone on Detach, Close or when the process exits) to a cgroup v2
// directory:
//
//	cgroup/connect4, connect6   ALE_CONNECT_REDIRECT, then ALE_AUTH_CONNECT (TCP, connected UDP)
//	cgroup/sendmsg4, sendmsg6   the same for unconnected UDP, per datagram
//	cgroup/recvmsg4, recvmsg6   a redirected UDP socket's replies come "from" the original destination
//	cgroup/getpeername4/6       a redirected client sees the original destination as its peer
//	cgroup/bind4, bind6         ALE_BIND_REDIRECT, then ALE_RESOURCE_ASSIGNMENT (block: EPERM); records the socket's owner (a UDP socket's also by cookie, fwp_in_udp_owners, for Go callouts at AUTH_RECV_ACCEPT: inudp.go)
//	sockops (TCP_CONNECT_CB)    indexes a redirect by the client 4-tuple once the source port exists
//	cgroup/getsockopt           answers SO_ORIGINAL_DST (SOL_IP and SOL_IPV6) and the SOL_FWP queries on the proxy's accepted socket
//	cgroup/setsockopt           takes SOL_FWP records on the proxy's outbound socket (docs/sockopt.md)
//	cgroup/sock_release         drops the per-socket state; stamps a closed UDP client's 4-tuple record
//	cgroup_skb/egress           indexes a redirected UDP socket by the client 4-tuple (a lookup per packet)
//	cgroup_skb/ingress          ALE_AUTH_RECV_ACCEPT: inbound SYNs to listeners, a UDP flow's first datagram (block: dropped)
//	sockops (TCP_LISTEN_CB)     records a listener's owner (also by address, fwp_in_listeners, for Go callouts at AUTH_RECV_ACCEPT: inlisten.go; forgotten at its STATE_CB); ALE_AUTH_LISTEN is classified at its first SYN, a blocked one's SYNs dropped
//
// connect, sendmsg and bind classify and are always attached (bind also
// records the socket's owner for the inbound layers). The others serve
// redirected sockets and the inbound layers: they are attached with the
// first policy that redirects connections, calls Go callouts or has
// AUTH_RECV_ACCEPT or AUTH_LISTEN filters (before it takes effect) and stay until
// Detach or Close, as the sockets it redirected outlive it; a policy
// without redirects costs a connection the three classifying hooks alone.
//
// A v4-mapped destination of a dual-stack socket is classified at the v4
// layers with the v4 address, as the engine's Addr does. A block returns
// EPERM from connect/sendmsg/bind at once (curl: "couldn't connect").
//
// # Policy in maps
//
// Compile takes the engine's filters in evaluation order (View.SharedFilters, not copied) and
// gives each enabled filter of a hooked layer a rank. Per layer and
// condition field (remote/local address, remote/local port, protocol, user
// id, group id, cgroup id, application) a lookup maps the incoming value to
// a class: an LPM trie for addresses (prefixes, exact addresses, ranges and
// NOT_* matches, via prefixes; Options.MaxAddresses entries; a large list's
// hosts go to a host table instead, below), an
// array of 65536 class ids for ports (every integer match but the FLAGS_*
// ones), a hash with a default entry for protocol (any integer match), user,
// group and cgroup ids and applications (EQUAL and NOT_EQUAL).
//
// An application (ale_app_id) is an executable file: its device and inode.
// The hooks read the caller's from the kernel's own record,
// current->mm->exe_file (CO-RE loads), so no exec tracker is needed; Compile
// resolves the policy's paths to files (ResolveApp), WatchApps reports a
// path renamed over (an upgrade) and Policy.AppsChanged says the policy must
// be compiled again to follow it (fwpd does). See docs/semantics.md. Each class owns a bitset
// over ranks: the filters whose conditions on that field accept the value
// (filters without a condition on the field are in every class, and an
// absent value — a local address or port before bind — is in the class of
// only those, as an empty value never matches in the engine). The program
// ANDs the fields' bitsets (a summary word per 64 words skips empty ones) and
// walks the set bits in rank order with WFP arbitration: the first match of
// a sublayer decides it and the rest of the sublayer is skipped; a soft
// decision may be overridden by a later sublayer; a hard permit
// (CLEAR_ACTION_RIGHT) or a block is final, and the walk stops there (no
// callout runs in the kernel, so nothing can veto). Up to MaxFilters ranks
// per layer.
//
// Large address lists and runs of host filters (hosts.go): the v4 hosts of
// a list's most common class go to a host table, a sorted array the hooks
// binary-search before the LPM trie, written with one copy into the
// generation's half of an mmapped array (Options.MaxHosts); consecutive
// host filters of one action (nothing of the layer between their weights)
// compile to one rank whose deciding filter id the kernel finds by the
// remote address, so a million such filters are one rank. See
// docs/semantics.md, "Lists and host filters in the kernel".
//
// Every policy map key carries a generation (0 or 1). Apply writes the new
// policy into the inactive generation and then switches the one-word
// generation index, so a connection is classified wholly by the old or the
// new policy and a failed Apply leaves the old one in force.
//
// Filters the kernel cannot decide alone — a condition on another field
// (interface, direction...), an unsupported match, a layer no hook classifies, a Go
// callout anywhere but below — make Compile fail with an error wrapping
// ErrNotSupported that names the filter; the datapath never ignores a
// filter silently.
//
// # Flows decided by Go callouts
//
// A filter at CONNECT_REDIRECT or AUTH_CONNECT that calls a Go callout and
// matches TCP alone compiles to a hand-over: when the walk reaches it while
// the decision can still change (nothing decided, a soft decision, or a
// hard permit a callout may veto), the connect hook records the flow by
// socket cookie (CalloutFlow: the tuple it classified, the layer, pid, tid,
// uid, gid, cgroup id, comm), sets MarkQueueOpen or MarkQueueClosed in the
// socket's mark (bpf_setsockopt SO_MARK, by the filter's
// PERMIT_IF_CALLOUT_UNREGISTERED) and lets connect() proceed; sockops copies
// the record under the 4-tuple when the SYN is about to leave. Package
// nfqueue queues that SYN, classifies the flow in the engine and answers;
// it registers the namespace it serves (SetCalloutNamespace), and a flow
// in any other namespace, or while none is served, takes the filter's flag
// in the hook at once. A hard decision ends the walk unless a callout
// filter follows (Compile flags such filters); below a hard block the walk
// then ends at the first callout filter without a hand-over. A walk that
// stops at a callout filter carries no new state from step to step (it
// ends with the filter as the decider), so the verifier's work grows by
// ~10k instructions per classifying program (76k for connect4). The
// records go with the socket (sock_release).
//
// A filter matching UDP alone is handed over the same way once the path
// holds UDP (SetCalloutUDP): only for a connected socket (the connect hook;
// an unconnected sendto's datagram took the socket's mark before the
// sendmsg hook, which decides it by the flag). A UDP record is found by
// cookie (CalloutFlowByCookie): no sockops indexes UDP. At
// CONNECT_REDIRECT the hook moves a socket's SOL_FWP records by cookie
// (CalloutRecords), for the callout's RedirectState; a redirect the
// callout chooses is recorded for the proxy API by SetCalloutRedirect, its
// handle a record word with GoRedirectHandleBit set.
//
// # Live flows: reauthorization and flow events
//
// With EnableReauthorization (or EnableFlowEvents) the connect hook keeps
// a note per connected socket in socket storage (the tuple AUTH_CONNECT
// classified, the caller's ids, cgroup and executable; gone with the
// socket). bpf/reauth.c, a separate object loaded then, has TCP and UDP
// socket iterators: LiveFlows lists the connected sockets of the hooked
// cgroups (the iterator checks each socket's cgroup) in one network
// namespace, DestroyFlows ends the ones named by cookie with
// bpf_sock_destroy, and Reauthorize does a whole pass over the namespaces
// of the hooked cgroups' processes: the engine classifies each flow again
// at ALE_AUTH_CONNECT with IS_REAUTHORIZE (ReauthValues), and those it
// blocks are destroyed. Accepted TCP connections too, at
// ALE_AUTH_RECV_ACCEPT: a sockops program of that object, attached beside
// the hooks from then on, records listeners' owners and notes each
// accepted socket with its listener's owner. EnableFlowEvents turns on
// the reports of that sockops program and attaches a sock_release program
// (it only reports ends: without flow events it is not attached, issue
// 15's connect cost); ReadFlowEvents
// reports each noted outbound TCP flow's and accepted TCP connection's
// (direction inbound) establishment and end once, and
// each noted connected UDP socket's end (no establishment report), and
// FlowLayers runs ALE_FLOW_ESTABLISHED and ALE_ENDPOINT_CLOSURE and the
// flow's flowDeleteFn for them in the engine (Compile leaves those layers'
// filters to it). See docs/semantics.md. SweepDead, on the same
// object's liveness iterators, ends the per-socket map state and returns
// the flow handles of sockets no network namespace holds any more (a
// release or closure report that never came; liveness.go).
//
// # Built-in connect redirect
//
// A CONNECT_REDIRECT filter with ActionCalloutUnknown whose callout key is
// BuiltinConnectRedirectKey (or that key + "/" + anything, one callout per
// provider) is run by the kernel. Its provider context is a RedirectConfig in
// JSON: {"proxy":"127.0.0.1:8080","target_pid":1234,"context":"<base64>"}.
// The connect hook rewrites the destination (TCP and UDP, v4, v6 and
// v4-mapped; a v4-only socket is not sent to a v6 proxy), and records the
// original destination, the proxy, the redirect handle (the callout's ID),
// the target pid, the context bytes and the connecting process (pid, uid,
// gid, cgroup id, comm, captured in the hook) by socket cookie; sockops (TCP)
// and the egress hook (UDP) map the client 4-tuple to the same record for
// QueryRedirect and SO_ORIGINAL_DST. UDP is indexed at egress because no
// socket hook sees every UDP socket with its source port: the connect hook
// runs before the kernel binds an unbound socket, and a connected send runs
// none. A UDP client on a wildcard address (an unconnected socket) is
// indexed with a zero client address, which QueryRedirect falls back to, so
// a UDP proxy finds a datagram's redirect from its source and the proxy's
// own address. A TCP record ends when the proxy's accepted socket closes
// (sockops state callback); a UDP one, which no accepted socket marks, is
// stamped when the client socket closes and kept ReleasedGrace (10 s) for
// datagrams still queued to the proxy, then skipped by queries and removed
// by SweepReleased (fwpd runs it every ReleasedGrace/2). A TCP record no
// accepted socket will end (the handshake never completed at the proxy: the
// port was closed, the client's reset overtook its ACK; or the proxy runs
// in a cgroup with neither the hooks nor the proxy hooks) is removed
// by SweepReleased UnacceptedGrace (30 s) after its client closed. A socket
// marked with SetRedirectRecords(cookie, handle)
// before its connect is not redirected by that handle's filters again — the
// proxy's outbound connection — so chained proxies never loop. For the
// arbitration the redirect counts as the callout's permit (soft unless the
// filter has CLEAR_ACTION_RIGHT); the first redirect filter that runs picks
// the proxy, later ones in other sublayers defer to it, as the engine's
// ConnectRedirect recipe does.
//
// # Proxies in other processes
//
// A proxy asks first with socket options the hooks answer (docs/sockopt.md):
// getsockopt(SOL_FWP, FWP_SO_REDIRECT_RECORDS / _CONTEXT / _ORIGINAL_DST)
// on the accepted socket, answered from fwp_tuple_redirect to the
// redirect's target process or root, and setsockopt(SOL_FWP,
// FWP_SO_REDIRECT_RECORDS) on the outbound socket, taken only from a target
// of the redirect the last record names (fwp_targets) or root, kept in the
// socket's local storage and moved to fwp_sock_records by its connect when a
// redirect would run (the layer is then classified again with them). The
// proxy package tries them before any backend. A socket runs the hooks of
// the cgroup it was created in, so the proxy hooks (getsockopt, setsockopt,
// sockops, sock_release) are also attached to each redirect target's cgroup
// at Apply and to the cgroups given to AttachProxy (fwpd's --proxy-cgroup).
//
// The paths below remain for what the socket options do not cover (a UDP
// proxy's unconnected socket, a proxy where no hook reaches):
//
// With Options.PinDir the maps are pinned on a bpffs while the datapath is
// loaded. A proxy (root) opens the redirect maps with OpenRedirects and
// registers ProxyBackend with proxy.Register; the proxy package's
// QueryRedirectRecords, QueryRedirectContext and SetRedirectRecords then
// work on plain net.Conns and *net.Dialers: an accepted connection is found
// by its 4-tuple, a dialer's socket is marked by its SO_COOKIE in the
// Control hook before connect. The records are EncodeRecords of the chain
// of redirect handles (the client socket's own records plus this
// redirect's), so a proxy chain never loops. The context is the filter's
// context bytes or, when it set none, the original destination as text;
// the proxy package gives it only to the redirect target pid (the maps
// themselves are readable by whoever may open the pins: root). A proxy
// without root registers client.ProxyBackend instead: fwpd answers its
// queries from Datapath.QueryProxyRedirect, only to the redirect target pid
// (SO_PEERCRED) or root, and sets records on a socket passed to it over
// its records socket (client.RecordsSocket, SCM_RIGHTS). A UDP proxy on one
// unconnected socket asks per datagram (proxy.QueryDatagramRedirectRecords
// and ...Context): ProxyBackend.QueryDatagram looks the flow up by the
// socket's local address and the datagram's source.
//
// # Lifetime
//
// By default Close detaches everything and removes the pins; a process
// killed with SIGKILL loses its links with its file descriptors (the hooks
// go at once) and leaves only map pins, which the next Load with the same
// PinDir removes. With Options.KeepHooks the links are pinned too and
// Close leaves programs, maps and pins: the policy stays enforced. The
// next Load with KeepHooks adopts the pinned maps (recovering the active
// generation and the keys each generation wrote), and Attach switches each
// pinned link of the same cgroup to the new programs with one link update,
// so the hooks never go away across a restart.
//
// # Net events and counters
//
// The hooks report every drop (connect, sendmsg, bind) and every connect
// redirect on a ring buffer (fwp_events, 1 MiB; the hooks never wait, a
// lagging reader loses events) with the metadata captured in the hook:
// pid (tgid), uid, gid, cgroup id and comm; ReadEvents decodes them and
// ProcessPaths resolves the executable path once per process. Each
// classification that a filter decided counts in a per-CPU hash by filter
// ID (fwp_hits, read with FilterHits; counters of filters no longer
// installed are dropped by Apply).
//
// # Regenerating the BPF objects
//
// The generated fwp_bpfel.go and fwp_bpfel.o are committed, so building and
// testing need no clang. After changing bpf/fwp.c, on Debian:
//
//	apt-get install -y clang-14 llvm libbpf-dev
//	go generate ./datapath/linux/ebpf
//
// # Tests
//
// The kernel tests need root; they skip without it, and fail instead when
// the environment variable CI is set. They share one loaded datapath (a
// load takes ~0.4 s: ~40k verified instructions for each program that
// classifies, of the kernel's 1M limit; TestVerifierHeadroom keeps each
// under 200k — see walk_step's comment), attach it to a child cgroup each
// test creates (never the root cgroup) and run their traffic in helper
// processes started inside that cgroup and a new network namespace (see
// internal/testutil).
package ebpf
