// Package nfqueue is the kernel callout path: Go callouts decide real
// sockets of unmodified programs. The kernel hooks (package ebpf) decide
// every flow they can alone; a TCP flow whose arbitration reaches a filter
// calling a Go callout, while the decision can still change, is handed
// here, and only its first packet (the SYN) comes to user space.
//
// # How a flow comes up
//
// The connect hook, whose walk stopped at the callout filter, records what
// it captured (the tuple it classified, pid, tid, uid, gid, cgroup id, comm,
// socket cookie, the layer) by socket cookie and sets a queue bit in the
// socket's mark (SO_MARK, through bpf_setsockopt; ebpf.MarkQueueOpen for a
// filter with PERMIT_IF_CALLOUT_UNREGISTERED, else ebpf.MarkQueueClosed).
// sockops indexes the record by the 4-tuple once the SYN is about to leave.
// fwp's own nftables tables (ip and ip6, named "fwp", in the namespace of
// the traffic; installed by Start, removed by Close) then run, at output
// (chain "output", priority -150, before NAT):
//
//	meta mark & Permit              → accept
//	meta mark & Block, tcp          → reject with tcp reset (connect: ECONNREFUSED at once)
//	meta mark & Block               → drop
//	meta mark & QueueOpen,   tcp SYN → NFQUEUE fanout over the CPUs' queues, bypass
//	meta mark & QueueClosed, tcp SYN → NFQUEUE fanout, bypass
//
// and chain "fallback" (-149), which a queue-marked SYN reaches only when
// no one reads the queues or they are full (they fail open):
//
//	meta mark & QueueClosed, tcp SYN → counter, reject with tcp reset
//	meta mark & QueueOpen,   tcp SYN → counter (on)
//
// Run-time redirects add a "proxies" map and a nat chain (redirect.go);
// UDP callouts add the "udp" and "udpfallback" chains (udp.go). Both bring
// conntrack into the namespace and are installed only when a policy needs
// them.
//
// ("tcp SYN": SYN set, ACK, RST and FIN clear.) Only the SYN is queued:
// later packets of the socket match nothing. A SYN the program sends again
// before the SYN-ACK finds the verdict user space noted on the hook's
// record and gets the same answer without a second classification. There
// is no conntrack state: a connection mark would let a new socket that
// reuses the 4-tuple of a permitted connection whose conntrack entry still
// lingers pass unasked (a soak of 100,000 connects met it once).
//
// The queue target is xtables' NFQUEUE (revision 3) through nft's compat
// expression (github.com/google/nftables): this kernel lacks nft's native
// queue statement. Sockets of other cgroups never carry the bits.
//
// # Verdicts
//
// One queue per CPU, each read by a netlink loop on a locked thread pinned
// to that CPU (the fanout queues a SYN on the CPU that sent it): the
// reader parses the tuple, finds the hook's record, runs the engine's
// classification (CONNECT_REDIRECT then AUTH_CONNECT, or AUTH_CONNECT
// alone, from the layer the kernel stopped at) with that metadata and
// answers in the same loop — no goroutine hop on the fast path. The
// verdict is NF_REPEAT with the permit or block bit in the packet mark, so
// the rules above let the SYN on or reset the connection; the same thread
// then notes the verdict on the hook's record (handing that note to
// another goroutine woke a second thread per flow, which cost the flow
// more than the system call). A callout that pends holds the
// SYN: the flow moves to a goroutine of its own (engine.FinishPended) and
// the loop reads on, so a flow pended for minutes delays no other. The
// engine's PendTimeout applies the filter's PERMIT_IF_CALLOUT_UNREGISTERED
// to a pend never completed; Options.HoldLimit bounds any hold below
// connect's SYN timer. On Close, held flows get their filter's flag.
//
// A packet without a record (its socket closed, a full map) is answered by
// the fail bit its mark carries. A redirect chosen by a Go callout at run
// time is carried out on the held SYN by conntrack's DNAT (redirect.go).
//
// The raw netlink loop is ours rather than florianl/go-nfqueue's: measured
// on this kernel (docs/benchmarks.md, design.md §3), go-nfqueue's reader
// goroutine and callback add a scheduler hop per packet and miss the
// +30 µs budget per new flow that a loop writing its verdict where it read
// the packet meets. BenchmarkNewFlowLatency measures both side by side
// (its peer arms: internal/nfqpeer, a go-nfqueue/v2 peer).
//
// # Inbound connection requests (inbound.go)
//
// Go callouts at ALE_AUTH_RECV_ACCEPT decide inbound TCP connection
// requests to listeners of the hooked cgroups. Netfilter's input hook runs
// before the socket lookup that the ingress hook follows, so the order is
// reversed: EnableInbound adds the chain "input" (-150), which clears the
// verdict bits of every SYN and queues the SYNs to the local ports the
// callout filters can match whose socket (nft's socket cgroupv2, an early
// lookup) is in a hooked cgroup, over the same queues (the reader tells
// them apart by the hook). The engine classifies with the listener's owner
// the hooks recorded at listen() (ebpf.Datapath.Listener); a permit
// accepts the SYN with the permit bit, which the ingress hook, whose walk
// stopped at the callout filter, honours; a block drops it; a pend holds
// it, with *InboundRequest as the callouts' layer data to hand back at
// completion. A SYN without the bit (no reader, a full queue, no owner
// record) gets the filter's PERMIT_IF_CALLOUT_UNREGISTERED in the hook.
//
// # Inbound UDP flows (inudp.go)
//
// Go callouts at ALE_AUTH_RECV_ACCEPT decide the first datagram of inbound
// UDP flows to sockets of the hooked cgroups (EnableInboundUDP). The input
// chain clears the verdict bits of every datagram, gives a datagram whose
// conntrack entry was permitted before the permit bit, and queues one in
// the entry's original direction that lacks it, to a hooked socket on a
// queued port. The reader finds the receiving socket (sock_diag) and its
// owner by cookie (ebpf.Datapath.UDPOwner) and classifies as for a SYN; a
// permit accepts the datagram with the permit bit, which the chain
// "inpermit" (-149) saves in the conntrack entry (a bit of its own), so
// the flow's later datagrams stay in the kernel; a block drops it; a pend
// holds it, with the flow's later datagrams behind it.
//
// # Tests
//
// The tests need root (they skip without it, and fail with CI set). Each
// creates a child cgroup, attaches the eBPF datapath there, and runs its
// programs (curl, Go clients) in a helper process with a network namespace
// of its own; the path installs its tables and queues in that namespace,
// so the host's firewall is never touched.
package nfqueue
