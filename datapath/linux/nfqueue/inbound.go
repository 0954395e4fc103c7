//go:build linux

package nfqueue

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	xunix "fwp/internal/unix"
)

// Go callouts at ALE_AUTH_RECV_ACCEPT: inbound TCP connection requests to
// listeners of the hooked cgroups.
//
// Netfilter's input hook runs before the transport protocol looks the
// socket up, and the ingress hook (cgroup_skb, in sk_filter) after it: a
// mark the hook sets is never seen by an input chain. So the order is the
// other way round. fwp's chain "input" (priority -150) clears the verdict
// bits of every SYN and queues the SYNs whose socket — nft's socket
// expression does the early lookup, which finds the listener — is in a
// hooked cgroup (`socket cgroupv2 level N <id>`), over the same per-CPU
// queues as the outbound SYNs; the reader tells them apart by the hook
// (NF_INET_LOCAL_IN). The path classifies AUTH_RECV_ACCEPT in the engine
// with the listener's owner as the hooks recorded it at listen()
// (ebpf.Datapath.Listener) and answers: a permit accepts the SYN with
// the permit bit in skb->mark (a peer cannot set it; the chain cleared it);
// a block drops it (WFP drops inbound requests); a pend keeps it queued.
// The ingress hook, whose walk stops at the callout filter, passes a SYN
// carrying the permit bit and applies the filter's
// PERMIT_IF_CALLOUT_UNREGISTERED to one without: no reader (the queue
// rule bypasses), a full queue (it fails open), no owner record, the path
// closing.

// InboundRequest is the layer data Go callouts get at AUTH_RECV_ACCEPT
// for a held inbound SYN (ClassifyRequest.LayerData). A callout that pends
// hands it back to CompleteOperation to let the connection in, as a WFP
// callout reinjects the packet it cloned: the layer is then authorized
// again with it and the held SYN goes on if the whole layer permits; nil
// drops the SYN. The SYN itself never leaves the kernel's queue.
type InboundRequest struct {
	Local, Remote netip.AddrPort
	// Packet is a copy of the SYN's IP and TCP headers (at most 128
	// bytes, as queued).
	Packet []byte
}

// hookInput is NF_INET_LOCAL_IN, as a queued packet's header names it.
const hookInput = 1

// Listeners finds the owner of the listener an inbound request reaches
// (ebpf.Datapath implements it): the inbound callouts need it.
type Listeners interface {
	Listener(netns uint64, local netip.AddrPort) (ebpf.Listener, error)
}

const inputChain = "input"

// inKey is one held inbound SYN: its tuple and initial sequence number
// (a retransmission carries the same).
type inKey struct {
	local, remote netip.AddrPort
	seq           uint32
}

// cgroupMatch is a hooked cgroup as nft's socket expression matches it:
// the ancestor at level of the socket's cgroup has id.
type cgroupMatch struct {
	level uint32
	id    uint64
}

func cgroupOf(path string) (cgroupMatch, error) {
	root, err := xunix.FindCgroup2()
	if err != nil {
		return cgroupMatch{}, fmt.Errorf("nfqueue: cgroup v2: %w", err)
	}
	rel, err := filepath.Rel(root, filepath.Clean(path))
	if err != nil || strings.HasPrefix(rel, "..") {
		return cgroupMatch{}, fmt.Errorf("nfqueue: %s is not a cgroup on %s", path, root)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return cgroupMatch{}, fmt.Errorf("nfqueue: cgroup %s: %w", path, err)
	}
	level := uint32(0) // the root: every socket
	if rel != "." {
		level = uint32(strings.Count(rel, "/") + 1)
	}
	return cgroupMatch{level: level, id: st.Ino}, nil
}

