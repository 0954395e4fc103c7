//go:build linux

package nfqueue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

// Flows finds what the kernel hooks captured for a flow handed to user
// space (ebpf.Datapath implements it).
type Flows interface {
	CalloutFlow(local, remote netip.AddrPort) (ebpf.CalloutFlow, error)
	CalloutFlowDecided(f ebpf.CalloutFlow, verdict uint8) error
	// SetCalloutNamespace names the namespace (cookie) whose queues are
	// read, 0 for none: flows elsewhere take their filter's flag at once.
	SetCalloutNamespace(cookie uint64) error
}

// Options configure a Path.
type Options struct {
	// NetNS is an open file descriptor of the network namespace whose
	// traffic the path serves (its nftables tables and queues live there);
	// 0 is the caller's namespace.
	NetNS int
	// Queues is the number of queues, one per CPU (default: the CPUs of
	// the machine); a SYN goes to the queue of the CPU that sent it.
	Queues int
	// QueueBase is the first queue number (default 7000).
	QueueBase uint16
	// MaxLen bounds each queue (default 8192 packets); beyond it a new
	// SYN is decided by its filter's flag at once (Fallbacks).
	MaxLen uint32
	// HoldLimit bounds how long a flow is held whatever the engine says
	// (default 15 s, below connect's SYN timer with the default
	// tcp_syn_retries); the engine's PendTimeout, which applies the
	// filter's PERMIT_IF_CALLOUT_UNREGISTERED, should be shorter.
	HoldLimit time.Duration
	// Priority, when above 0, runs the read loops as SCHED_FIFO threads
	// of that priority (1-99).
	Priority int
	// Marks are the mark bits (default: ebpf.Mark*).
	Marks Marks
	// Log receives errors of the read loops (default: discarded).
	Log *slog.Logger
	// Redirects installs the DNAT chain at Start, so that redirects Go
	// callouts choose at CONNECT_REDIRECT are carried out (redirect.go);
	// it brings conntrack into the served namespace. Without it (and
	// until EnableRedirects) such a redirect is refused.
	Redirects bool
	// UDP installs the UDP rules at Start (udp.go): the first datagram of
	// a UDP flow is held for Go callouts. It brings conntrack into the
	// served namespace. Without it (and until EnableUDP) a UDP flow that
	// reaches a Go callout takes its filter's flag in the hook.
	UDP bool
	// OnFallback, when set, is called (on a goroutine of the path) for
	// each flow the kernel decided by its filter's flag without user
	// space while the path ran (a full queue): for net events. The
	// kernel's NFLOG copies may be lost under a flood; Fallbacks counts
	// them all.
	OnFallback func(Fallback)
}

// Stats count what the path did since it started.
type Stats struct {
	Queued     uint64 // packets read from the queues
	Permitted  uint64
	Blocked    uint64
	Pended     uint64 // flows a callout pended (held without blocking others)
	Held       int64  // flows held right now
	NoFlow     uint64 // packets without hook metadata: decided by their mark's fail-open/closed bit
	Redirects  uint64 // run-time redirects refused (not enabled, or they could not be recorded)
	Redirected uint64 // run-time redirects carried out (the SYN went to the proxy)
	Errors     uint64 // verdicts that could not be sent
	Resent     uint64 // SYNs of decided flows sent again, answered as before
	// Inline and InlineTime: flows decided in the read loop without a
	// pend, and the time from reading their packet to the verdict (the
	// decision alone: sending the verdict runs the packet on).
	Inline     uint64
	InlineTime time.Duration
	// Async: flows classified off the read loop because their layer
	// calls a callout that may block (engine.CalloutMayBlock: a callout
	// program's).
	Async uint64
}

