//go:build linux

package nfqueue

import (
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

// Go callouts at ALE_AUTH_RECV_ACCEPT for inbound UDP: the first datagram
// of an inbound UDP flow to a socket of the hooked cgroups.
//
// The inbound SYN's design with the outbound UDP flows' state. The input
// chain (priority -150) clears the verdict bits of every datagram, as of
// every SYN; with inbound UDP on it also
//
//	udp, ct mark & InPermit                        → meta mark |= Permit
//	udp, ct direction original, ct mark lacks InPermit,
//	  [local port], socket cgroupv2 in a hooked one → NFQUEUE fanout, bypass
//
// and the chain "inpermit" (input, -149), which the held datagram reaches
// when its verdict accepts it with the permit bit, saves the verdict in
// the conntrack entry:
//
//	udp, meta mark & Permit, ct mark lacks InPermit → ct mark |= InPermit
//
// (InPermit: a conntrack mark bit of its own, inCtPermit)
// so every later datagram of the flow passes in the kernel with the bit,
// never coming to user space, as an outbound flow's do; the ingress hook,
// whose walk stopped at the callout filter, passes a datagram with the bit
// and records the flow in fwp_in_flows (a datagram without it was not
// answered by user space: the filter's PERMIT_IF_CALLOUT_UNREGISTERED).
// Replies to the hooked socket's own flows are conntrack's reply direction
// and are not queued (the kernel knows them: fwp_in_flows' outbound
// records). A block drops the datagram (WFP drops inbound packets) and
// keeps nothing: the flow's next datagram is classified again. The
// conntrack entry is the flow, as for outbound UDP: a flow whose entry
// lives (30 s unanswered, 120 s answered) is not asked again.
//
// The path finds the receiving socket as the kernel delivers to it
// (sock_diag's exact lookup, udpCookie) and its owner by cookie
// (ebpf.Datapath.UDPOwner: the binding process the hooks recorded);
// datagrams of a flow that arrive while its first is held wait behind it
// and get its verdict, without a classification of their own.

const inPermitChain = "inpermit"

// UDPOwners finds the owner of the UDP socket an inbound datagram is
// delivered to (ebpf.Datapath implements it): inbound UDP callouts need it.
type UDPOwners interface {
	UDPOwner(cookie uint64) (ebpf.Listener, error)
}

// inUDPState is the path's inbound UDP part (fields under Path.inMu but
// held).
type inUDPState struct {
	on  bool
	cgs []cgroupMatch // the hooked cgroups of the last EnableInbound
	// held: the pended inbound UDP flows by tuple, with the datagrams
	// that came after the first.
	held sync.Map
}

// EnableInboundUDP lets the path hold the first datagram of inbound UDP
// flows for Go callouts at AUTH_RECV_ACCEPT: the UDP rules of the input
// chain (now, or at the EnableInbound that installs it) and the inpermit
// chain. It installs the outbound UDP rules too if not yet (EnableUDP:
// conntrack and the sock_diag socket). The Flows given to Start must
// implement UDPOwners and UDPFlows.
func (p *Path) EnableInboundUDP() error {
	if _, ok := p.flows.(UDPOwners); !ok {
		return fmt.Errorf("%w: inbound UDP callouts need the sockets' owners (%T has no UDPOwner)", ErrNotSupported, p.flows)
	}
	if err := p.EnableUDP(); err != nil {
		return err
	}
	p.inMu.Lock()
	defer p.inMu.Unlock()
	if p.closed() {
		return ErrPathClosed
	}
	if p.inu.on {
		return nil
	}
	if p.inbound.Load() {
		ports := p.inPorts
		if p.inPortsAll {
			ports = nil
		}
		if err := installInput(p.opts.NetNS, p.opts.Marks, p.opts.QueueBase, uint16(p.opts.Queues), p.inu.cgs, ports, true); err != nil {
			return err
		}
	}
	p.inu.on = true
	return nil
}

// InboundUDPEnabled reports whether inbound UDP flows are held.
func (p *Path) InboundUDPEnabled() bool {
	p.inMu.Lock()
	defer p.inMu.Unlock()
	return p.inu.on
}

// inCtPermit is the conntrack mark bit of an inbound flow a queue verdict
// permitted: a bit of its own (the Block bit's position, which no rule
// sets in a conntrack mark otherwise), because the outbound UDP chain
// saves a datagram's Permit bit in its entry — and a local process with
// CAP_NET_ADMIN may send one carrying that bit (SO_MARK) to a local
// server: it must not permit the inbound flow.
func inCtPermit(m Marks) uint32 { return m.Block }

// ctLacks: the conntrack entry's mark lacks the bit.
func ctLacks(bit uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(bit), Xor: le32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: le32(0)},
	}
}

// ctOriginal: the packet goes in its conntrack entry's original direction.
func ctOriginal() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0}}, // IP_CT_DIR_ORIGINAL
	}
}

