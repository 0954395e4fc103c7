//go:build linux

package nfqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
)

// UDP flows. The first datagram of a UDP flow whose classification reaches
// a Go callout is held like a TCP SYN; there is no SYN to tell a flow's
// first packet, so the rules ask conntrack: a datagram of a socket with a
// queue mark is queued while its conntrack entry lacks the permit bit
// (ct mark), and a permit verdict sets that bit — every later datagram of
// the flow passes in the kernel, never coming to user space. A block
// verdict (and a fail-closed flag) answers with an ICMP port unreachable,
// so a connected socket's next receive fails with ECONNREFUSED (WFP fails
// the send; the datagram's send returned before the callout decided).
// A UDP socket has no sockops to index its record by 4-tuple: user space
// asks sock_diag for the cookie of the socket the datagram came from.
//
// The conntrack entry is the flow, as WFP's ALE keeps UDP flow state by
// 5-tuple: a new socket that reuses the 4-tuple while the entry lives (30 s
// unanswered, 120 s once answered) is not asked again. The rules (and
// conntrack) are installed only when a Go callout filter matches UDP
// (Options.UDP, Path.EnableUDP).

const (
	udpChain         = "udp"
	udpFallbackChain = "udpfallback"
)

func udpMatch() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
	}
}

// ctNotPermitted: the conntrack entry lacks the permit bit.
func ctNotPermitted(m Marks) []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(m.Permit), Xor: le32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: le32(0)},
	}
}

func udpReject(fam nftables.TableFamily) *expr.Reject {
	if fam == nftables.TableFamilyIPv6 {
		return &expr.Reject{Type: unix.NFT_REJECT_ICMP_UNREACH, Code: 4} // ICMPV6_PORT_UNREACH
	}
	return &expr.Reject{Type: unix.NFT_REJECT_ICMP_UNREACH, Code: 3} // ICMP_PORT_UNREACH
}

// addUDPChains queues the UDP chains of table t: "udp" before fwp's output
// chain (verdicts and the queue), "udpfallback" after the fallback chain
// (the flag when no one reads or the queue is full, counted).
func addUDPChains(c *nftables.Conn, t *nftables.Table, m Marks, base, total uint16) {
	ch := c.AddChain(&nftables.Chain{Name: udpChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityMangle - 1)})
	rules := [][]expr.Any{
		// permit verdict: the flow's conntrack entry is permitted
		append(append(markHas(pktMark(), m.Permit), udpMatch()...),
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(^m.Permit), Xor: le32(m.Permit)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true}),
		// block verdict
		append(append(markHas(pktMark(), m.Block), udpMatch()...), udpReject(t.Family)),
		// a flow not yet permitted: queued (bypassed when no one reads)
		append(append(append(markHas(pktMark(), m.QueueOpen|m.QueueClosed), udpMatch()...), ctNotPermitted(m)...), nfqueueTarget(base, total, true)),
	}
	for _, r := range rules {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
	}
	fb := c.AddChain(&nftables.Chain{Name: udpFallbackChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityMangle + 2)})
	for _, r := range [][]expr.Any{
		append(append(append(markHas(pktMark(), m.QueueClosed), udpMatch()...), ctNotPermitted(m)...), &expr.Counter{}, logTo(base), udpReject(t.Family)),
		append(append(append(markHas(pktMark(), m.QueueOpen), udpMatch()...), ctNotPermitted(m)...), &expr.Counter{}, logTo(base)),
	} {
		c.AddRule(&nftables.Rule{Table: t, Chain: fb, Exprs: r})
	}
}

// UDPFlows is what the path needs of the datapath to hold UDP flows
// (ebpf.Datapath implements it).
type UDPFlows interface {
	CalloutFlowByCookie(cookie uint64) (ebpf.CalloutFlow, error)
	SetCalloutUDP(on bool) error
}

// udpState is the path's UDP part: on once the rules are in, and the
// sock_diag socket that finds a datagram's socket.
type udpState struct {
	mu   sync.Mutex
	on   bool
	diag int
}