// EnableInbound installs the input chain for the cgroups (paths on the
// cgroup v2 hierarchy: the datapath's hooked ones), replacing an earlier
// one: inbound SYNs to their listeners are held for Go callouts at
// AUTH_RECV_ACCEPT. ports narrows the SYNs queued to those local ports
// (ebpf.Policy.InboundCalloutPorts; nil: every port); the ports of earlier
// calls stay queued while the path runs, so a policy change never leaves
// a callout filter's port unqueued between the chain's update and the
// kernel's. The Flows given to Start must implement Listeners.
func (p *Path) EnableInbound(ports []ebpf.PortRange, cgroups ...string) error {
	lst, ok := p.flows.(Listeners)
	if !ok {
		return fmt.Errorf("nfqueue: inbound callouts need the listeners' owners (%T has no Listener)", p.flows)
	}
	var ms []cgroupMatch
	for _, cg := range cgroups {
		m, err := cgroupOf(cg)
		if err != nil {
			return err
		}
		ms = append(ms, m)
	}
	p.inMu.Lock()
	defer p.inMu.Unlock()
	if p.closed() {
		return ErrPathClosed
	}
	p.listeners.Store(&lst)
	all := ports == nil || p.inPortsAll
	if !all {
		ports = mergePorts(append(slices.Clone(p.inPorts), ports...))
		if len(ports) > maxPortRules {
			all = true
		}
	}
	if all {
		ports = nil
	}
	if err := installInput(p.opts.NetNS, p.opts.Marks, p.opts.QueueBase, uint16(p.opts.Queues), ms, ports, p.inu.on); err != nil {
		return err
	}
	p.inu.cgs = ms
	p.inPorts, p.inPortsAll = ports, all
	p.inbound.Store(len(ms) > 0)
	return nil
}

// maxPortRules bounds the queue rules per cgroup (one per port range);
// beyond it every port is queued.
const maxPortRules = 32