// Path is the kernel callout path: it holds the first packet of each flow
// the kernel hooks handed over, runs the engine's classification (and so
// the Go callouts) with the metadata the hooks captured, and answers with
// the engine's decision. A pended flow waits on a goroutine of its own;
// the read loops go on.
type Path struct {
	eng    *engine.Engine
	flows  Flows
	opts   Options
	queues []*queue
	wg     sync.WaitGroup // read loops
	held   sync.WaitGroup // pended flows
	ctx    context.Context
	cancel context.CancelFunc
	mask   uint32
	paths  processPaths

	queued, permitted, blocked, pended, noFlow, redirects, errs, inline, inlineNanos, resent, redirected, async atomic.Uint64
	holding                                                                                                     atomic.Int64

	logClosed atomic.Bool
	closeOnce sync.Once
	closeErr  error
	holdMu    sync.Mutex // orders held.Add with Close's held.Wait
	closing   bool

	log *nflog    // the fallback rules' NFLOG group, with OnFallback
	rd  redirects // run-time redirects (redirect.go)
	udp udpState  // UDP flows (udp.go)
	// udpHeld: the pended UDP flows by socket cookie, with the datagrams
	// the program sent after the first (udp.go).
	udpHeld sync.Map

	// Inbound SYNs (inbound.go): the served namespace's cookie, the
	// listeners' owners, whether the input chain is installed, and the
	// SYNs held (a retransmission of one is dropped).
	netnsCookie uint64
	inMu        sync.Mutex
	listeners   atomic.Pointer[Listeners]
	inbound     atomic.Bool
	inHeld      sync.Map
	inApps      listenerApps
	inPorts     []ebpf.PortRange // the ports queued (inMu)
	inPortsAll  bool
	inu         inUDPState // inbound UDP flows (inudp.go)
}