// EnableUDP installs the UDP rules (and so conntrack) in the served
// namespace, if not yet, and tells the hooks to hand UDP flows over.
func (p *Path) EnableUDP() error {
	uf, ok := p.flows.(UDPFlows)
	if !ok {
		return fmt.Errorf("%w: the datapath cannot hand UDP flows over", ErrNotSupported)
	}
	u := &p.udp
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.on {
		return nil
	}
	fd, err := diagSocket(p.opts.NetNS)
	if err != nil {
		return err
	}
	c, err := conn(p.opts.NetNS)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("nftables: %w", err)
	}
	for _, fam := range families {
		addUDPChains(c, &nftables.Table{Family: fam, Name: TableName}, p.opts.Marks, p.opts.QueueBase, uint16(p.opts.Queues))
	}
	if err := c.Flush(); err != nil {
		unix.Close(fd)
		return fmt.Errorf("nftables: install the UDP rules: %w", err)
	}
	// The rules first: a marked datagram never meets a namespace without them.
	if err := uf.SetCalloutUDP(true); err != nil {
		unix.Close(fd)
		return err
	}
	u.diag, u.on = fd, true
	return nil
}

// closeUDP stops handing UDP flows over (before the tables go).
func (p *Path) closeUDP() error {
	u := &p.udp
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.on {
		return nil
	}
	var err error
	if uf, ok := p.flows.(UDPFlows); ok {
		err = uf.SetCalloutUDP(false)
	}
	unix.Close(u.diag)
	u.on = false
	return err
}

// udpSocket finds, with sock_diag while the UDP path is on, the cookie of
// the socket a datagram from local to remote was sent by. The lookup is
// the kernel's delivery one: for an inbound datagram, asked with its
// destination as local, it finds the socket it is delivered to.
func (p *Path) udpSocket(local, remote netip.AddrPort) (uint64, error) {
	u := &p.udp
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.on {
		return 0, ErrNotSupported
	}
	return udpCookie(u.diag, local, remote)
}

// udpFlow finds the hook's record of a queued datagram's socket.
func (p *Path) udpFlow(local, remote netip.AddrPort) (ebpf.CalloutFlow, error) {
	uf, ok := p.flows.(UDPFlows)
	if !ok {
		return ebpf.CalloutFlow{}, ErrNotSupported
	}
	cookie, err := p.udpSocket(local, remote)
	if err != nil {
		return ebpf.CalloutFlow{}, err
	}
	f, err := uf.CalloutFlowByCookie(cookie)
	if err != nil {
		return f, err
	}
	// An unconnected socket's record names the destination of its last
	// sendto: the datagram's is the flow's.
	f.Remote = remote
	return f, nil
}

// diagSocket opens a NETLINK_SOCK_DIAG socket in the namespace netns.
func diagSocket(netns int) (int, error) {
	open := func() (int, error) {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		if err != nil {
			return -1, fmt.Errorf("nfqueue: sock_diag socket: %w", err)
		}
		tv := unix.Timeval{Sec: 1}
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		return fd, nil
	}
	if netns <= 0 {
		return open()
	}
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, err}
			return
		}
		defer self.Close()
		if err := unix.Setns(netns, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, fmt.Errorf("nfqueue: setns: %w", err)}
			return
		}
		fd, err := open()
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{fd, err}
	}()
	r := <-ch
	return r.fd, r.err
}