// mergePorts sorts port ranges and merges those that overlap or touch.
func mergePorts(rs []ebpf.PortRange) []ebpf.PortRange {
	slices.SortFunc(rs, func(a, b ebpf.PortRange) int { return int(a.Lo) - int(b.Lo) })
	var out []ebpf.PortRange
	for _, r := range rs {
		if n := len(out); n > 0 && uint32(r.Lo) <= uint32(out[n-1].Hi)+1 {
			out[n-1].Hi = max(out[n-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// ErrPathClosed is returned by calls on a closed Path.
var ErrPathClosed = fmt.Errorf("nfqueue: the path is closed")

func (p *Path) closed() bool {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	return p.closing
}

// InboundEnabled reports whether inbound SYNs are held for Go callouts.
func (p *Path) InboundEnabled() bool { return p.inbound.Load() }

// inputRules: every SYN loses the verdict bits (only a queue verdict sets
// them); a SYN to one of the ports (nil: any) whose socket is in a hooked
// cgroup goes to the queues (bypassed when no one reads: ingress then
// applies the filter's flag). The port test comes first: the socket
// lookup costs more.
func inputRules(m Marks, base, total uint16, cgs []cgroupMatch, ports []ebpf.PortRange, udp bool) [][]expr.Any {
	clearBits := []expr.Any{
		pktMark(),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(^(m.Permit | m.Block)), Xor: le32(0)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1}}
	clear := append(synOnly(), clearBits...)
	// Every UDP datagram loses them too (inudp.go): the ingress hook
	// honours the permit bit for UDP callout filters as for SYNs.
	rs := [][]expr.Any{clear, append(udpMatch(), clearBits...)}
	if udp {
		rs = append(rs, udpCtPermitRule(m))
	}
	portMatch := [][]expr.Any{nil}
	if ports != nil {
		portMatch = portMatch[:0]
		for _, pr := range ports {
			dport := &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}
			if pr.Lo == pr.Hi {
				portMatch = append(portMatch, []expr.Any{dport, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(pr.Lo)}})
			} else {
				portMatch = append(portMatch, []expr.Any{dport, &expr.Range{Op: expr.CmpOpEq, Register: 1,
					FromData: binaryutil.BigEndian.PutUint16(pr.Lo), ToData: binaryutil.BigEndian.PutUint16(pr.Hi)}})
			}
		}
	}
	for _, cg := range cgs {
		for _, pm := range portMatch {
			r := append(synOnly(), pm...)
			r = append(r,
				&expr.Socket{Key: expr.SocketKeyCgroupv2, Level: cg.level, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint64(cg.id)},
				nfqueueTarget(base, total, true))
			rs = append(rs, r)
			if udp {
				rs = append(rs, udpQueueRule(m, base, total, cg, pm))
			}
		}
	}
	return rs
}

// installInput replaces the input chain of fwp's tables.
func installInput(netns int, m Marks, base, total uint16, cgs []cgroupMatch, ports []ebpf.PortRange, udp bool) error {
	c, err := conn(netns)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	for _, fam := range families {
		t := &nftables.Table{Family: fam, Name: TableName}
		if chains, err := c.ListChainsOfTableFamily(fam); err == nil {
			for _, ch := range chains {
				if ch.Table.Name == TableName && (ch.Name == inputChain || ch.Name == inPermitChain) {
					c.DelChain(ch)
				}
			}
		}
		ch := c.AddChain(&nftables.Chain{Name: inputChain, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityMangle})
		for _, r := range inputRules(m, base, total, cgs, ports, udp) {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
		}
		if udp {
			addInPermitChain(c, t, m)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: install chain %s %s: %w", TableName, inputChain, err)
	}
	return nil
}

// handleInbound decides an inbound SYN the input chain queued.
func (p *Path) handleInbound(q *queue, pk *packet, start time.Time) {
	remote, local, proto, ok := parseFlow(pk.payload)
	if ok && proto == unix.IPPROTO_UDP {
		p.handleInboundUDP(q, pk, start, local, remote) // inudp.go
		return
	}
	lp := p.listeners.Load()
	if !ok || proto != unix.IPPROTO_TCP || lp == nil {
		p.inFlag(q, pk.id, pk.mark)
		return
	}
	key := inKey{local, remote, tcpSeq(pk.payload)}
	if _, held := p.inHeld.Load(key); held {
		// The client sent its SYN again while the first waits: this one
		// goes; the first is answered when decided.
		p.resent.Add(1)
		if err := q.verdict(pk.id, verdictDrop, 0, false); err != nil {
			p.errs.Add(1)
		}
		return
	}
	l, err := (*lp).Listener(p.netnsCookie, local)
	if err != nil {
		// No owner recorded (a listener older than the hooks, an
		// evicted record): the kernel applies the filter's flag.
		p.inFlag(q, pk.id, pk.mark)
		return
	}
	layer := engine.LayerFor(engine.KindAuthRecvAccept, local.Addr().Is6())
	fl := &flow{q: q, id: pk.id, mark: pk.mark, local: local, remote: remote, seq: key.seq, inbound: true, listener: l,
		f: ebpf.CalloutFlow{Cookie: l.Cookie, Layer: layer, Protocol: unix.IPPROTO_TCP}}
	fl.layers[0], fl.nlayers = layer, 1
	fl.data = &InboundRequest{Local: local, Remote: remote, Packet: append([]byte(nil), pk.payload...)}
	p.fillInboundMeta(fl)
	p.decide(fl, start, p.flowMayBlock(fl), func() { p.inHeld.Store(key, struct{}{}) })
}

// inFlag lets an inbound SYN on without a verdict bit: the ingress hook
// applies its callout filter's PERMIT_IF_CALLOUT_UNREGISTERED flag.
func (p *Path) inFlag(q *queue, id, mark uint32) {
	p.noFlow.Add(1)
	if err := q.verdict(id, verdictAccept, mark&^p.mask, true); err != nil {
		p.errs.Add(1)
	}
}

// answerInbound sends an inbound SYN's verdict: accepted with the permit
// bit, dropped, or (flag) accepted without it.
func (p *Path) answerInbound(fl *flow, permit, flag bool) {
	if fl.f.Protocol == unix.IPPROTO_UDP {
		defer p.inReleaseFollowers(inKey{local: fl.local, remote: fl.remote}, permit, flag)
	}
	p.inHeld.Delete(inKey{fl.local, fl.remote, fl.seq})
	var err error
	switch {
	case flag:
		p.noFlow.Add(1)
		err = fl.q.verdict(fl.id, verdictAccept, fl.mark&^p.mask, true)
	case permit:
		p.permitted.Add(1)
		err = fl.q.verdict(fl.id, verdictAccept, fl.mark&^p.mask|p.opts.Marks.Permit, true)
	default:
		p.blocked.Add(1)
		err = fl.q.verdict(fl.id, verdictDrop, 0, false)
	}
	if err != nil {
		p.errs.Add(1)
		p.opts.Log.Error("nfqueue verdict", "queue", fl.q.num, "err", err)
	}
}

// inboundValues sets the engine's inputs at AUTH_RECV_ACCEPT as the
// ingress hook classifies: the packet's source as the remote side, its
// destination as the local one, and the listener's owner.
func (fl *flow) inboundValues() {
	l := &fl.listener
	vs := &fl.vs
	vs.Reset()
	vs.Set(engine.FieldIPProtocol, engine.Uint8(fl.f.Protocol))
	vs.Set(engine.FieldIPRemoteAddress, engine.Addr(fl.remote.Addr()))
	vs.Set(engine.FieldIPRemotePort, engine.Uint16(fl.remote.Port()))
	vs.Set(engine.FieldIPLocalAddress, engine.Addr(fl.local.Addr()))
	vs.Set(engine.FieldIPLocalPort, engine.Uint16(fl.local.Port()))
	vs.Set(engine.FieldALEUserID, engine.Uint32(l.UID))
	vs.Set(engine.FieldALEGroupID, engine.Uint32(l.GID))
	vs.Set(engine.FieldCgroupID, engine.Uint64(l.CgroupID))
	if fl.app != "" {
		vs.Set(engine.FieldALEAppID, engine.String(fl.app))
	}
	var flags uint32
	if fl.remote.Addr().IsLoopback() {
		flags |= engine.FlagIsLoopback
	}
	vs.Set(engine.FieldFlags, engine.Uint32(flags))
	vs.Set(engine.FieldDirection, engine.Uint32(uint32(engine.DirectionInbound)))
}

// fillInboundMeta: the listener's owner (process, user, cgroup), its
// socket cookie as the transport endpoint handle, direction inbound.
func (p *Path) fillInboundMeta(fl *flow) {
	l := &fl.listener
	m := &fl.meta
	m.Present = engine.MetaProcessID | engine.MetaUserID | engine.MetaPacketDirection | engine.MetaTransportEndpointHandle | engine.MetaCgroupID
	m.ProcessID = l.PID
	m.UserID, m.GroupID = l.UID, l.GID
	m.Direction = engine.DirectionInbound
	m.TransportEndpointHandle = l.Cookie
	m.CgroupID = l.CgroupID
	fl.app = p.inApps.app(l)
	if fl.app != "" && !strings.HasPrefix(fl.app, "[") {
		m.Present |= engine.MetaProcessPath
		m.ProcessPath = fl.app
	}
}

// listenerApps caches each listener owner's application id (a stat and a
// readlink of /proc/PID/exe per SYN otherwise), by listener cookie, owner
// pid and executable, bounded.
type listenerApps struct {
	mu sync.Mutex
	m  map[listenerAppKey]string
}

type listenerAppKey struct {
	cookie uint64
	pid    uint32
	app    ebpf.AppIdentity
}

func (la *listenerApps) app(l *ebpf.Listener) string {
	k := listenerAppKey{l.Cookie, l.PID, l.App}
	la.mu.Lock()
	app, ok := la.m[k]
	la.mu.Unlock()
	if ok {
		return app
	}
	app = ebpf.ListenerApp(nil, *l)
	if strings.HasPrefix(app, "[") {
		return app // not resolved (the process is gone): not kept
	}
	la.mu.Lock()
	if la.m == nil || len(la.m) >= 4096 {
		la.m = map[listenerAppKey]string{}
	}
	la.m[k] = app
	la.mu.Unlock()
	return app
}