// udpCtPermitRule: a datagram of a flow permitted before gets the permit
// bit from its conntrack entry.
func udpCtPermitRule(m Marks) []expr.Any {
	return append(append(udpMatch(), markHas(&expr.Ct{Key: expr.CtKeyMARK, Register: 1}, inCtPermit(m))...),
		pktMark(),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(^m.Permit), Xor: le32(m.Permit)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1})
}

// udpQueueRule queues a new inbound flow's datagrams to a socket of the
// hooked cgroup cg on the ports pm matches (nil: any).
func udpQueueRule(m Marks, base, total uint16, cg cgroupMatch, pm []expr.Any) []expr.Any {
	r := append(append(udpMatch(), ctOriginal()...), ctLacks(inCtPermit(m))...)
	r = append(r, pm...)
	return append(r,
		&expr.Socket{Key: expr.SocketKeyCgroupv2, Level: cg.level, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint64(cg.id)},
		nfqueueTarget(base, total, true))
}

// addInPermitChain: the chain after the input chain, where an accepted
// queue verdict's permit bit is saved in the conntrack entry.
func addInPermitChain(c *nftables.Conn, t *nftables.Table, m Marks) {
	ch := c.AddChain(&nftables.Chain{Name: inPermitChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityMangle + 1)})
	bit := inCtPermit(m)
	r := append(append(markHas(pktMark(), m.Permit), udpMatch()...), ctLacks(bit)...)
	r = append(r,
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(^bit), Xor: le32(bit)},
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
}

// inUDPOwner finds the socket a datagram from remote to local is
// delivered to, and its owner.
func (p *Path) inUDPOwner(local, remote netip.AddrPort) (ebpf.Listener, error) {
	owners, ok := p.flows.(UDPOwners)
	if !ok {
		return ebpf.Listener{}, ErrNotSupported
	}
	cookie, err := p.udpSocket(local, remote)
	if err != nil {
		return ebpf.Listener{}, err
	}
	return owners.UDPOwner(cookie)
}

// handleInboundUDP decides an inbound datagram the input chain queued: the
// first of a new flow (or one behind a held first).
func (p *Path) handleInboundUDP(q *queue, pk *packet, start time.Time, local, remote netip.AddrPort) {
	key := inKey{local: local, remote: remote}
	if p.inFollow(q, pk, key) {
		return // a later datagram of a held flow: it waits with the first
	}
	l, err := p.inUDPOwner(local, remote)
	if err != nil {
		// No socket, or no owner recorded (bound before the hooks, an
		// evicted record): the kernel applies the filter's flag.
		p.inFlag(q, pk.id, pk.mark)
		return
	}
	layer := engine.LayerFor(engine.KindAuthRecvAccept, local.Addr().Is6())
	fl := &flow{q: q, id: pk.id, mark: pk.mark, local: local, remote: remote, inbound: true, listener: l,
		f: ebpf.CalloutFlow{Cookie: l.Cookie, Layer: layer, Protocol: unix.IPPROTO_UDP}}
	fl.layers[0], fl.nlayers = layer, 1
	fl.data = &InboundRequest{Local: local, Remote: remote, Packet: append([]byte(nil), pk.payload...)}
	p.fillInboundMeta(fl)
	p.decide(fl, start, p.flowMayBlock(fl), nil)
}

// inFollow holds a datagram of an inbound UDP flow whose first datagram is
// held (true), or answers it at once if that flow was just decided.
func (p *Path) inFollow(q *queue, pk *packet, key inKey) bool {
	v, ok := p.inu.held.Load(key)
	if !ok {
		return false
	}
	h := v.(*heldUDP)
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.done:
		p.inFollowerVerdict(heldPacket{q, pk.id, pk.mark}, h.permit, h.flag)
	case len(h.packets) < maxFollowers:
		h.packets = append(h.packets, heldPacket{q, pk.id, pk.mark})
	default:
		if err := q.verdict(pk.id, verdictDrop, 0, false); err != nil {
			p.errs.Add(1)
		}
	}
	return true
}

// inReleaseFollowers gives a decided inbound UDP flow's held datagrams its
// verdict.
func (p *Path) inReleaseFollowers(key inKey, permit, flag bool) {
	v, ok := p.inu.held.LoadAndDelete(key)
	if !ok {
		return
	}
	h := v.(*heldUDP)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.done, h.permit, h.flag = true, permit, flag
	for _, pk := range h.packets {
		p.inFollowerVerdict(pk, permit, flag)
	}
	h.packets = nil
}

// inFollowerVerdict: the first datagram's verdict (answerInbound's).
func (p *Path) inFollowerVerdict(pk heldPacket, permit, flag bool) {
	p.resent.Add(1)
	var err error
	switch {
	case flag:
		err = pk.q.verdict(pk.id, verdictAccept, pk.mark&^p.mask, true)
	case permit:
		err = pk.q.verdict(pk.id, verdictAccept, pk.mark&^p.mask|p.opts.Marks.Permit, true)
	default:
		err = pk.q.verdict(pk.id, verdictDrop, 0, false)
	}
	if err != nil {
		p.errs.Add(1)
	}
}