// udpCookie asks sock_diag for the cookie of the UDP socket that sent a
// datagram from local to remote (an exact lookup, as the kernel finds the
// socket a datagram from remote to local is delivered to; connected or
// not).
func udpCookie(fd int, local, remote netip.AddrPort) (uint64, error) {
	const sockDiagByFamily = 20
	req := make([]byte, unix.NLMSG_HDRLEN+56)
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], sockDiagByFamily)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST)
	b := req[unix.NLMSG_HDRLEN:]
	v6 := local.Addr().Is6() && !local.Addr().Is4In6()
	b[0] = unix.AF_INET
	if v6 {
		b[0] = unix.AF_INET6
	}
	b[1] = unix.IPPROTO_UDP
	binary.NativeEndian.PutUint32(b[4:], ^uint32(0))
	id := b[8:]
	// "src and dst are swapped for historical reasons" (udp_diag.c):
	// the lookup is from the peer's side.
	binary.BigEndian.PutUint16(id[0:], remote.Port())
	binary.BigEndian.PutUint16(id[2:], local.Port())
	copy(id[4:20], remote.Addr().Unmap().AsSlice())
	copy(id[20:36], local.Addr().Unmap().AsSlice())
	binary.NativeEndian.PutUint32(id[40:], ^uint32(0)) // INET_DIAG_NOCOOKIE
	binary.NativeEndian.PutUint32(id[44:], ^uint32(0))
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("sock_diag: %w", err)
	}
	buf := make([]byte, 4096)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return 0, fmt.Errorf("sock_diag: %w", err)
		}
		m := buf[:n]
		if len(m) < unix.NLMSG_HDRLEN+4 {
			return 0, fmt.Errorf("sock_diag: short answer")
		}
		switch binary.NativeEndian.Uint16(m[4:]) {
		case unix.NLMSG_ERROR:
			e := int32(binary.NativeEndian.Uint32(m[unix.NLMSG_HDRLEN:]))
			if e == 0 {
				continue
			}
			return 0, fmt.Errorf("sock_diag: UDP socket %s -> %s: %w", local, remote, unix.Errno(-e))
		case sockDiagByFamily:
			msg := m[unix.NLMSG_HDRLEN:]
			if len(msg) < 4+48 {
				return 0, fmt.Errorf("sock_diag: short answer")
			}
			lo := binary.NativeEndian.Uint32(msg[4+40:])
			hi := binary.NativeEndian.Uint32(msg[4+44:])
			return uint64(lo) | uint64(hi)<<32, nil
		}
	}
}

// heldUDP is a pended UDP flow's later datagrams: they wait with the first
// and get its verdict (a datagram is not sent again like a SYN, and each
// would otherwise be classified anew).
type heldUDP struct {
	mu      sync.Mutex
	done    bool
	permit  bool
	flag    bool // an inbound flow's: answered without a verdict bit (inudp.go)
	packets []heldPacket
}

type heldPacket struct {
	q        *queue
	id, mark uint32
}

// maxFollowers bounds the datagrams held behind one flow's first; more
// are dropped (a program sending that much before an answer retries).
const maxFollowers = 64

// followHeld holds a datagram of a UDP flow whose first datagram is
// pended (true), or answers it at once if that flow was just decided.
func (p *Path) followHeld(q *queue, pk *packet, cookie uint64) bool {
	v, ok := p.udpHeld.Load(cookie)
	if !ok {
		return false
	}
	h := v.(*heldUDP)
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.done:
		p.followerVerdict(heldPacket{q, pk.id, pk.mark}, h.permit)
	case len(h.packets) < maxFollowers:
		h.packets = append(h.packets, heldPacket{q, pk.id, pk.mark})
	default:
		if err := q.verdict(pk.id, verdictDrop, 0, false); err != nil {
			p.errs.Add(1)
		}
	}
	return true
}

// releaseFollowers gives a decided UDP flow's held datagrams its verdict.
func (p *Path) releaseFollowers(cookie uint64, permit bool) {
	v, ok := p.udpHeld.LoadAndDelete(cookie)
	if !ok {
		return
	}
	h := v.(*heldUDP)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.done, h.permit = true, permit
	for _, pk := range h.packets {
		p.followerVerdict(pk, permit)
	}
	h.packets = nil
}

func (p *Path) followerVerdict(pk heldPacket, permit bool) {
	bits := p.opts.Marks.Block
	if permit {
		bits = p.opts.Marks.Permit
	}
	p.resent.Add(1)
	if err := pk.q.verdict(pk.id, verdictRepeat, pk.mark&^p.mask|bits, true); err != nil {
		p.errs.Add(1)
	}
}