// Start installs fwp's nftables tables in the namespace and starts one
// read loop per queue. Close undoes both.
func Start(eng *engine.Engine, flows Flows, opts Options) (*Path, error) {
	if opts.Queues <= 0 {
		opts.Queues = runtime.NumCPU()
	}
	if opts.QueueBase == 0 {
		opts.QueueBase = 7000
	}
	if opts.MaxLen == 0 {
		opts.MaxLen = 8192
	}
	if opts.HoldLimit <= 0 {
		opts.HoldLimit = 15 * time.Second
	}
	if opts.Marks == (Marks{}) {
		opts.Marks = Marks{QueueOpen: ebpf.MarkQueueOpen, QueueClosed: ebpf.MarkQueueClosed, Permit: ebpf.MarkPermit, Block: ebpf.MarkBlock}
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if err := opts.Marks.valid(); err != nil {
		return nil, err
	}
	if int(opts.QueueBase)+opts.Queues > 65536 {
		return nil, fmt.Errorf("nfqueue: queues %d..%d out of range", opts.QueueBase, int(opts.QueueBase)+opts.Queues-1)
	}
	m := opts.Marks
	p := &Path{eng: eng, flows: flows, opts: opts, mask: m.QueueOpen | m.QueueClosed | m.Permit | m.Block}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	for i := range opts.Queues {
		q, err := openQueue(opts.NetNS, opts.QueueBase+uint16(i), i, opts.MaxLen)
		if err != nil {
			p.closeQueues()
			return nil, err
		}
		p.queues = append(p.queues, q)
	}
	// The rules go in once every queue has its reader socket: a
	// fail-closed SYN never meets a queue without one.
	if err := installTable(opts.NetNS, m, opts.QueueBase, uint16(opts.Queues)); err != nil {
		p.closeQueues()
		return nil, err
	}
	// The hooks hand flows over only in the namespace served here.
	cookie, err := unix.GetsockoptUint64(p.queues[0].fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err == nil {
		p.netnsCookie = cookie
		err = flows.SetCalloutNamespace(cookie)
	}
	if err != nil {
		removeTable(opts.NetNS)
		p.closeQueues()
		return nil, fmt.Errorf("nfqueue: the served namespace: %w", err)
	}
	if opts.UDP {
		if err := p.EnableUDP(); err != nil {
			flows.SetCalloutNamespace(0)
			removeTable(opts.NetNS)
			p.closeQueues()
			return nil, err
		}
	}
	if opts.Redirects {
		if err := p.EnableRedirects(); err != nil {
			p.closeUDP()
			flows.SetCalloutNamespace(0)
			removeTable(opts.NetNS)
			p.closeQueues()
			return nil, err
		}
	}
	if opts.OnFallback != nil {
		if p.log, err = openNflog(opts.NetNS, p.fallbackGroup()); err != nil {
			p.closeRedirects()
			p.closeUDP()
			flows.SetCalloutNamespace(0)
			removeTable(opts.NetNS)
			p.closeQueues()
			return nil, fmt.Errorf("nfqueue: NFLOG group %d: %w", p.fallbackGroup(), err)
		}
		p.wg.Add(1)
		go p.logLoop()
	}
	for _, q := range p.queues {
		p.wg.Add(1)
		go p.readLoop(q)
	}
	return p, nil
}

// Close stops handing flows over (new ones take their filter's flag in the
// hook), answers every held flow by its filter's
// PERMIT_IF_CALLOUT_UNREGISTERED flag (the callouts are going away with
// the path; the rules are still there to carry a block out), then removes
// the tables and closes the queues. It may be called more than once.
func (p *Path) Close() error {
	p.closeOnce.Do(func() { p.closeErr = p.close() })
	return p.closeErr
}

func (p *Path) close() error {
	// New flows take their filter's flag in the hook from now on.
	err := p.flows.SetCalloutNamespace(0)
	err = errors.Join(err, p.closeUDP())
	p.holdMu.Lock()
	p.closing = true
	p.holdMu.Unlock()
	p.cancel()
	// The held flows' verdicts need the rules (a block is the reset rule).
	p.held.Wait()
	err = errors.Join(err, removeTable(p.opts.NetNS))
	p.closeRedirects()
	p.closeQueues()
	if p.log != nil {
		p.logClosed.Store(true)
	}
	p.wg.Wait()
	return err
}

func (p *Path) closeQueues() {
	for _, q := range p.queues {
		q.close()
	}
}

// Stats returns the path's counters.
func (p *Path) Stats() Stats {
	return Stats{Queued: p.queued.Load(), Permitted: p.permitted.Load(), Blocked: p.blocked.Load(), Pended: p.pended.Load(),
		Held: p.holding.Load(), NoFlow: p.noFlow.Load(), Redirects: p.redirects.Load(), Errors: p.errs.Load(),
		Inline: p.inline.Load(), InlineTime: time.Duration(p.inlineNanos.Load()), Resent: p.resent.Load(), Redirected: p.redirected.Load(), Async: p.async.Load()}
}

// Fallbacks counts the SYNs the kernel decided by their filter's
// PERMIT_IF_CALLOUT_UNREGISTERED flag without user space — no reader, or
// a full queue — in the served namespace: fail-open ones let on, fail-closed
// ones refused with a reset (table.go's fallback chain).
func (p *Path) Fallbacks() (open, closed uint64, err error) { return fallbackCounts(p.opts.NetNS) }

// Rules reports how many rules fwp's tables hold in the path's namespace
// (-1: no table), for checks that nothing is left behind.
func Rules(netns int) (int, error) { return tableRules(netns) }

// logLoop reads the fallback rules' NFLOG copies until Close.
func (p *Path) logLoop() {
	defer p.wg.Done()
	defer p.log.close()
	for !p.logClosed.Load() {
		err := p.log.read(p.opts.Marks, p.opts.OnFallback)
		switch {
		case err == nil, errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR), errors.Is(err, unix.ENOBUFS):
		default:
			p.opts.Log.Error("nflog read", "err", err)
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// readLoop reads one queue on a thread pinned to the queue's CPU; the
// thread gets its CPUs back when the loop ends.
func (p *Path) readLoop(q *queue) {
	defer p.wg.Done()
	runtime.LockOSThread()
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err == nil {
		set.Set(q.cpu)
		if unix.SchedSetaffinity(0, &set) == nil { // a CPU that is offline: stay where we are
			defer unix.SchedSetaffinity(0, &old)
		}
	}
	defer runtime.UnlockOSThread()
	if p.opts.Priority > 0 {
		// A woken reader runs before ordinary tasks on its CPU: on a busy
		// machine the wake-up, not the decision, is the SYN's delay. The
		// loop blocks between packets, and the kernel's RT throttling
		// bounds it under a flood.
		if unix.SchedSetAttr(0, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: uint32(p.opts.Priority)}, 0) == nil {
			defer unix.SchedSetAttr(0, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_NORMAL}, 0)
		}
	}
	for !q.closed.Load() {
		err := q.read(func(pk *packet) { p.handle(q, pk) })
		switch {
		case err == nil, errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR), errors.Is(err, unix.ENOBUFS):
		case q.closed.Load():
			return
		default:
			p.opts.Log.Error("nfqueue read", "queue", q.num, "err", err)
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// flow is one held flow: the hook's metadata and the engine's inputs.
type flow struct {
	q             *queue
	id, mark      uint32
	local, remote netip.AddrPort // as the packet carries them
	seq           uint32         // an inbound SYN's sequence number (its held key)
	f             ebpf.CalloutFlow
	layers        [2]engine.LayerID
	nlayers       int
	stage         int
	vs            engine.Values
	meta          engine.Metadata
	// redirect is the run-time redirect CONNECT_REDIRECT chose (carried
	// out if AUTH_CONNECT permits the proxy's address), by filter.
	redirect       *engine.Redirect
	redirectFilter engine.FilterID
	// inbound: an inbound SYN at AUTH_RECV_ACCEPT (inbound.go), with its
	// listener's owner and application id.
	inbound  bool
	listener ebpf.Listener
	app      string
	data     any // the callouts' layer data: an inbound SYN's *InboundRequest
}

func (p *Path) handle(q *queue, pk *packet) {
	start := time.Now()
	p.queued.Add(1)
	if pk.hook == hookInput {
		p.handleInbound(q, pk, start) // an inbound SYN (inbound.go)
		return
	}
	local, remote, proto, ok := parseFlow(pk.payload)
	if !ok {
		p.failByMark(q, pk)
		return
	}
	var f ebpf.CalloutFlow
	var err error
	if proto == unix.IPPROTO_UDP {
		f, err = p.udpFlow(local, remote)
	} else {
		f, err = p.flows.CalloutFlow(local, remote)
	}
	if err != nil {
		// No metadata (the socket closed, or the map was full): the
		// filter's fail-open/closed flag, which the mark carries.
		p.failByMark(q, pk)
		return
	}
	fl := &flow{q: q, id: pk.id, mark: pk.mark, local: local, remote: remote, f: f}
	if f.Protocol == unix.IPPROTO_UDP && f.Verdict == 0 && p.followHeld(q, pk, f.Cookie) {
		return // a later datagram of a held UDP flow: it waits with the first
	}
	if f.Verdict != 0 {
		// A SYN sent again (no SYN-ACK came yet): the same answer.
		p.resent.Add(1)
		switch f.Verdict {
		case ebpf.VerdictRedirect:
			// Its first SYN met the DNAT chain unless it was lost
			// before conntrack kept the translation: this one is
			// sent to the proxy the flow's redirect names (none
			// left: dropped there, never sent on unproxied).
			p.verdictRedirect(fl, p.redirectProxy(f.Cookie))
		default:
			p.verdict(fl, f.Verdict == ebpf.VerdictPermit)
		}
		return
	}
	if f.Layer.Kind() == engine.KindConnectRedirect {
		fl.layers = [2]engine.LayerID{f.Layer, engine.LayerFor(engine.KindAuthConnect, f.Layer.V6())}
		fl.nlayers = 2
	} else {
		fl.layers[0], fl.nlayers = f.Layer, 1
	}
	p.fillMeta(fl)
	p.decide(fl, start, p.flowMayBlock(fl), nil)
}

// flowMayBlock reports whether the flow's classification may call a
// callout that may block (a callout program's): only then does it leave
// the read loop, not every flow of a layer where some callout program's
// filter is (measured: a goroutine of its own costs an embedded callout's
// flow ~+80 µs on this 2-vCPU VM, docs/benchmarks.md). AUTH_CONNECT after
// CONNECT_REDIRECT sees the values a redirect sets, known only then: there
// the layer decides.
func (p *Path) flowMayBlock(fl *flow) bool {
	if fl.nlayers == 2 && p.eng.LayerMayBlock(fl.layers[1]) {
		return true
	}
	if !p.eng.LayerMayBlock(fl.layers[0]) {
		return false
	}
	if fl.inbound {
		fl.inboundValues()
	} else {
		fl.values()
	}
	return p.eng.FlowMayBlock(fl.layers[0], &fl.vs)
}

// decide classifies a queued flow. When a layer may call a callout
// program (mayBlock), which answers over a socket, slowly or not at all
// before its deadline, the flow is classified on a goroutine of its own
// and this queue goes on with the next packet; otherwise inline, and a
// pended flow waits on a goroutine. held, if set, runs just before the
// flow is handed to a goroutine (the inbound path notes the held SYN).
func (p *Path) decide(fl *flow, start time.Time, mayBlock bool, held func()) {
	if mayBlock {
		if held != nil {
			held()
		}
		if p.hold(fl, nil) {
			p.async.Add(1)
			go p.wait(fl, engine.Result{})
		}
		return
	}
	res, pended := p.run(fl)
	if !pended {
		p.inline.Add(1)
		p.inlineNanos.Add(uint64(time.Since(start)))
		p.answer(fl, res)
		return
	}
	if held != nil {
		held()
	}
	if p.hold(fl, res.Pend) {
		p.pended.Add(1)
		go p.wait(fl, res)
	}
}

// hold counts a flow that a goroutine will answer; when the path is
// closing it answers it at once by the filter's flag instead (false).
func (p *Path) hold(fl *flow, pend *engine.Pend) bool {
	p.holdMu.Lock()
	if p.closing {
		p.holdMu.Unlock()
		if pend != nil {
			pend.Cancel()
		}
		p.answerFail(fl)
		return false
	}
	p.held.Add(1)
	p.holdMu.Unlock()
	switch {
	case fl.f.Protocol != unix.IPPROTO_UDP:
	case fl.inbound:
		p.inu.held.Store(inKey{local: fl.local, remote: fl.remote}, &heldUDP{}) // inudp.go
	default:
		p.udpHeld.Store(fl.f.Cookie, &heldUDP{})
	}
	p.holding.Add(1)
	return true
}

// run classifies the flow's remaining layers until one pends or the flow
// is decided.
func (p *Path) run(fl *flow) (engine.Result, bool) {
	var res engine.Result
	for fl.stage < fl.nlayers {
		if fl.inbound {
			fl.inboundValues()
		} else {
			fl.values()
		}
		res = p.eng.ClassifyLayerData(fl.layers[fl.stage], &fl.vs, &fl.meta, fl.data)
		if res.Pend != nil {
			return res, true
		}
		if p.next(fl, &res) {
			break
		}
	}
	return res, false
}

// next takes one layer's final result: true when it decides the flow.
func (p *Path) next(fl *flow, res *engine.Result) bool {
	if !res.Permitted() {
		return true
	}
	if res.Redirect.Redirected() {
		// A redirect chosen at run time: the held SYN is sent to the
		// proxy (redirect.go) if AUTH_CONNECT permits the proxy's
		// address. Where that cannot be done it is refused, never
		// silently unproxied.
		if fl.layers[fl.stage].Kind() != engine.KindConnectRedirect || fl.f.Protocol != unix.IPPROTO_TCP || !p.RedirectsEnabled() {
			p.redirects.Add(1)
			*res = engine.Result{ClassifyOut: engine.ClassifyOut{Action: engine.ActionBlock}, Filter: res.Filter, Callout: res.Callout}
			return true
		}
		fl.redirect, fl.redirectFilter = res.Redirect, res.Filter
	}
	fl.stage++
	return fl.stage >= fl.nlayers
}

// wait finishes a held flow on its own goroutine: a pended one (res
// holds the pend), or one not classified yet (a zero res: its callout may
// block).
func (p *Path) wait(fl *flow, res engine.Result) {
	defer p.held.Done()
	defer p.holding.Add(-1)
	if res.Pend == nil {
		var pended bool
		if res, pended = p.run(fl); !pended {
			p.answer(fl, res)
			return
		}
		p.pended.Add(1)
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.opts.HoldLimit)
	defer cancel()
	for {
		r, err := p.eng.FinishPended(ctx, res, &fl.vs, &fl.meta)
		if err != nil {
			if p.ctx.Err() != nil {
				p.answerFail(fl) // closing: the callouts go away with the path
				return
			}
			p.answer(fl, r)
			return
		}
		if p.next(fl, &r) {
			p.answer(fl, r)
			return
		}
		var pended bool
		if res, pended = p.run(fl); !pended {
			p.answer(fl, res)
			return
		}
	}
}

// failResult is the filter's PERMIT_IF_CALLOUT_UNREGISTERED decision.
func (p *Path) failResult(fl *flow) engine.Result {
	r := engine.Result{ClassifyOut: engine.ClassifyOut{Action: engine.ActionBlock}}
	if fl.f.FailOpen {
		r.Action = engine.ActionPermit
	}
	return r
}

// answerFail answers a held flow by its filter's
// PERMIT_IF_CALLOUT_UNREGISTERED flag (an inbound SYN: without a verdict
// bit, so that the ingress hook applies it).
func (p *Path) answerFail(fl *flow) {
	if fl.inbound {
		p.answerInbound(fl, false, true)
		return
	}
	fl.redirect = nil
	p.answer(fl, p.failResult(fl))
}

// answer gives the held packet its verdict: it goes through the chain
// again with the permit mark (saved in the connection's mark: later
// packets pass at once) or the block mark (a TCP reset to the program).
func (p *Path) answer(fl *flow, res engine.Result) {
	if fl.inbound {
		p.answerInbound(fl, res.Permitted(), false)
		return
	}
	permit := res.Permitted()
	redirect := permit && fl.redirect != nil
	var proxy uint32
	if redirect {
		var err error
		if proxy, err = p.carryRedirect(fl); err != nil {
			p.redirects.Add(1)
			p.opts.Log.Error("nfqueue: a run-time redirect could not be carried out: the flow is refused", "local", fl.local, "remote", fl.remote, "err", err)
			permit, redirect = false, false
		}
	}
	v := uint8(ebpf.VerdictBlock)
	if fl.f.Protocol == unix.IPPROTO_UDP {
		defer p.releaseFollowers(fl.f.Cookie, permit)
	}
	switch {
	case redirect:
		p.permitted.Add(1)
		p.redirected.Add(1)
		v = ebpf.VerdictRedirect
		p.verdictRedirect(fl, proxy)
	case permit:
		p.permitted.Add(1)
		v = ebpf.VerdictPermit
		p.verdict(fl, true)
	default:
		p.blocked.Add(1)
		p.verdict(fl, false)
	}
	// Noted here, after the verdict is on its way, on the thread that
	// sent it: handing the note to another goroutine woke a second
	// thread per flow, and that wake-up, on a CPU the woken program
	// wants, cost the flow ~50 µs more than this one system call
	// (docs/benchmarks.md, "the queue's floor").
	p.flows.CalloutFlowDecided(fl.f, v)
}

func (p *Path) verdict(fl *flow, permit bool) {
	if permit {
		p.verdictMark(fl, p.opts.Marks.Permit)
	} else {
		p.verdictMark(fl, p.opts.Marks.Block)
	}
}

// verdictMark lets the held packet through the chain again with the
// verdict bits bits (Permit|Block: on, to the DNAT chain).
func (p *Path) verdictMark(fl *flow, bits uint32) {
	mark := fl.mark&^p.mask | bits
	if err := fl.q.verdict(fl.id, verdictRepeat, mark, true); err != nil {
		p.errs.Add(1)
		p.opts.Log.Error("nfqueue verdict", "queue", fl.q.num, "err", err)
	}
}

// verdictRedirect lets a redirected flow's SYN on with both verdict bits
// and the proxy's index in the mark's low bits (the DNAT chain puts the
// socket's mark back).
func (p *Path) verdictRedirect(fl *flow, proxy uint32) {
	mark := fl.mark&^(p.mask|proxyIndexMask) | p.opts.Marks.Permit | p.opts.Marks.Block | proxy&proxyIndexMask
	if err := fl.q.verdict(fl.id, verdictRepeat, mark, true); err != nil {
		p.errs.Add(1)
		p.opts.Log.Error("nfqueue verdict", "queue", fl.q.num, "err", err)
	}
}

// failByMark answers a packet the path cannot classify by the fail bit
// its socket's mark carries.
func (p *Path) failByMark(q *queue, pk *packet) {
	p.noFlow.Add(1)
	mark := pk.mark &^ p.mask
	if pk.mark&p.opts.Marks.QueueOpen != 0 {
		mark |= p.opts.Marks.Permit
	} else {
		mark |= p.opts.Marks.Block
	}
	if err := q.verdict(pk.id, verdictRepeat, mark, true); err != nil {
		p.errs.Add(1)
	}
}

// values sets the engine's inputs for the flow's current layer: the tuple
// the hook classified (a local address or port is present only when the
// socket was bound at connect, as in the kernel's classification).
func (fl *flow) values() {
	f := &fl.f
	vs := &fl.vs
	vs.Reset()
	vs.Set(engine.FieldIPProtocol, engine.Uint8(f.Protocol))
	vs.Set(engine.FieldIPRemoteAddress, engine.Addr(f.Remote.Addr()))
	vs.Set(engine.FieldIPRemotePort, engine.Uint16(f.Remote.Port()))
	if a := f.Local.Addr(); a.IsValid() && !a.IsUnspecified() {
		vs.Set(engine.FieldIPLocalAddress, engine.Addr(a))
	}
	if f.Local.Port() != 0 {
		vs.Set(engine.FieldIPLocalPort, engine.Uint16(f.Local.Port()))
	}
	vs.Set(engine.FieldALEUserID, engine.Uint32(f.UID))
	vs.Set(engine.FieldALEGroupID, engine.Uint32(f.GID))
	vs.Set(engine.FieldCgroupID, engine.Uint64(f.CgroupID))
	if fl.meta.ProcessPath != "" {
		vs.Set(engine.FieldALEAppID, engine.String(fl.meta.ProcessPath))
	}
	var flags uint32
	if f.Remote.Addr().IsLoopback() {
		flags |= engine.FlagIsLoopback
	}
	if f.Redirected && fl.layers[fl.stage].Kind() == engine.KindAuthConnect {
		flags |= engine.FlagIsConnectionRedirected
	}
	vs.Set(engine.FieldFlags, engine.Uint32(flags))
	vs.Set(engine.FieldDirection, engine.Uint32(uint32(engine.DirectionOutbound)))
	if fl.redirect != nil && fl.layers[fl.stage].Kind() == engine.KindAuthConnect {
		// AUTH_CONNECT sees the proxy's address, the original
		// destination, the records and the context (seed 001).
		fl.redirect.ApplyTo(vs, &fl.meta)
	}
}

// fillMeta sets the metadata the hook captured; the socket cookie is the
// flow handle and the transport endpoint handle.
func (p *Path) fillMeta(fl *flow) {
	f := &fl.f
	m := &fl.meta
	m.Present = engine.MetaProcessID | engine.MetaUserID | engine.MetaFlowHandle | engine.MetaPacketDirection |
		engine.MetaTransportEndpointHandle | engine.MetaCgroupID
	m.ProcessID = f.PID
	m.UserID, m.GroupID = f.UID, f.GID
	m.FlowHandle = engine.FlowHandle(f.Cookie)
	m.Direction = engine.DirectionOutbound
	m.TransportEndpointHandle = f.Cookie
	m.CgroupID = f.CgroupID
	if rdr, ok := p.flows.(Redirector); ok && fl.layers[0].Kind() == engine.KindConnectRedirect {
		// The records a proxy set on its socket: a callout must not
		// redirect its own proxy's connection again.
		if recs := ebpf.EngineRedirectRecords(rdr.CalloutRecords(f.Cookie)); recs != nil {
			m.Present |= engine.MetaRedirectRecords
			m.RedirectRecords = recs
		}
	}
	if path := p.paths.path(f.PID, f.Comm); path != "" {
		m.Present |= engine.MetaProcessPath
		m.ProcessPath = path
	}
}

// parseTCP reads the 4-tuple of an IPv4 or IPv6 TCP packet (no IPv6
// extension headers: a SYN carries none).
func parseTCP(b []byte) (local, remote netip.AddrPort, ok bool) {
	local, remote, proto, ok := parseFlow(b)
	return local, remote, ok && proto == unix.IPPROTO_TCP
}

// parseFlow reads the 4-tuple and protocol of an IPv4 or IPv6 TCP or UDP
// packet (no IPv6 extension headers).
func parseFlow(b []byte) (local, remote netip.AddrPort, proto uint8, ok bool) {
	if len(b) < 20 {
		return
	}
	var src, dst netip.Addr
	var l4 []byte
	switch b[0] >> 4 {
	case 4:
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl+4 || (b[9] != unix.IPPROTO_TCP && b[9] != unix.IPPROTO_UDP) {
			return
		}
		proto = b[9]
		src = netip.AddrFrom4([4]byte(b[12:16]))
		dst = netip.AddrFrom4([4]byte(b[16:20]))
		l4 = b[ihl:]
	case 6:
		if len(b) < 44 || (b[6] != unix.IPPROTO_TCP && b[6] != unix.IPPROTO_UDP) {
			return
		}
		proto = b[6]
		src = netip.AddrFrom16([16]byte(b[8:24])).Unmap()
		dst = netip.AddrFrom16([16]byte(b[24:40])).Unmap()
		l4 = b[40:]
	default:
		return
	}
	sp := uint16(l4[0])<<8 | uint16(l4[1])
	dp := uint16(l4[2])<<8 | uint16(l4[3])
	return netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp), proto, true
}

// tcpSeq reads a TCP packet's sequence number (0 if it has none).
func tcpSeq(b []byte) uint32 {
	off := 40
	if len(b) > 0 && b[0]>>4 == 4 {
		off = int(b[0]&0x0f) * 4
	}
	if len(b) < off+8 {
		return 0
	}
	return uint32(b[off+4])<<24 | uint32(b[off+5])<<16 | uint32(b[off+6])<<8 | uint32(b[off+7])
}

// processPaths resolves a process's executable once (per pid and comm: a
// reused pid has another comm, mostly), bounded.
type processPaths struct {
	mu sync.Mutex
	m  map[uint32]procEntry
}

type procEntry struct{ comm, path string }

func (pp *processPaths) path(pid uint32, comm string) string {
	if pid == 0 {
		return ""
	}
	pp.mu.Lock()
	e, ok := pp.m[pid]
	pp.mu.Unlock()
	if ok && e.comm == comm {
		return e.path
	}
	path, err := os.Readlink("/proc/" + strconv.FormatUint(uint64(pid), 10) + "/exe")
	if err != nil {
		return ""
	}
	pp.mu.Lock()
	if pp.m == nil || len(pp.m) >= 4096 {
		pp.m = map[uint32]procEntry{}
	}
	pp.m[pid] = procEntry{comm, path}
	pp.mu.Unlock()
	return path
}
